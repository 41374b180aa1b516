"""Read and validate the datalists that describe a training cohort.

A datalist is either a CSV file with the columns ``image, patient_id, label[, extra...]`` or a MONAI JSON
datalist (``{"training": [{"image": ..., "patient_id": ..., "label": ...}, ...]}``). Relative image paths are
resolved against the folder that holds the datalist, so a cohort folder can be moved as a whole.

Everything is validated before any training starts, because a bad row found after hours of training (or, worse,
a patient silently counted twice) costs far more than reading the list twice. All problems are collected and
raised together as one :class:`DatalistError` that names every offending row, what is wrong with it and how to
fix it, so a user fixes the list in one pass instead of one error at a time.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_synth.data.loading import is_dicom

__all__ = [
    "DatalistError",
    "REQUIRED_KEYS",
    "load_datalist",
    "validate_records",
    "datalist_fingerprint",
    "content_fingerprint",
]

#: Keys every record must have; any other key is an extra (numeric) condition.
REQUIRED_KEYS: tuple[str, ...] = ("image", "patient_id", "label")

#: At most this many problems are spelled out in full; the rest are counted, so the message stays readable.
_MAX_LISTED_PROBLEMS = 200


class DatalistError(ValueError):
    """A datalist cannot be used as it is.

    The message lists every offending row (1-based row number, for a CSV also the line number counting the header,
    what is wrong, how to fix it). ``problems`` holds
    the same information as ``(row, message)`` pairs (row is ``None`` for problems of the whole list) so that
    callers and tests can inspect it without parsing text.
    """

    def __init__(self, source: str, problems: Sequence[tuple[int | None, str]], line_offset: int | None = None):
        self.source = source
        self.problems = list(problems)
        lines = [f"datalist {source} has {len(self.problems)} problem(s); fix them all and run again:"]
        for row, message in self.problems[:_MAX_LISTED_PROBLEMS]:
            if row is None:
                lines.append(f"  - {message}")
            elif line_offset is not None:  # CSV: also give the line an editor shows
                lines.append(f"  - row {row} (line {row + line_offset}): {message}")
            else:
                lines.append(f"  - row {row}: {message}")
        if len(self.problems) > _MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - _MAX_LISTED_PROBLEMS} more")
        super().__init__("\n".join(lines))

    @property
    def rows(self) -> list[int]:
        """Sorted 1-based row numbers that have at least one problem."""
        return sorted({row for row, _ in self.problems if row is not None})


def load_datalist(
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    check_files: bool = True,
    data_list_key: str = "training",
) -> list[dict]:
    """Read a CSV or MONAI JSON datalist and validate it.

    Args:
        path: ``.csv`` file, or ``.json`` file holding a MONAI datalist (a dict with a ``data_list_key`` list, or a
            bare list of records).
        labels: the allowed labels (e.g. ``get_modality("us").labels``); ``None`` accepts any label.
        check_files: check that every image exists and is readable (a DICOM series may be a folder). Turn off
            only for lists that are written before their images.
        data_list_key: which list of a JSON datalist to read (``"training"``, ``"validation"``, ...).

    Returns:
        One dict per row: ``"image"`` (absolute path str), ``"patient_id"`` (str), ``"label"`` (str) and every
        extra column as a float.

    Raises:
        DatalistError: naming every row that is missing a file, has an unknown label, repeats an image, lacks a
            required column or has a non-numeric extra value; also for an empty list or an unreadable file.
    """
    path = Path(path).expanduser()
    source = str(path)
    if not path.is_file():
        raise DatalistError(source, [(None, f"datalist file not found: {source}; pass the path of a .csv or .json")])
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows, columns, first_row = _read_csv(path)
    elif suffix == ".json":
        rows, columns, first_row = _read_json(path, data_list_key)
    else:
        raise DatalistError(source, [(None, f"unsupported datalist type {suffix!r}; use a .csv or a .json datalist")])
    return validate_records(
        rows,
        base_dir=path.parent,
        labels=labels,
        check_files=check_files,
        source=source,
        columns=columns,
        first_row=first_row,
    )


def validate_records(
    rows: Sequence[Mapping[str, Any]],
    base_dir: str | os.PathLike | None = None,
    labels: Sequence[str] | None = None,
    check_files: bool = True,
    source: str = "<records>",
    columns: Sequence[str] | None = None,
    first_row: int = 1,
) -> list[dict]:
    """Validate and normalise in-memory records (the part of :func:`load_datalist` after parsing).

    Args:
        rows: raw records (str or numeric values).
        base_dir: folder that relative image paths are resolved against (default: current directory).
        labels: allowed labels, or ``None`` for any.
        check_files: check that images exist and are readable.
        source: name used in error messages.
        columns: column names of a table (CSV) so a missing required column is reported once, not per row.
        first_row: number of the first record in messages (CSV rows are numbered from 1 after the header).

    Returns:
        The normalised records (see :func:`load_datalist`).

    Raises:
        DatalistError: see :func:`load_datalist`.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems: list[tuple[int | None, str]] = []
    if columns is not None:
        missing_cols = [k for k in REQUIRED_KEYS if k not in columns]
        if missing_cols:
            problems.append(
                (
                    None,
                    f"missing required column(s) {missing_cols}; the header must contain {list(REQUIRED_KEYS)} "
                    f"(found {list(columns)})",
                )
            )
            raise DatalistError(source, problems)
    line_offset = 1 if columns is not None else None
    if len(rows) == 0:
        raise DatalistError(source, [(None, "the datalist is empty; add at least one row (image, patient_id, label)")])

    allowed = None if labels is None else [str(x) for x in labels]
    records: list[dict] = []
    seen_images: dict[str, int] = {}
    for offset, raw in enumerate(rows):
        row = first_row + offset
        if not isinstance(raw, Mapping):
            problems.append((row, f"expected a record with keys {list(REQUIRED_KEYS)}, got {type(raw).__name__}"))
            continue
        row_problems: list[str] = []
        missing = [k for k in REQUIRED_KEYS if _is_blank(raw.get(k))]
        if missing:
            row_problems.append(f"missing value(s) for {missing}; fill them in or remove the row")
        record: dict[str, Any] = {}
        image = raw.get("image")
        if not _is_blank(image):
            if not isinstance(image, (str, os.PathLike)):
                row_problems.append(f"image must be a path string, got {image!r}")
            else:
                image_path = Path(os.fspath(image)).expanduser()
                if not image_path.is_absolute():
                    image_path = base / image_path
                image_path = Path(os.path.normpath(image_path.absolute()))
                record["image"] = str(image_path)
                if check_files:
                    file_problem = _check_image_path(image_path)
                    if file_problem:
                        row_problems.append(
                            f"{file_problem}: {image_path}; fix the path (relative paths are resolved against "
                            f"{base}) or remove the row"
                        )
                if record["image"] in seen_images:
                    first = seen_images[record["image"]]
                    row_problems.append(
                        f"duplicate of row {first} (same image {record['image']}); keep one row per image"
                    )
                else:
                    seen_images[record["image"]] = row
        if not _is_blank(raw.get("patient_id")):
            record["patient_id"] = _as_id(raw["patient_id"])
        if not _is_blank(raw.get("label")):
            label = _as_id(raw["label"])
            record["label"] = label
            if allowed is not None and label not in allowed:
                row_problems.append(f"unknown label {label!r}; use one of {allowed} or fix the label")
        for key, value in raw.items():
            if key in REQUIRED_KEYS or key is None or (key == "" and _is_blank(value)):
                continue  # an unnamed, empty column (trailing comma from a spreadsheet) carries nothing
            number = _finite_number(value)
            if number is None:
                row_problems.append(
                    f"extra condition {key!r} = {value!r} is not a number; extra columns are numeric conditions, "
                    "so encode it as a number or drop the column"
                )
            else:
                record[str(key)] = number
        if row_problems:
            problems.extend((row, p) for p in row_problems)
        else:
            records.append(record)
    if problems:
        raise DatalistError(source, problems, line_offset=line_offset)
    return records


def datalist_fingerprint(records: Iterable[Mapping[str, Any]]) -> str:
    """A sha256 that changes whenever the cohort a model or index was built from changes.

    It covers the image path, patient id, label, the extra conditions and the size and modification time of
    each image (for a DICOM series folder: of every file in it), sorted so the row order does not matter. A
    privacy index compares it with the current datalist to refuse serving stale neighbours.

    Args:
        records: records as returned by :func:`load_datalist`.

    Returns:
        Hex digest.
    """
    return _records_digest(
        records,
        lambda rec, extras: [
            str(rec["image"]),
            str(rec["patient_id"]),
            str(rec["label"]),
            extras,
            _file_stamp(rec["image"]),
        ],
    )


def _records_digest(records: Iterable[Mapping[str, Any]], key: Any) -> str:
    """sha256 over one JSON line per record, ``key(record, its extra conditions)``, sorted so order does not matter."""
    entries = []
    for rec in records:
        extras = sorted((str(k), repr(float(v))) for k, v in rec.items() if k not in REQUIRED_KEYS)
        entries.append(json.dumps(key(rec, extras)))
    digest = hashlib.sha256()
    for entry in sorted(entries):
        digest.update(entry.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def content_fingerprint(records: Iterable[Mapping[str, Any]]) -> str:
    """A sha256 of what a model learns from a split: the bytes of every image with its patient, label and extras.

    Unlike :func:`datalist_fingerprint` it does not depend on where the files are or when they were copied, so a
    dataset or output folder that is moved or copied keeps its fingerprint, while any changed, added or removed
    image, label or patient changes it. Checkpoints carry it to tie each stage to the split it trained on.

    Args:
        records: records as returned by :func:`load_datalist`.

    Returns:
        Hex digest.
    """
    return _records_digest(
        records, lambda rec, extras: [str(rec["patient_id"]), str(rec["label"]), extras, _content_hash(rec["image"])]
    )


def _content_hash(image: str) -> str:
    path = Path(image)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _read_csv(path: Path) -> tuple[list[dict], list[str], int]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = []
            for raw in reader:
                row = {}
                for k, v in raw.items():
                    key = k.strip() if isinstance(k, str) else k
                    if key is None:  # more cells than header columns
                        row["<unnamed extra cell>"] = ",".join(v) if isinstance(v, list) else v
                    else:
                        row[key] = v.strip() if isinstance(v, str) else v
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatalistError(
            str(path), [(None, f"cannot read the CSV ({e}); save it as UTF-8 CSV with a header")]
        ) from e
    return rows, columns, 1


def _read_json(path: Path, key: str) -> tuple[list, None, int]:
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatalistError(str(path), [(None, f"cannot parse the JSON ({e}); fix the syntax")]) from e
    if isinstance(content, list):
        return content, None, 1
    if not isinstance(content, dict) or key not in content:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DatalistError(
            str(path), [(None, f"no {key!r} list in the JSON datalist (found {found}); use {{{key!r}: [...]}}")]
        )
    rows = content[key]
    if not isinstance(rows, list):
        raise DatalistError(str(path), [(None, f"{key!r} must be a list of records, got {type(rows).__name__}")])
    return rows, None, 1


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _as_id(value: Any) -> str:
    """Ids and labels are strings; JSON may give ``3`` or ``3.0`` for BI-RADS 3, both mean ``"3"``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or _is_blank(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _check_image_path(path: Path) -> str | None:
    """Return what is wrong with an image path, or ``None`` when it looks loadable."""
    if not path.exists():
        return "image file not found"
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            return "image folder is not readable (check permissions)"
        files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
        if not files:
            return "image folder is empty (a DICOM series folder must hold its slice files)"
        if not any(is_dicom(p) for p in files[:64]):
            return "image folder holds no DICOM files (only a DICOM series may be given as a folder)"
        return None
    if not os.access(path, os.R_OK):
        return "image file is not readable (check permissions)"
    if path.stat().st_size == 0:
        return "image file is empty"
    return _check_header(path)


def _check_header(path: Path) -> str | None:
    """Cheap signature check of the formats we can recognise from a few bytes (catches truncated / wrong files)."""
    name = path.name.lower()
    try:
        if name.endswith(".nii.gz"):
            with gzip.open(path, "rb") as f:
                head = f.read(4)
        else:
            with open(path, "rb") as f:
                head = f.read(132)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        return f"image file cannot be read ({e})"
    if name.endswith((".nii", ".nii.gz")):
        sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
        return None if sizes & {348, 540} else "image file is not a valid NIfTI file (bad header)"
    if name.endswith(".png"):
        return None if head.startswith(b"\x89PNG\r\n\x1a\n") else "image file is not a valid PNG file"
    if name.endswith((".jpg", ".jpeg")):
        return None if head.startswith(b"\xff\xd8") else "image file is not a valid JPEG file"
    if name.endswith((".dcm", ".dicom")):
        ok = head[128:132] == b"DICM"
        return None if ok else "image file is not a DICOM Part 10 file (no 'DICM' preamble); re-save it as DICOM"
    return None


def _file_stamp(image: str) -> list:
    path = Path(image)
    if path.is_dir():
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()]
    if path.exists():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    return ["missing"]
