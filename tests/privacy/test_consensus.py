"""The consensus test: an image whose nearest training image belongs to the same patient in most spaces is refused.

Each space compares differently, so a new patient's image has a different nearest training patient in most of them;
a near-copy altered until it sits as far from its source as new patients do in every space still has its source
nearest in most (PET phantom slices warped by 4 px: 8-10 of 13 spaces, new patients' images 2-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.privacy import safeguard as safeguard_module
from monai_synth.privacy.partial import PartSpace
from monai_synth.privacy.ranks import RankSpace
from monai_synth.privacy.safeguard import PrivacySafeguard, build_safeguard
from monai_synth.privacy.spaces import PixelSpace
from tests.privacy.test_cross_patient import _us_split


def test_the_count_is_the_least_that_at_most_the_share_of_calibration_images_reach():
    rng = np.random.default_rng(0)
    patients = rng.integers(0, 50, size=(400, 6)).astype(object)  # nearest patients at random: agreement 1-2
    patients[:2] = 7  # two images name one patient in all six spaces
    patients[2:6, :4] = 9  # four in four of them
    assert safeguard_module._consensus_within_share(patients, 0.005) == 5  # 6 images reach 4 (1.5%), 2 reach 5
    assert safeguard_module._consensus_within_share(patients, 0.02) == 4
    assert safeguard_module._consensus_within_share(patients, 0.0) == 0  # even six of six is reached: off


def test_it_refuses_noised_copies_whose_source_stays_nearest_in_every_space():
    # ultrasound slices under speckle-like noise (sd 0.5) come no closer to their source than new patients' images
    # come to the training set, so the thresholds release most of them; their source is still nearest in every space
    train, ids, holdout, holdout_ids, new = _us_split(40, 40, 60, 1, seed=3)
    spaces = [PixelSpace(grid=16), RankSpace(grid=16), PartSpace(grid=16, kind="crops"), PartSpace(grid=16)]
    plain = build_safeguard(spaces, train, ids, holdout, holdout_ids, "dl", batch_size=32, specificity=0, consensus=0)
    assert plain.consensus == 0
    checks = [(plain.indexes[n], plain.calibrations[n]) for n in plain.indexes]
    gate = PrivacySafeguard(checks, batch_size=32, consensus=4)
    copies = train[:60] + 0.5 * torch.randn(60, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    released_plain = sum(r.passed for r in plain.check(copies))
    judged = gate.check(copies)
    assert released_plain >= 45 and sum(r.passed for r in judged) <= released_plain - 20
    assert any("the same training patient is nearest in 4 of 4 spaces" in (r.reason or "") for r in judged)
    assert sum(r.passed for r in gate.check(new)) >= sum(r.passed for r in plain.check(new)) - 2


def test_build_safeguard_calibrates_it_on_the_calibration_images(monkeypatch):
    train, ids, holdout, holdout_ids, _ = _us_split(40, 40, 1, 1, seed=3)
    spaces = [PixelSpace(grid=16), RankSpace(grid=16), PartSpace(grid=16, kind="crops"), PartSpace(grid=16)]
    args = (spaces, train, ids, holdout, holdout_ids, "dl")
    # 6 of 240 calibration images (2.5%) name one training patient in all four spaces here: the default share, 0.5%,
    # leaves the test off; a share of 5% allows four of four
    assert build_safeguard(*args, batch_size=32, specificity=0).consensus == 0
    monkeypatch.setattr(safeguard_module, "CONSENSUS_SHARE", 0.05)
    gate = build_safeguard(*args, batch_size=32, specificity=0)
    assert gate.consensus == 4
    refused = sum("the same training patient" in (r.reason or "") for r in gate.check(holdout))
    assert refused <= 0.05 * 240
    three = build_safeguard(spaces[:3], train, ids, holdout, holdout_ids, "dl", batch_size=32, specificity=0)
    assert three.consensus == 0  # fewer than CONSENSUS_MIN_SPACES spaces: off
    assert build_safeguard(*args, batch_size=32, specificity=0, consensus=3).consensus == 3  # explicit: as given


@pytest.mark.parametrize("count", [1, 2, -1])
def test_a_count_outside_two_to_the_number_of_spaces_is_refused(count):
    train, ids, holdout, holdout_ids, _ = _us_split(30, 34, 1, 1, seed=0)
    gate = build_safeguard([PixelSpace(grid=16)], train, ids, holdout, holdout_ids, "dl", batch_size=32)
    with pytest.raises(ValueError, match="consensus must be 0"):  # one space: no count can mean anything
        PrivacySafeguard([(gate.indexes["pixel"], gate.calibrations["pixel"])], consensus=count)
