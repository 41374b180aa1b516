"""calibrate_threshold: the holdout quantile, the floor, and the refusals that keep it meaningful."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.privacy.calibration import Calibration, calibrate_threshold, min_holdout_size
from monai_synth.privacy.index import TrainingIndex
from monai_synth.privacy.spaces import PixelSpace, space_distance


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(80, 1, 8, 8, generator=g)
    holdout = torch.randn(120, 1, 8, 8, generator=g)
    space = PixelSpace(grid=8)
    index = TrainingIndex.build(space, train, [f"T{i // 2}" for i in range(80)], "dl")
    return space, index, train, holdout


def test_threshold_is_the_holdout_quantile_of_nearest_distances(setup):
    space, index, train, holdout = setup
    cal = calibrate_threshold(index, holdout, quantile=0.05, holdout_patient_ids=[f"H{i}" for i in range(120)])
    nn = space_distance(space.embed(holdout), space.embed(train)).min(axis=1)  # numpy, no FAISS
    assert cal.threshold == pytest.approx(np.quantile(nn, 0.05), abs=1e-5)
    assert np.mean(nn < cal.threshold) == pytest.approx(0.05, abs=1 / 120)
    assert cal.n_holdout == 120 and cal.n_holdout_patients == 120 and cal.space == "pixel"
    assert cal.summary["min"] == pytest.approx(nn.min(), abs=1e-5)
    assert cal.index_fingerprint == index.fingerprint


def test_floor_wins_when_larger(setup):
    _, index, _, holdout = setup
    ids = [f"H{i}" for i in range(120)]
    cal = calibrate_threshold(index, holdout, quantile=0.01, floor=1.5, holdout_patient_ids=ids)
    assert cal.threshold == 1.5 and cal.quantile_value < 1.5 and cal.floor == 1.5


def test_vectors_give_the_same_answer_as_images(setup):
    space, index, _, holdout = setup
    ids = [f"H{i}" for i in range(120)]
    a = calibrate_threshold(index, holdout, quantile=0.02, holdout_patient_ids=ids)
    b = calibrate_threshold(index, holdout_vectors=space.embed(holdout), quantile=0.02, holdout_patient_ids=ids)
    assert a.threshold == pytest.approx(b.threshold, abs=1e-6)


def test_round_trip_through_dict(setup):
    _, index, _, holdout = setup
    cal = calibrate_threshold(index, holdout, holdout_patient_ids=[f"H{i}" for i in range(120)])
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_holdout_patients_seen_in_training_are_refused(setup):
    _, index, _, holdout = setup
    ids = [f"H{i}" for i in range(118)] + ["T3", "T7"]
    with pytest.raises(ValueError, match=r"2 holdout patients are also training patients \(\['T3', 'T7'\]\)"):
        calibrate_threshold(index, holdout, holdout_patient_ids=ids)


def test_too_few_holdout_images_says_how_many_are_needed(setup):
    _, index, _, holdout = setup
    with pytest.raises(ValueError, match="at least 100 are needed"):
        calibrate_threshold(index, holdout[:99], quantile=0.01, holdout_patient_ids=[f"H{i}" for i in range(99)])
    assert min_holdout_size(0.01) == 100 and min_holdout_size(0.05) == 20


def test_missing_patient_ids_warn(setup):
    _, index, _, holdout = setup
    with pytest.warns(UserWarning, match="cannot check"):
        calibrate_threshold(index, holdout)


@pytest.mark.parametrize("kwargs", [{"quantile": 0.0}, {"quantile": 0.7}, {"floor": -0.1}, {"floor": float("nan")}])
def test_bad_settings_fail_early(setup, kwargs):
    _, index, _, holdout = setup
    with pytest.raises(ValueError):
        calibrate_threshold(index, holdout, **kwargs)
