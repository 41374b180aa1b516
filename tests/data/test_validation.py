"""Every image of every split is decoded before training; every unusable file is named in one message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from monai_synth.data import validation
from monai_synth.data.datalist import DatalistError, load_datalist
from monai_synth.data.phantoms import write_cohort
from monai_synth.data.validation import STAMP_NAME, check_image, check_split_images


@pytest.fixture
def splits(tmp_path):
    datalist = write_cohort(tmp_path / "cohort", modality="us", n_patients=4, images_per_patient=2, spatial_size=16)
    records = load_datalist(datalist)
    return {"train": records[:4], "val": records[4:6], "holdout": records[6:]}


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def test_good_splits_pass_and_are_returned_unchanged(splits, tmp_path):
    assert check_split_images(splits, "datalist.csv", stamp_dir=tmp_path / "run", spatial_dims=2) is splits
    assert json.loads((tmp_path / "run" / STAMP_NAME).read_text())["images"] == 8


def test_every_bad_file_is_named_with_its_split(splits, tmp_path):
    _truncate(splits["train"][1]["image"])
    dose = tmp_path / "dose.dcm"
    shutil.copy(get_testdata_file("rtdose.dcm"), dose)
    splits["holdout"][0] = {**splits["holdout"][0], "image": str(dose)}
    with pytest.raises(DatalistError) as info:
        check_split_images(splits, "datalist.csv", stamp_dir=tmp_path / "run")
    message = str(info.value)
    assert len(info.value.problems) == 2
    assert f"train split, patient {splits['train'][1]['patient_id']}" in message
    assert splits["train"][1]["image"] in message and "truncated" in message
    assert "holdout split" in message and "dose.dcm is an RT dose grid" in message
    assert len(message.splitlines()) == 3  # one header and one line per file, no traceback
    assert not (tmp_path / "run" / STAMP_NAME).exists()


def test_a_passed_check_is_not_repeated_until_a_file_changes(splits, tmp_path, monkeypatch):
    run = tmp_path / "run"
    check_split_images(splits, stamp_dir=run)
    decoded = []
    real = validation.load_image
    monkeypatch.setattr(validation, "load_image", lambda p: decoded.append(p) or real(p))
    check_split_images(splits, stamp_dir=run)
    assert decoded == []
    _truncate(splits["val"][0]["image"])  # size and mtime change the fingerprint
    with pytest.raises(DatalistError, match="val split"):
        check_split_images(splits, stamp_dir=run)
    assert len(decoded) == 8


def test_only_rank_zero_writes_the_stamp(splits, tmp_path):
    check_split_images(splits, stamp_dir=tmp_path / "run", rank=1)
    assert not (tmp_path / "run").exists()


def test_a_volume_in_a_2d_bundle_is_named(tmp_path):
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), str(path))
    assert "3 spatial axes" in check_image(path, spatial_dims=2)
    assert check_image(path, spatial_dims=3) is None


def test_non_finite_values_are_named(tmp_path):
    path = tmp_path / "nan.nii.gz"
    data = np.zeros((8, 8), np.float32)
    data[2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    assert "NaN" in check_image(path) and str(path) in check_image(path)
