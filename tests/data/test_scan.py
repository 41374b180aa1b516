"""`monai-synth datalist`: from a folder of DICOM series / NIfTI / 2D images and a labels CSV to a bundle datalist."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from monai_synth.cli import main
from monai_synth.data.datalist import DatalistError, load_datalist
from monai_synth.data.loading import load_image
from monai_synth.data.phantoms import write_cohort
from monai_synth.data.preparation import load_splits
from monai_synth.data.scan import scan_folder

CT = ["normal", "nodule"]


def _labels(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def export(tmp_path):
    """A hospital-like DICOM export: two patients' series mixed in one folder, one in its own, plus an RT dose."""
    cohort = write_cohort(
        tmp_path / "cohort",
        modality="ct",
        n_patients=3,
        images_per_patient=1,
        spatial_dims=3,
        spatial_size=[16, 16, 6],
        fmt="dicom",
    )
    src = Path(cohort).parent / "images"
    root = tmp_path / "export"
    (root / "study").mkdir(parents=True)
    for patient in ("P0000", "P0001"):
        for f in sorted((src / f"{patient}_s0").iterdir()):
            shutil.copy(f, root / "study" / f"{patient}_{f.name}")
    shutil.copytree(src / "P0002_s0", root / "P0002" / "ct")
    shutil.copy(get_testdata_file("rtdose.dcm"), root / "study" / "dose.dcm")
    rows = list(csv.DictReader(open(cohort)))
    labels = _labels(
        tmp_path / "labels.csv",
        [{"patient_id": r["patient_id"], "label": r["label"], "age": str(40 + i)} for i, r in enumerate(rows)],
    )
    return {"root": root, "labels": labels, "cohort": Path(cohort), "rows": rows}


def test_series_are_grouped_by_uid_and_joined_to_their_labels(export, tmp_path):
    summary = scan_folder(export["root"], export["labels"], tmp_path / "data", labels=CT)
    records = load_datalist(summary["datalist"], labels=CT)
    assert summary["images"] == 3 and summary["patients"] == 3
    assert [s.split(" ")[0] for s in summary["skipped"]] == ["study/dose.dcm"]
    by_patient = {r["patient_id"]: r for r in records}
    assert {p: r["label"] for p, r in by_patient.items()} == {r["patient_id"]: r["label"] for r in export["rows"]}
    assert by_patient["P0001"]["age"] == 41.0
    for row in export["rows"]:  # each record loads as its patient's own volume, slices in order
        image = load_image(by_patient[row["patient_id"]]["image"])
        expected = load_image(export["cohort"].parent / row["image"])
        assert image.shape == (1, 16, 16, 6)
        np.testing.assert_array_equal(image, expected)
    # the series sharing a folder got folders of their own; the one alone in its folder is used in place
    assert Path(by_patient["P0002"]["image"]) == export["root"] / "P0002" / "ct"
    assert Path(by_patient["P0000"]["image"]).parent == tmp_path / "data" / "series"


def test_missing_slice_and_mixed_spacing_are_named(export, tmp_path):
    study = export["root"] / "study"
    (study / "P0000_slice_0003.dcm").unlink()
    ds = pydicom.dcmread(export["root"] / "P0002" / "ct" / "slice_0002.dcm")
    ds.PixelSpacing = [0.7, 0.7]
    ds.save_as(export["root"] / "P0002" / "ct" / "slice_0002.dcm")
    with pytest.raises(DatalistError) as info:
        scan_folder(export["root"], export["labels"], tmp_path / "data")
    message = str(info.value)
    assert len(info.value.problems) == 2
    assert "patient P0000" in message and "missing slices: about 1 slice(s)" in message
    assert "patient P0002" in message and "mixed spacing" in message
    assert not (tmp_path / "data" / "datalist.csv").exists()


def test_uneven_slice_gaps_are_mixed_spacing(export, tmp_path):
    path = export["root"] / "P0002" / "ct" / "slice_0005.dcm"
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 15.0]
    ds.save_as(path)
    with pytest.raises(DatalistError, match=r"patient P0002.*mixed spacing: slice gaps"):
        scan_folder(export["root"], export["labels"], tmp_path / "data")


def test_patients_without_labels_are_all_named(export, tmp_path):
    labels = _labels(tmp_path / "partial.csv", [{"patient_id": "P0001", "label": "nodule"}])
    with pytest.raises(DatalistError) as info:
        scan_folder(export["root"], labels, tmp_path / "data")
    assert [m.split("'")[1] for _, m in info.value.problems] == ["P0000", "P0002"]
    assert "has no label" in str(info.value)


def test_unknown_label_is_refused(export, tmp_path):
    rows = list(csv.DictReader(open(export["labels"])))
    rows[0]["label"] = "tumour"
    labels = _labels(tmp_path / "bad.csv", rows)
    with pytest.raises(DatalistError, match="unknown label 'tumour'"):
        scan_folder(export["root"], labels, tmp_path / "data", labels=CT)


def test_slices_keep_values_geometry_and_patient(export, tmp_path):
    summary = scan_folder(export["root"], export["labels"], tmp_path / "data", slices=True, slice_step=2)
    records = load_datalist(summary["datalist"])
    assert len(records) == 3 * 3  # slices 0, 2, 4 of three volumes
    p1 = [r for r in records if r["patient_id"] == "P0001"]
    volume = load_image(export["cohort"].parent / "images" / "P0001_s0")
    for k, rec in zip((0, 2, 4), p1):
        np.testing.assert_array_equal(load_image(rec["image"])[0], volume[0, :, :, k])
    first, second = nib.load(p1[0]["image"]).affine, nib.load(p1[1]["image"]).affine
    np.testing.assert_allclose(np.abs(np.diag(first)[:3]), [25.0, 25.0, 50.0])  # the series' pixel and slice spacing
    np.testing.assert_allclose(second[:3, :3], first[:3, :3])
    np.testing.assert_allclose(second[:3, 3] - first[:3, 3], 2 * first[:3, 2])  # slice 2's own position


def test_nifti_volumes_take_the_patient_from_their_folder(tmp_path):
    root = tmp_path / "nifti"
    for patient in ("A", "B"):
        (root / patient).mkdir(parents=True)
        for visit in (1, 2):
            data = np.full((4, 5, 3), visit, np.float32)
            nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(root / patient / f"v{visit}.nii.gz"))
    labels = _labels(
        tmp_path / "labels.csv", [{"patient_id": "A", "label": "normal"}, {"patient_id": "B", "label": "lesion"}]
    )
    summary = scan_folder(root, labels, tmp_path / "data", spatial_dims=3)
    records = load_datalist(summary["datalist"])
    assert sorted((r["patient_id"], Path(r["image"]).name, r["label"]) for r in records) == [
        ("A", "v1.nii.gz", "normal"),
        ("A", "v2.nii.gz", "normal"),
        ("B", "v1.nii.gz", "lesion"),
        ("B", "v2.nii.gz", "lesion"),
    ]


def test_labels_keyed_by_image_and_a_truncated_png_is_named(tmp_path):
    cohort = write_cohort(tmp_path / "us", modality="us", n_patients=3, images_per_patient=2, spatial_size=16)
    rows = list(csv.DictReader(open(cohort)))
    root = Path(cohort).parent / "images"
    labels = _labels(
        tmp_path / "labels.csv",
        [{"image": Path(r["image"]).name, "patient_id": r["patient_id"], "label": r["label"]} for r in rows],
    )
    summary = scan_folder(root, labels, tmp_path / "ok", labels=["3", "4a", "4b", "4c", "5"])
    assert summary["images"] == 6 and summary["patients"] == 3
    bad = root / Path(rows[1]["image"]).name
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(DatalistError, match=rf"{bad.name} cannot be decoded"):
        scan_folder(root, labels, tmp_path / "bad")


def test_cli_writes_a_datalist_the_bundle_splits(export, tmp_path, capsys):
    out = tmp_path / "data"
    code = main(
        [
            "datalist",
            "--images",
            str(export["root"]),
            "--labels",
            str(export["labels"]),
            "--out",
            str(out),
            "--modality",
            "ct",
            "--slices",
        ]
    )
    assert code == 0 and "18 images of 3 patients" in capsys.readouterr().out
    splits = load_splits(out / "datalist.csv", CT, holdout_fraction=0.34, val_fraction=0.0)
    assert {len({r["patient_id"] for r in s}) for s in (splits["train"], splits["holdout"])} == {1, 2}
    assert (
        main(["datalist", "--images", str(export["root"]), "--labels", str(export["labels"]), "--out", str(out)]) == 2
    )
    assert "exists" in capsys.readouterr().err
