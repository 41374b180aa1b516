"""Writing a phantom cohort to disk in native formats, with its datalist, atomically."""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_synth.data.modalities import get_modality
from monai_synth.data.phantoms._cohort import iter_cohort

__all__ = ["write_cohort", "write_nifti", "write_dicom", "write_png"]

# CT values are stored as unsigned integers with this intercept, the usual CT convention, so air (-1000) fits.
CT_INTERCEPT = -1024.0
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "US": "1.2.840.10008.5.1.4.1.1.6.1"}


def write_nifti(path: Path, image: np.ndarray, spacing: Sequence[float], description: str = "") -> None:
    """float32 NIfTI with the voxel spacing in the affine and header (mm), centred on the scanner's origin.

    Array axes run along +x, +y, +z of RAS, as in :func:`write_dicom`, so both formats load as the same anatomy.
    """
    import nibabel as nib

    data = np.asarray(image[0], dtype=np.float32)
    affine = np.diag([*[float(s) for s in spacing], *([1.0] * (4 - len(spacing)))])
    affine[: data.ndim, 3] = _centre_offset(data.shape, spacing)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description.encode()[:79]
    nib.save(img, str(path))


def write_png(path: Path, image: np.ndarray) -> None:
    """8-bit greyscale PNG. Stored as (rows=axis 1, columns=axis 0) so MONAI's PILReader returns the array as given."""
    from PIL import Image

    data = np.clip(np.round(image[0]), 0, 255).astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(data.T)).save(path)


def _dicom_dataset(code: str, record: dict[str, Any], study_uid: str, series_uid: str, frame_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[code]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SOP_CLASS[code]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = code
    ds.PatientName = f"Phantom^{record['patient_id']}"
    ds.PatientID = record["patient_id"]
    ds.StudyID = str(record["study"])
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"monai_synth phantom, label {record['label']}"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _set_pixels(ds, plane: np.ndarray, code: str) -> None:
    """Store one (axis0, axis1) plane as DICOM (rows = axis 1, columns = axis 0), as MONAI's PydicomReader expects."""
    rows = np.ascontiguousarray(plane.T)
    ds.Rows, ds.Columns = rows.shape
    if code == "CT":
        stored = np.clip(np.round(rows - CT_INTERCEPT), 0, 65535).astype(np.uint16)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = CT_INTERCEPT, 1.0, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
    else:
        stored = np.clip(np.round(rows), 0, 255).astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = stored.tobytes()


def _centre_offset(shape, spacing) -> list[float]:
    """RAS position (mm) of the first voxel that centres the image on the scanner's origin."""
    return [-(n - 1) / 2 * float(s) for n, s in zip(shape, spacing)]


# Array axes 0 and 1 run along +x and +y of RAS (the NIfTI convention), which are -x and -y of DICOM's LPS.
_IMAGE_ORIENTATION = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]


def _first_voxel_lps(shape, spacing, z: float) -> list[float]:
    """DICOM ImagePositionPatient (LPS, mm) of a plane's first voxel, matching :func:`write_nifti`'s affine."""
    x, y = _centre_offset(shape[:2], spacing[:2])
    return [-x, -y, float(z)]


def write_dicom(path: Path, record: dict[str, Any], code: str) -> None:
    """Write a 2D image as one DICOM file, or a 3D volume as a folder holding one file per z slice (one series)."""
    from pydicom.uid import generate_uid

    image, spacing = record["image"][0], record["spacing"]
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    if image.ndim == 2:
        ds = _dicom_dataset(code, record, study_uid, series_uid, frame_uid)
        ds.InstanceNumber = 1
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.ImageOrientationPatient = _IMAGE_ORIENTATION
        ds.ImagePositionPatient = _first_voxel_lps(image.shape, spacing, 0.0)
        _set_pixels(ds, image, code)
        ds.save_as(path, enforce_file_format=True)
        return
    path.mkdir()
    nz = image.shape[2]
    z0 = _centre_offset(image.shape, spacing)[2]
    for k in range(nz):
        ds = _dicom_dataset(code, record, study_uid, series_uid, frame_uid)
        ds.InstanceNumber = k + 1
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.SpacingBetweenSlices = float(spacing[2])
        ds.ImageOrientationPatient = _IMAGE_ORIENTATION
        ds.ImagePositionPatient = _first_voxel_lps(image.shape, spacing, z0 + k * spacing[2])
        ds.SliceLocation = float(z0 + k * spacing[2])
        _set_pixels(ds, image[:, :, k], code)
        ds.save_as(path / f"slice_{k:04d}.dcm", enforce_file_format=True)


def write_cohort(
    out_dir: str | os.PathLike,
    modality: str,
    n_patients: int,
    images_per_patient: int = 3,
    spatial_dims: int = 2,
    spatial_size: int | Sequence[int] = 64,
    seed: int = 0,
    fmt: str | None = None,
    first_patient: int = 0,
) -> Path:
    """Write a phantom cohort (see :func:`generate_cohort`) as files in a native format plus ``datalist.csv``.

    Layout: ``out_dir/images/P0000_s0.<ext>`` (a folder of slice files for 3D DICOM) and ``out_dir/datalist.csv`` with
    columns image (relative to the CSV), patient_id, label and the continuous extras (lesion_size_mm). Everything is
    written to a hidden sibling folder that is renamed to ``out_dir`` only when complete, so an interrupted run never
    leaves a cohort that looks finished.

    Args:
        out_dir: folder to create; it must not exist or be empty.
        fmt: "nifti", "dicom" or "png"; default the modality's first native format (CT: dicom, MRI/PET: nifti,
            US: png).
        other args: as :func:`generate_cohort`.

    Returns:
        path of the datalist CSV inside ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
        ValueError: a format the modality does not offer, or bad cohort arguments.
    """
    mod = get_modality(modality)
    fmt = (fmt or mod.native_formats[0]).lower()
    if fmt not in mod.native_formats:
        raise ValueError(f"fmt={fmt!r} is not a format for {mod.name} phantoms; use one of {list(mod.native_formats)}")
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} already exists and is not empty; choose a new --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "images").mkdir()
        rows = []
        records = iter_cohort(
            mod.name, n_patients, images_per_patient, spatial_dims, spatial_size, seed, None, first_patient
        )
        for rec in records:
            stem = f"{rec['patient_id']}_s{rec['study']}"
            if fmt == "nifti":
                rel = f"images/{stem}.nii.gz"
                write_nifti(
                    tmp / rel, rec["image"], rec["spacing"], f"monai_synth {mod.name} phantom ({mod.physical_unit})"
                )
            elif fmt == "png":
                rel = f"images/{stem}.png"
                write_png(tmp / rel, rec["image"])
            else:
                rel = f"images/{stem}" + (".dcm" if spatial_dims == 2 else "")
                write_dicom(tmp / rel, rec, mod.dicom_code)
            row = {"image": rel, "patient_id": rec["patient_id"], "label": rec["label"]}
            row.update({k: v for k, v in rec.items() if k not in ("image", "patient_id", "label", "study", "spacing")})
            rows.append(row)
        with open(tmp / "datalist.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "datalist.csv"
