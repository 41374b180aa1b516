"""Patient-level splits: disjoint, reproducible, stratified."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from monai_synth.data.datalist import DatalistError
from monai_synth.data.splits import check_disjoint, split_by_patient


def _records(n_patients=20, per_patient=3, labels=("normal", "lesion")):
    return [
        {"image": f"/data/p{p}_{i}.nii.gz", "patient_id": f"P{p:04d}", "label": labels[p % len(labels)]}
        for p in range(n_patients)
        for i in range(per_patient)
    ]


def _patients(recs):
    return {r["patient_id"] for r in recs}


def test_patients_never_in_two_splits_and_nothing_lost():
    records = _records(25)
    splits = split_by_patient(records, holdout_fraction=0.2, val_fraction=0.2, seed=3)
    assert set(splits) == {"train", "holdout", "val"}
    train, hold, val = (_patients(splits[k]) for k in ("train", "holdout", "val"))
    assert not (train & hold) and not (train & val) and not (hold & val)
    assert sum(len(v) for v in splits.values()) == len(records)
    assert (len(train), len(hold), len(val)) == (15, 5, 5)


def test_reproducible_from_seed_and_independent_of_order():
    records = _records(30)
    first = split_by_patient(records, seed=7)
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    again = split_by_patient(shuffled, seed=7)
    assert _patients(first["holdout"]) == _patients(again["holdout"])
    other = [_patients(split_by_patient(records, seed=s)["holdout"]) for s in range(8, 12)]
    assert any(o != _patients(first["holdout"]) for o in other)


def test_stratified_by_label():
    labels = ("3", "4a", "4b", "4c", "5")
    splits = split_by_patient(_records(50, 2, labels), holdout_fraction=0.2, seed=1)
    holdout_labels = Counter(r["label"] for r in splits["holdout"])
    # 10 holdout patients over 5 balanced labels: two of each, two images per patient
    assert holdout_labels == {lbl: 4 for lbl in labels}


def test_every_requested_split_gets_a_patient():
    splits = split_by_patient(_records(3), holdout_fraction=0.05, val_fraction=0.05, seed=0)
    assert all(len(_patients(v)) == 1 for v in splits.values())
    no_holdout = split_by_patient(_records(3), holdout_fraction=0.0)
    assert no_holdout["holdout"] == [] and "val" not in no_holdout


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(DatalistError, match="only 2 patient.*needs at least 3"):
        split_by_patient(_records(2), holdout_fraction=0.2, val_fraction=0.2)


@pytest.mark.parametrize("hold,val", [(-0.1, 0.0), (1.0, 0.0), (0.6, 0.5)])
def test_bad_fractions(hold, val):
    with pytest.raises(ValueError):
        split_by_patient(_records(10), holdout_fraction=hold, val_fraction=val)


def test_check_disjoint_names_shared_patients():
    splits = {
        "train": [{"patient_id": "A"}, {"patient_id": "B"}],
        "holdout": [{"patient_id": "B"}, {"patient_id": "C"}],
        "val": [{"patient_id": "C"}, {"patient_id": "D"}],
    }
    with pytest.raises(DatalistError) as err:
        check_disjoint(splits)
    msg = str(err.value)
    assert "'B' is in splits ['holdout', 'train']" in msg and "'C' is in splits ['holdout', 'val']" in msg
    assert "'A'" not in msg and "'D'" not in msg
    check_disjoint({"train": splits["train"], "val": splits["val"]})  # disjoint: no error
