"""Datalist reading and validation: one error naming every bad row."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from monai_synth.data.datalist import DatalistError, datalist_fingerprint, load_datalist

US_LABELS = ("3", "4a", "4b", "4c", "5")


def _touch_image(path, value=0):
    """A small real NIfTI file, so the rows point at loadable images."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 4), value, np.float32), np.eye(4)), str(path))
    return path


def _write_csv(path, rows, header=("image", "patient_id", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_resolves_relative_paths_and_parses_extras(tmp_path):
    _touch_image(tmp_path / "img" / "a.nii.gz")
    _touch_image(tmp_path / "img" / "b.nii.gz")
    dl = _write_csv(
        tmp_path / "list.csv",
        [["img/a.nii.gz", "P1", "4a", "55"], ["img/b.nii.gz", "P2", "3", "61.5"]],
        header=("image", "patient_id", "label", "age"),
    )
    records = load_datalist(dl, labels=US_LABELS)
    assert [r["image"] for r in records] == [str(tmp_path / "img" / "a.nii.gz"), str(tmp_path / "img" / "b.nii.gz")]
    assert records[0]["label"] == "4a" and records[1]["patient_id"] == "P2"
    assert records[1]["age"] == pytest.approx(61.5) and isinstance(records[0]["age"], float)


def test_trailing_empty_column_is_ignored(tmp_path):
    _touch_image(tmp_path / "a.nii.gz")
    (tmp_path / "list.csv").write_text("image,patient_id,label,\na.nii.gz,P1,3,\n")
    assert load_datalist(tmp_path / "list.csv") == [
        {"image": str(tmp_path / "a.nii.gz"), "patient_id": "P1", "label": "3"}
    ]


def test_monai_json_datalist(tmp_path):
    _touch_image(tmp_path / "a.nii.gz")
    (tmp_path / "sub").mkdir()
    dl = tmp_path / "sub" / "datalist.json"
    dl.write_text(
        json.dumps({"training": [{"image": "../a.nii.gz", "patient_id": 7, "label": 3}], "testing": [{"image": "x"}]})
    )
    (record,) = load_datalist(dl, labels=US_LABELS)
    assert record == {"image": str(tmp_path / "a.nii.gz"), "patient_id": "7", "label": "3"}


def test_missing_files_name_every_row(tmp_path):
    _touch_image(tmp_path / "ok.nii.gz")
    dl = _write_csv(
        tmp_path / "list.csv",
        [["ok.nii.gz", "P1", "3"], ["gone.nii.gz", "P2", "3"], ["ok2.nii.gz", "P3", "5"]],
    )
    with pytest.raises(DatalistError) as err:
        load_datalist(dl)
    assert err.value.rows == [2, 3]
    msg = str(err.value)
    assert "row 2 (line 3)" in msg and "row 3 (line 4)" in msg and "row 1" not in msg
    assert "not found" in msg and "gone.nii.gz" in msg and "fix the path" in msg


def test_unknown_label_lists_allowed_labels(tmp_path):
    _touch_image(tmp_path / "a.nii.gz")
    _touch_image(tmp_path / "b.nii.gz")
    dl = _write_csv(tmp_path / "list.csv", [["a.nii.gz", "P1", "4a"], ["b.nii.gz", "P2", "6"]])
    with pytest.raises(DatalistError) as err:
        load_datalist(dl, labels=US_LABELS)
    assert err.value.rows == [2]
    assert "unknown label '6'" in str(err.value) and "'4c'" in str(err.value)
    assert len(load_datalist(dl)) == 2  # without a label set any label is accepted


def test_duplicate_rows_point_at_the_first(tmp_path):
    _touch_image(tmp_path / "a.nii.gz")
    _touch_image(tmp_path / "b.nii.gz")
    dl = _write_csv(
        tmp_path / "list.csv",
        [["a.nii.gz", "P1", "3"], ["b.nii.gz", "P1", "3"], [str(tmp_path / "a.nii.gz"), "P2", "3"]],
    )
    with pytest.raises(DatalistError) as err:
        load_datalist(dl)
    assert err.value.rows == [3]
    assert "duplicate of row 1" in str(err.value)


def test_missing_required_column(tmp_path):
    dl = _write_csv(tmp_path / "list.csv", [["a.nii.gz", "3"]], header=("image", "label"))
    with pytest.raises(DatalistError, match=r"missing required column\(s\) \['patient_id'\]"):
        load_datalist(dl)


def test_missing_values_in_a_row(tmp_path):
    _touch_image(tmp_path / "a.nii.gz")
    dl = _write_csv(tmp_path / "list.csv", [["a.nii.gz", "", "3"]])
    with pytest.raises(DatalistError, match=r"row 1 .*missing value\(s\) for \['patient_id'\]"):
        load_datalist(dl)


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_empty_list(tmp_path, kind):
    if kind == "csv":
        dl = _write_csv(tmp_path / "list.csv", [])
    else:
        dl = tmp_path / "list.json"
        dl.write_text(json.dumps({"training": []}))
    with pytest.raises(DatalistError, match="empty"):
        load_datalist(dl)


def test_non_numeric_extra(tmp_path):
    _touch_image(tmp_path / "a.nii.gz")
    _touch_image(tmp_path / "b.nii.gz")
    dl = _write_csv(
        tmp_path / "list.csv",
        [["a.nii.gz", "P1", "3", "12"], ["b.nii.gz", "P2", "3", "large"]],
        header=("image", "patient_id", "label", "size_mm"),
    )
    with pytest.raises(DatalistError) as err:
        load_datalist(dl)
    assert err.value.rows == [2]
    assert "'size_mm' = 'large' is not a number" in str(err.value)


def test_unreadable_inputs(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty_series").mkdir()
    (tmp_path / "not_dicom").mkdir()
    (tmp_path / "not_dicom" / "notes.txt").write_text("hello")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "truncated.nii.gz").write_bytes(b"\x1f\x8b\x08")
    (tmp_path / "plain.nii").write_bytes(b"\x00" * 400)
    (tmp_path / "raw.dcm").write_bytes(b"\x00" * 200)
    names = ["empty.png", "empty_series", "not_dicom", "text.png", "truncated.nii.gz", "plain.nii", "raw.dcm"]
    dl = _write_csv(tmp_path / "list.csv", [[n, f"P{i}", "3"] for i, n in enumerate(names)])
    with pytest.raises(DatalistError) as err:
        load_datalist(dl)
    msg = str(err.value)
    assert err.value.rows == list(range(1, 8))
    assert "image file is empty" in msg and "image folder is empty" in msg and "holds no DICOM files" in msg
    assert "not a valid PNG" in msg and "cannot be read" in msg and "not a valid NIfTI" in msg
    assert "no 'DICM' preamble" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_permissions(tmp_path):
    img = _touch_image(tmp_path / "a.nii.gz")
    img.chmod(0)
    dl = _write_csv(tmp_path / "list.csv", [["a.nii.gz", "P1", "3"]])
    try:
        with pytest.raises(DatalistError, match="not readable"):
            load_datalist(dl)
    finally:
        img.chmod(0o644)


def test_dicom_series_folder_is_accepted(tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    series = tmp_path / "series"
    series.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), series / "1.dcm")
    dl = _write_csv(tmp_path / "list.csv", [["series", "P1", "nodule"]])
    assert load_datalist(dl, labels=("normal", "nodule"))[0]["image"] == str(series)


def test_all_problems_in_one_error(tmp_path):
    _touch_image(tmp_path / "a.nii.gz")
    dl = _write_csv(
        tmp_path / "list.csv",
        [["a.nii.gz", "P1", "3"], ["missing.nii.gz", "P2", "3"], ["a.nii.gz", "P3", "9"]],
    )
    with pytest.raises(DatalistError) as err:
        load_datalist(dl, labels=US_LABELS)
    assert err.value.rows == [2, 3]
    assert len(err.value.problems) == 3  # missing file; duplicate + unknown label on row 3


def test_check_files_false_skips_existence(tmp_path):
    dl = _write_csv(tmp_path / "list.csv", [["later.nii.gz", "P1", "3"]])
    assert load_datalist(dl, check_files=False)[0]["image"] == str(tmp_path / "later.nii.gz")


def test_unsupported_and_missing_datalist(tmp_path):
    with pytest.raises(DatalistError, match="not found"):
        load_datalist(tmp_path / "nope.csv")
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(DatalistError, match="unsupported datalist type"):
        load_datalist(tmp_path / "list.txt")
    (tmp_path / "bad.json").write_text(json.dumps({"validation": []}))
    with pytest.raises(DatalistError, match="no 'training' list"):
        load_datalist(tmp_path / "bad.json")


def test_fingerprint_tracks_content_not_order(tmp_path):
    a = _touch_image(tmp_path / "a.nii.gz")
    _touch_image(tmp_path / "b.nii.gz")
    dl = _write_csv(tmp_path / "list.csv", [["a.nii.gz", "P1", "3"], ["b.nii.gz", "P2", "5"]])
    records = load_datalist(dl)
    fp = datalist_fingerprint(records)
    assert len(fp) == 64 and fp == datalist_fingerprint(list(reversed(records)))
    relabelled = [dict(records[0], label="4a"), records[1]]
    assert datalist_fingerprint(relabelled) != fp
    _touch_image(a, value=1)  # same path, new content (size and/or mtime change)
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert datalist_fingerprint(records) != fp
