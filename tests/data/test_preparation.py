"""Which datalist a bundle run trains on, and its validated patient-level splits."""

from __future__ import annotations

import csv
import logging

import pytest

from monai_synth.data.datalist import DatalistError
from monai_synth.data.preparation import load_splits, prepare_datalist

LABELS = ["3", "4a", "4b", "4c", "5"]


def test_a_dataset_dir_without_a_datalist_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no datalist.csv or datalist.json"):
        prepare_datalist(tmp_path, tmp_path / "run", "us")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_datalist(None, tmp_path / "run", "us", datalist=tmp_path / "missing.csv")


def test_no_dataset_writes_one_phantom_cohort_and_reuses_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="monai_synth.data.preparation"):
        first = prepare_datalist(
            None, tmp_path, "us", phantom_patients=6, phantom_images_per_patient=1, phantom_size=16
        )
    assert "PHANTOM" in caplog.text
    stamp = (tmp_path / "phantom_cohort" / "datalist.csv").stat().st_mtime_ns
    again = prepare_datalist(None, tmp_path, "us", phantom_patients=99, phantom_size=16)
    assert again == first and (tmp_path / "phantom_cohort" / "datalist.csv").stat().st_mtime_ns == stamp


def test_splits_are_patient_level_and_too_few_patients_are_refused(tmp_path):
    datalist = prepare_datalist(
        None, tmp_path, "us", phantom_patients=10, phantom_images_per_patient=2, phantom_size=16
    )
    splits = load_splits(datalist, LABELS, holdout_fraction=0.2, val_fraction=0.1)
    patients = {name: {r["patient_id"] for r in records} for name, records in splits.items()}
    assert not (patients["train"] & patients["holdout"]) and not (patients["train"] & patients["val"])
    assert splits == load_splits(datalist, LABELS, holdout_fraction=0.2, val_fraction=0.1)  # same split every stage
    rows = list(csv.DictReader(open(datalist, newline="")))
    two = tmp_path / "phantom_cohort" / "two_patients.csv"
    with open(two, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["patient_id"] in sorted({r["patient_id"] for r in rows})[:2])
    with pytest.raises(DatalistError, match="needs at least 3"):
        load_splits(two, LABELS, holdout_fraction=0.2, val_fraction=0.1)
