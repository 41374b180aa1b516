"""Build the bundles' datalist from a team's own folder of images and a spreadsheet of labels.

Hospital data rarely arrives as a datalist: it is a folder of DICOM studies (files of many series mixed, sometimes
with segmentations, dose grids or reports beside them), or of NIfTI volumes, or of 2D images, plus a labels sheet
per patient. :func:`scan_folder` turns such a folder into the ``image, patient_id, label[, extras]`` CSV the bundles
read (see :mod:`monai_synth.data.datalist`):

* DICOM files are grouped into series by ``SeriesInstanceUID`` (pydicom headers only), the patient id comes from
  the ``PatientID`` tag; a series spread over a folder holding other series gets a folder of its own (links to the
  original files) because a series is loaded as a folder. Non-image objects (SEG, RTDOSE, SR, ...) are skipped and
  counted. A series with missing slices, mixed pixel or slice spacing, or mixed image sizes is refused.
* NIfTI and 2D image files (PNG, JPEG, BMP) are one image each; the patient id is the name of the file's
  first folder below the scanned folder (``<root>/<patient>/...``), or the file name's stem for files directly
  in it, unless the labels sheet has an ``image`` column.
* The labels sheet is joined on ``patient_id`` (or on ``image``, the path relative to the scanned folder); every
  other column is an extra numeric condition. Patients without a label are refused, all named at once.
* Optionally, volumes are cut into 2D slices (NIfTI, with the slice's own position and spacing in the affine), all
  slices of a volume keeping its patient id so the patient-level split never puts them on both sides.

Everything is validated before the datalist is written (the datalist rows as the bundles validate them, then every
image decoded by the reader training uses); the CSV is written last and atomically, so a folder holding a
``datalist.csv`` is a complete one.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_synth.atomic import atomic_file
from monai_synth.data.datalist import REQUIRED_KEYS, DatalistError, validate_records
from monai_synth.data.loading import dicom_problem

__all__ = ["scan_folder", "DATALIST_NAME"]

logger = logging.getLogger(__name__)

#: The file the bundles look for in ``dataset_dir``.
DATALIST_NAME = "datalist.csv"

_NIFTI = (".nii", ".nii.gz")
_IMAGES_2D = (".png", ".jpg", ".jpeg", ".bmp")
#: A gap between consecutive slices this many times the series' usual spacing means slices are missing.
_MISSING_GAP = 1.5
#: Relative spread of the slice gaps (or pixel spacings) tolerated before a series counts as having mixed spacing.
_SPACING_TOLERANCE = 0.05


def scan_folder(
    images: str | os.PathLike,
    labels_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    labels: Sequence[str] | None = None,
    slices: bool = False,
    slice_step: int = 1,
    spatial_dims: int | None = None,
    check_images: bool = True,
) -> dict[str, Any]:
    """Scan ``images``, join ``labels_csv``, validate everything and write ``<out_dir>/datalist.csv``.

    Args:
        images: folder of DICOM files (any nesting), NIfTI volumes or 2D images.
        labels_csv: CSV with a ``label`` column and a ``patient_id`` (or ``image``) column; other columns are extra
            numeric conditions.
        out_dir: folder for ``datalist.csv`` and, when needed, ``series/`` (per-series folders of links) and
            ``slices/``; usable as a bundle's ``dataset_dir``.
        labels: the allowed labels (the bundle's), or ``None`` for any.
        slices: cut every volume into 2D slices along its last axis.
        slice_step: keep every ``slice_step``-th slice.
        spatial_dims: spatial axes every image must have (2 for a 2D bundle); ``None`` accepts any
            (``slices=True`` implies 2).
        check_images: decode every image before writing (turn off only to inspect a folder quickly).

    Returns:
        A summary: ``datalist`` path, ``images``, ``patients``, ``per_label`` counts and ``skipped`` non-image files.

    Raises:
        FileExistsError: ``out_dir`` already holds a datalist.
        DatalistError: naming every problem found (series with missing slices or mixed spacing, unreadable files,
            patients without a label, bad label values, images that do not decode).
    """
    root = Path(images).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass the folder that holds the images")
    if (out / DATALIST_NAME).exists():
        raise FileExistsError(f"{out / DATALIST_NAME} exists; choose another --out folder or remove it")
    if int(slice_step) < 1:
        raise ValueError(f"slice_step must be >= 1, got {slice_step}")
    sheet, key = _read_labels(Path(labels_csv))
    problems: list[tuple[int | None, str]] = []
    dicom, others, skipped = _collect(root, problems)
    found: list[dict[str, Any]] = []  # {"image", "patient_id", "what", "rel"} before labels are joined
    for uid, files in sorted(dicom.items()):
        found.extend(_series_record(uid, files, root, out, problems))
    for path in others:
        rel = path.relative_to(root).as_posix()
        patient = rel.split("/")[0] if "/" in rel else _stem(path)
        found.append({"image": str(path), "patient_id": patient, "what": f"file {rel}", "rel": rel})
    if not found and not problems:
        problems.append((None, f"no images found in {root} (DICOM, NIfTI, PNG, JPEG or BMP)"))
    records = _join_labels(found, sheet, key, Path(labels_csv), problems)
    if problems:
        raise DatalistError(str(root), problems)
    if slices:
        records = _extract_slices(records, out / "slices", int(slice_step))
        spatial_dims = 2
    records.sort(key=lambda rec: (str(rec["patient_id"]), rec["image"]))
    rows = [{**rec, "image": os.path.relpath(rec["image"], out)} for rec in records]
    records = validate_records(rows, base_dir=out, labels=labels, check_files=True, source=str(out / DATALIST_NAME))
    if check_images:
        from monai_synth.data.validation import check_image

        bad = [(None, p) for rec in records if (p := check_image(rec["image"], spatial_dims=spatial_dims))]
        if bad:
            raise DatalistError(str(root), bad)
    _write_datalist(out / DATALIST_NAME, records)
    per_label: dict[str, int] = defaultdict(int)
    for rec in records:
        per_label[rec["label"]] += 1
    summary = {
        "datalist": str(out / DATALIST_NAME),
        "images": len(records),
        "patients": len({r["patient_id"] for r in records}),
        "per_label": dict(sorted(per_label.items())),
        "skipped": skipped,
    }
    logger.info(f"wrote {summary['datalist']}: {summary['images']} images of {summary['patients']} patients")
    return summary


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", *(_NIFTI + _IMAGES_2D)):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _read_labels(path: Path) -> tuple[dict[str, dict[str, str]], str]:
    """The labels sheet as key -> row, keyed by ``image`` when it has that column, else by ``patient_id``."""
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist; pass a CSV with patient_id and label columns")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in raw.items()} for raw in reader]
    key = "image" if "image" in columns else "patient_id"
    if "label" not in columns or key not in columns:
        raise DatalistError(
            str(path),
            [(None, f"the labels CSV needs a 'label' column and a 'patient_id' (or 'image') column; found {columns}")],
        )
    sheet: dict[str, dict[str, str]] = {}
    problems: list[tuple[int | None, str]] = []
    for number, row in enumerate(rows, start=1):
        value = row.get(key, "")
        if not value:
            problems.append((number, f"empty {key}; fill it in or remove the row"))
        elif value in sheet and sheet[value] != row:
            problems.append((number, f"{key} {value!r} is listed twice with different values; keep one row"))
        else:
            sheet[value] = row
    if problems:
        raise DatalistError(str(path), problems, line_offset=1)
    return sheet, key


def _collect(root: Path, problems: list) -> tuple[dict[str, list[tuple[Path, Any]]], list[Path], list[str]]:
    """DICOM headers grouped by series, the other image files, and the non-image DICOM files skipped."""
    import pydicom

    from monai_synth.data.loading import is_dicom

    series: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    others: list[Path] = []
    skipped: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name = path.name.lower()
        if name.endswith(_NIFTI) or name.endswith(_IMAGES_2D):
            others.append(path)
            continue
        if name == "dicomdir" or not is_dicom(path):
            continue
        rel = path.relative_to(root).as_posix()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:
            problems.append((None, f"DICOM file {rel} cannot be read ({err}); replace it or remove it"))
            continue
        if dicom_problem(ds) is not None and "no pixel data" not in dicom_problem(ds):
            skipped.append(f"{rel} ({dicom_problem(ds)})")
            continue
        if not any(k in ds for k in ("Rows", "Columns")):
            skipped.append(f"{rel} (holds no image)")
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            problems.append((None, f"DICOM file {rel} has no SeriesInstanceUID; it cannot be grouped into a series"))
            continue
        series[uid].append((path, ds))
    if skipped:
        logger.info(f"skipped {len(skipped)} non-image DICOM files: {skipped[:5]}{' ...' if len(skipped) > 5 else ''}")
    return series, others, skipped


def _series_record(uid: str, files: list[tuple[Path, Any]], root: Path, out: Path, problems: list) -> list[dict]:
    """One record for a DICOM series (a file, or a folder holding exactly its slices), or a problem."""
    first = files[0][1]
    patient = str(first.get("PatientID", "") or "").strip()
    what = f"series {uid} (patient {patient or '?'}, {len(files)} files under {files[0][0].parent.relative_to(root)})"
    if not patient:
        problems.append((None, f"{what}: no PatientID tag; the patient of each series must be known to split by it"))
        return []
    patients = {str(ds.get("PatientID", "")) for _, ds in files}
    if len(patients) > 1:
        problems.append((None, f"{what}: one series holds several PatientIDs {sorted(patients)}; fix the export"))
        return []
    if len(files) == 1:
        return [{"image": str(files[0][0]), "patient_id": patient, "what": what, "rel": _rel(files[0][0], root)}]
    problem = _series_geometry_problem([ds for _, ds in files])
    if problem:
        problems.append((None, f"{what}: {problem}"))
        return []
    folder = files[0][0].parent
    in_folder = {p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    paths = {p for p, _ in files}
    if {p.parent for p in paths} != {folder} or any(_is_other_dicom(p, uid) for p in in_folder - paths):
        folder = out / "series" / uid
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(paths):
            link = folder / path.name
            if not link.exists():
                try:
                    link.symlink_to(path)
                except OSError:  # file systems without links: copy
                    shutil.copy2(path, link)
    return [{"image": str(folder), "patient_id": patient, "what": what, "rel": _rel(folder, root)}]


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _is_other_dicom(path: Path, uid: str) -> bool:
    """A DICOM file of another series (it would be stacked with this series if the folder were loaded)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:
        return False
    return str(ds.get("SeriesInstanceUID", "")) != uid


def _series_geometry_problem(datasets: Sequence[Any]) -> str | None:
    """Missing slices, mixed spacing or mixed sizes in a multi-file series, or ``None`` for a regular volume."""
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        return f"slices of different sizes {sorted(sizes)}; export the series again or split it"
    spacings = {tuple(round(float(v), 4) for v in ds.get("PixelSpacing", [1.0, 1.0])) for ds in datasets}
    if len(spacings) > 1:
        return f"mixed spacing: slices have pixel spacings {sorted(spacings)} mm; resample them to one spacing"
    if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets):
        orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        positions = np.sort(
            [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in datasets]
        )
        gaps = np.diff(positions)
        if np.any(gaps < 1e-3):
            return "two slices at the same position (a duplicated file or two acquisitions in one series)"
        step = float(np.median(gaps))
        big = np.flatnonzero(gaps > _MISSING_GAP * step)
        if big.size:
            missing = int(sum(round(g / step) - 1 for g in gaps[big]))
            where = ", ".join(f"{positions[i]:.2f}-{positions[i + 1]:.2f} mm" for i in big[:3])
            return (
                f"missing slices: about {missing} slice(s) absent between {where} (slice spacing {step:.2f} mm); "
                "export the complete series"
            )
        if gaps.max() - gaps.min() > _SPACING_TOLERANCE * step:
            return (
                f"mixed spacing: slice gaps range from {gaps.min():.2f} to {gaps.max():.2f} mm; resample the series to "
                "one slice spacing"
            )
        return None
    numbers = sorted(int(ds.InstanceNumber) for ds in datasets if "InstanceNumber" in ds)
    if len(numbers) == len(datasets) and numbers[-1] - numbers[0] + 1 != len(numbers):
        absent = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
        return f"missing slices: instance numbers {absent[:10]} are absent; export the complete series"
    return None


def _join_labels(found: list[dict], sheet: dict, key: str, source: Path, problems: list) -> list[dict]:
    """Attach label and extra columns of the sheet to each image; name every patient (or image) without a label."""
    records, unlabelled = [], defaultdict(list)
    basenames: dict[str, list[str]] = defaultdict(list)
    for name in sheet:
        basenames[Path(name).name].append(name)
    for item in found:
        if key == "patient_id":
            row = sheet.get(item["patient_id"])
        else:
            row = sheet.get(item["rel"])
            matches = basenames.get(Path(item["rel"]).name, [])
            if row is None and len(matches) == 1:
                row = sheet[matches[0]]
        if row is None:
            unlabelled[item["patient_id"] if key == "patient_id" else item["rel"]].append(item["what"])
            continue
        extras = {k: v for k, v in row.items() if k not in (*REQUIRED_KEYS, "") and v != ""}
        patient = row.get("patient_id") or item["patient_id"]
        records.append({"image": item["image"], "patient_id": patient, "label": row["label"], **extras})
    for name, whats in sorted(unlabelled.items()):
        problems.append(
            (None, f"{key} {name!r} has no label in {source} ({len(whats)} image(s), e.g. {whats[0]}); add a row")
        )
    return records


def _extract_slices(records: list[dict], folder: Path, step: int) -> list[dict]:
    """Cut each volume into 2D NIfTI slices along its last axis; 2D images pass through unchanged."""
    import nibabel as nib
    from monai.transforms import LoadImage

    from monai_synth.data.loading import FileTypeReader

    loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)
    out = []
    for number, rec in enumerate(records):
        volume = loader(rec["image"], reader=FileTypeReader())
        if volume.ndim != 4:  # (C, x, y) already 2D
            out.append(rec)
            continue
        array = np.asarray(volume.array[0], dtype=np.float32)
        affine = np.asarray(volume.affine, dtype=np.float64)
        target = folder / f"{number:05d}"
        target.mkdir(parents=True, exist_ok=True)
        for k in range(0, array.shape[-1], step):
            plane = affine.copy()
            plane[:3, 3] = affine[:3, 3] + affine[:3, 2] * k  # the slice's own position, spacing unchanged
            path = target / f"slice_{k:04d}.nii.gz"
            nib.save(nib.Nifti1Image(np.ascontiguousarray(array[..., k]), plane), str(path))
            out.append({**rec, "image": str(path)})
    return out


def _write_datalist(path: Path, records: list[dict]) -> None:
    extras = sorted({k for rec in records for k in rec if k not in REQUIRED_KEYS})
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*REQUIRED_KEYS, *extras])
        writer.writeheader()
        for rec in records:
            writer.writerow({**rec, "image": os.path.relpath(rec["image"], path.parent)})
