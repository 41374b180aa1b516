"""Cross-patient calibration samples: training images measured against the other training patients join the holdout.

A holdout of a few hundred images cannot resolve the low per-space quantile that several spaces together need, so
each threshold sits at its smallest holdout distance and k spaces refuse about k / (n + 1) of new patients' images.
Leave-one-patient-out distances of training images are more samples of the same thing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.privacy import safeguard as safeguard_module
from monai_synth.privacy.calibration import (
    Calibration,
    _calibrate,
    _screen_duplicates,
    calibrate_threshold,
    cross_patient_rows,
    log_distance_ratio,
)
from monai_synth.privacy.index import TrainingIndex
from monai_synth.privacy.partial import PartSpace
from monai_synth.privacy.safeguard import DEFAULT_SPECIFICITY, PrivacySafeguard, build_safeguard
from monai_synth.privacy.spaces import PixelSpace, distance_floor, embed_variants


def _calibrate_with(index, holdout, holdout_ids, train, count, **kwargs):
    return _calibrate(
        index,
        holdout,
        0.01,
        0.0,
        holdout_patient_ids=holdout_ids,
        holdout_vectors=None,
        views=None,
        batch_size=16,
        duplicate_check=True,
        duplicate_z=5.0,
        duplicate_alpha=0.01,
        ci_level=0.95,
        training_images=train,
        cross_patient_images=count,
        **kwargs,
    )[:3]


def test_rows_are_taken_one_patient_at_a_time():
    codes = [0, 0, 0, 1, 1, 2, 3, 3]  # patients 0..3 hold 3, 2, 1, 2 images
    assert cross_patient_rows(codes, 4).tolist() == [0, 3, 5, 6]  # every patient's first image
    assert cross_patient_rows(codes, 2).tolist() == [0, 6]  # a partial round: patients spread over the index
    assert cross_patient_rows(codes, 6).tolist() == [0, 1, 3, 5, 6, 7]  # then second images, spread: patients 0, 3
    assert cross_patient_rows(codes, 6).tolist() != cross_patient_rows(codes, 7).tolist()
    assert cross_patient_rows(codes, 100).tolist() == list(range(8))
    assert cross_patient_rows(codes, 0).tolist() == []


def test_a_training_image_is_measured_against_the_other_patients_only():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(30, 1, 8, 8, generator=g)
    ids = [f"P{i // 3}" for i in range(30)]  # 10 patients, 3 images each
    space = PixelSpace(grid=8)
    index = TrainingIndex.build(space, train, ids, "dl")
    holdout = torch.rand(100, 1, 8, 8, generator=g)
    cal, holdout_d, cross = _calibrate_with(index, holdout, [f"H{i}" for i in range(100)], train, 30)

    vec = space.embed(train).astype(np.float64)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    dist = 1.0 - vec @ vec.T
    same = np.equal.outer(np.array(ids), np.array(ids))
    expected = np.where(same, np.inf, dist).min(axis=1)  # nearest image of another patient, never its own patient's
    assert cross.rows.tolist() == list(range(30))
    np.testing.assert_allclose(cross.distances, expected, atol=1e-5)
    assert not cross.flagged.any()
    pooled = np.sort(np.concatenate([holdout_d, expected]))
    assert cal.n_holdout == 100 and cal.n_cross_patient == 30 and cal.n_calibration == 130
    np.testing.assert_allclose(cal.holdout_distances, pooled, atol=1e-5)
    assert cal.quantile_value == pytest.approx(np.quantile(pooled, 0.01), abs=1e-5)
    # where a distance sits counts every calibration sample, and the record survives a certificate
    assert cal.holdout_percentile(float(pooled[13]) + 1e-9) == pytest.approx(14 / 130)
    back = Calibration.from_dict(cal.to_dict())
    assert back.n_cross_patient == 30 and back.holdout_percentile(float(pooled[13]) + 1e-9) == pytest.approx(14 / 130)


def test_the_holdout_alone_when_no_training_images_are_given():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(30, 1, 8, 8, generator=g)
    index = TrainingIndex.build(PixelSpace(grid=8), train, [f"P{i // 3}" for i in range(30)], "dl")
    holdout = torch.rand(100, 1, 8, 8, generator=g)
    ids = [f"H{i}" for i in range(100)]
    alone = calibrate_threshold(index, holdout, holdout_patient_ids=ids)
    assert alone.n_cross_patient == 0 and alone.n_calibration == 100
    assert calibrate_threshold(index, holdout, holdout_patient_ids=ids, training_images=train).n_cross_patient == 0


def test_a_training_patient_duplicated_under_another_id_is_left_out_and_named():
    # the same person under two ids: their images are each other's nearest "other patient" at copy distance; taken as
    # samples of new patients they would pull the threshold down to copy distance and let near-copies through
    g = torch.Generator().manual_seed(0)
    base = torch.rand(60, 1, 8, 8, generator=g)
    twin = base[:3] + 0.002 * torch.randn(3, 1, 8, 8, generator=g)
    train = torch.cat([base, twin])
    ids = [f"P{i // 3}" for i in range(60)] + ["TWIN"] * 3
    space = PixelSpace(grid=8)
    index = TrainingIndex.build(space, train, ids, "dl")
    holdout = torch.rand(100, 1, 8, 8, generator=g)
    holdout_ids = [f"H{i}" for i in range(100)]
    cal, holdout_d, cross = _calibrate_with(index, holdout, holdout_ids, train, 63)
    flagged_rows = cross.rows[cross.flagged].tolist()
    assert flagged_rows == [0, 1, 2, 60, 61, 62]
    assert cal.cross_patient_dropped == 6 and cal.n_cross_patient == 57
    assert cal.threshold > 50 * float(cross.distances[cross.flagged].max())  # the twins did not set the threshold
    with pytest.warns(UserWarning, match=r"6 training images look like near-duplicates .*rows 0 \(P0\).*60 \(TWIN\)"):
        safeguard = build_safeguard(
            [space, PartSpace(grid=8, kind="crops")],
            *(train, ids, holdout, holdout_ids, "dl"),
            batch_size=16,
            cross_patient_images=None,
        )
    for c in safeguard.calibrations.values():
        assert c.cross_patient_dropped == 6 and c.n_cross_patient == 57 and c.n_calibration == 157


def _us_split(train: int, holdout: int, new: int, new_images: int, seed: int, size=(16, 16)):
    """Model-space ultrasound phantoms: training images and patient ids, holdout images and ids, new patients'
    images (3 images per training and holdout patient)."""
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.transforms.presets import intensity_transform

    scale = intensity_transform("us")

    def load(records):
        return torch.stack([torch.as_tensor(np.asarray(scale(r["image"]))) for r in records]).float()

    train_rec = generate_cohort("us", train, 3, spatial_size=size, seed=seed)
    holdout_rec = generate_cohort("us", holdout, 3, spatial_size=size, seed=seed, first_patient=1000)
    new_rec = generate_cohort("us", new, new_images, spatial_size=size, seed=seed, first_patient=5000)
    ids, holdout_ids = [r["patient_id"] for r in train_rec], [r["patient_id"] for r in holdout_rec]
    return load(train_rec), ids, load(holdout_rec), holdout_ids, load(new_rec)


def test_cross_patient_samples_refuse_fewer_new_patients_than_the_holdout_alone():
    # three spaces, 102 holdout images: alone, each threshold is its space's smallest holdout distance and 10% of new
    # patients' images were refused; with 198 training images of 80 more patients the per-space quantile is resolved
    train, ids, holdout, holdout_ids, new = _us_split(80, 34, 100, 2, seed=4)
    spaces = [PixelSpace(grid=16), PartSpace(grid=16, kind="crops"), PartSpace(grid=16, kind="regions")]
    args = (spaces, train, ids, holdout, holdout_ids, "dl")
    with pytest.warns(UserWarning, match=r"102 calibration images \(all holdout\)"):
        alone = build_safeguard(*args, batch_size=32, cross_patient_images=0, specificity=0)
    pooled = build_safeguard(*args, batch_size=32, specificity=0)  # the default: 3 / 0.01 - 102 = 198 training images
    for cal in pooled.calibrations.values():
        assert cal.n_holdout == 102 and cal.n_cross_patient == 198 and cal.cross_patient_dropped == 0
        assert cal.threshold <= alone.thresholds[cal.space]
    refused_alone = np.mean([not r.passed for r in alone.check(new)])
    refused_pooled = np.mean([not r.passed for r in pooled.check(new)])
    assert refused_pooled <= 0.05 < refused_alone
    assert not any(r.passed for r in pooled.check(train[::6]))  # the training images themselves stay refused
    # the default gate adds the specificity test to the same calibrations: about 0.3% more per space
    checks = [(pooled.indexes[name], pooled.calibrations[name]) for name in pooled.indexes]
    default = PrivacySafeguard(checks, batch_size=32, specificity=DEFAULT_SPECIFICITY)
    assert np.mean([not r.passed for r in default.check(new)]) <= refused_pooled + 0.03


def test_specificity_refuses_noised_copies_that_come_no_closer_than_new_patients():
    # a training image under strong noise is as far from it as new patients are from the training set, but it is
    # still much closer to its source than to anyone else; a new patient's image is not
    size = (16, 16)
    train, ids, holdout, holdout_ids, new = _us_split(30, 40, 50, 2, seed=0, size=size)
    args = ([PixelSpace(grid=16)], train, ids, holdout, holdout_ids, "dl")
    plain = build_safeguard(*args, batch_size=32, specificity=0)
    specific = build_safeguard(*args, batch_size=32)  # on by default
    assert specific.specificity == 0.003
    assert specific.thresholds == plain.thresholds and specific.median_log_ratio["pixel"] > 0
    copies = train[:30] + 0.3 * torch.randn(30, 1, *size, generator=torch.Generator().manual_seed(0))
    judged = specific.check(copies)
    assert sum(r.passed for r in plain.check(copies)) >= 10
    assert sum(r.passed for r in judged) <= 2
    assert any(
        "much closer to one training patient than to any other in pixel space" in (r.reason or "") for r in judged
    )
    assert sum(r.passed for r in specific.check(new)) >= sum(r.passed for r in plain.check(new)) - 2 >= 95


class _ExactSpecificity(PrivacySafeguard):
    """The specificity test with the exact k-nearest search for every image (what the bound only shortcuts)."""

    def _nearest(self, name, vec):
        index = self.indexes[name]
        d1, rows, patients = (a[:, 0] for a in index.nearest(vec))
        chance = self._chance(name, d1, safeguard_module._neighbours(index, [vec], True)[2])
        return [(float(d1[i]), str(patients[i]), int(rows[i]), float(chance[i])) for i in range(len(d1))]


def test_specificity_searches_exactly_only_the_images_a_second_patient_bound_cannot_clear(monkeypatch):
    # the bound from the variant nearest to the nearest row must never clear an image the exact test refuses: same
    # verdicts and reasons as the exact search for every image, with the exact search run on few of them
    size = (16, 16)
    train, ids, holdout, holdout_ids, new = _us_split(30, 40, 40, 1, seed=1, size=size)
    spaces = [PixelSpace(grid=16, invariances=("flip", "shift")), PartSpace(grid=16, kind="crops")]
    with pytest.warns(UserWarning, match="too few to calibrate"):
        fast = build_safeguard(spaces, train, ids, holdout, holdout_ids, "dl", batch_size=32, cross_patient_images=0)
    g = torch.Generator().manual_seed(1)
    noisy = [train[i::9][:5] + sd * torch.randn(5, 1, *size, generator=g) for i, sd in enumerate([0.1, 0.2, 0.3])]
    candidates = torch.cat([new, torch.flip(train[:5], dims=[-1]), *noisy])
    exact = _ExactSpecificity(
        [(fast.indexes[n], fast.calibrations[n]) for n in fast.indexes], batch_size=32, specificity=fast.specificity
    )
    bounded, searched = [], []
    real_neighbours = safeguard_module._neighbours
    real_two = TrainingIndex.nearest_two_patients
    monkeypatch.setattr(
        safeguard_module, "_neighbours", lambda i, b, o: searched.append(len(b[0])) or real_neighbours(i, b, o)
    )
    monkeypatch.setattr(TrainingIndex, "nearest_two_patients", lambda i, v: bounded.append(len(v)) or real_two(i, v))
    got = fast.check(candidates)
    bound_searches, exact_searches = sum(bounded), sum(searched)
    want = exact.check(candidates)
    assert [r.passed for r in got] == [r.passed for r in want] and [r.reason for r in got] == [r.reason for r in want]
    assert any("much closer to one training patient" in (r.reason or "") for r in got)  # the test does refuse here
    assert sum(r.passed for r in got[:40]) >= 34
    # per space: one bound search of every image, then the exact search of the few the bound could not clear
    judged = len(candidates) * len(spaces)
    assert bound_searches == judged and 0 < exact_searches < 0.5 * judged


def test_specificity_needs_the_duplicate_screen():
    g = torch.Generator().manual_seed(0)
    train, holdout = torch.rand(30, 1, 8, 8, generator=g), torch.rand(100, 1, 8, 8, generator=g)
    args = (
        [PixelSpace(grid=8)],
        train,
        [f"P{i // 3}" for i in range(30)],
        holdout,
        [f"H{i}" for i in range(100)],
        "dl",
    )
    with pytest.raises(ValueError, match="duplicate_check=True"):
        build_safeguard(*args, duplicate_check=False, specificity=0.003)
    with pytest.raises(ValueError, match="specificity must be in"):
        build_safeguard(*args, specificity=1.5)
    assert build_safeguard(*args, duplicate_check=False).specificity == 0.0  # the default follows the screen


def test_default_specificity_is_off_with_a_warning_where_no_ratio_can_be_tested():
    # one training patient: there is no second patient to compare with, so the test cannot tell anything apart
    g = torch.Generator().manual_seed(0)
    train, holdout = torch.rand(6, 1, 8, 8, generator=g), torch.rand(100, 1, 8, 8, generator=g)
    args = ([PixelSpace(grid=8)], train, ["P0"] * 6, holdout, [f"H{i}" for i in range(100)], "dl")
    with pytest.warns(UserWarning, match=r"specificity test is off.*\['pixel'\]"):
        assert build_safeguard(*args).specificity == 0.0
    with pytest.raises(ValueError, match="median"):
        build_safeguard(*args, specificity=0.003)  # asked for explicitly, it is not dropped quietly


def test_specificity_law_holds_above_a_slot_space_floor():
    # a slot space scores an exact match 1 - 1 / sqrt(R): its distances are f + x, with x what a one-slot space would
    # measure. New patients follow the ratio law in x; on the raw distances every ratio is squeezed toward 1 and a
    # new patient's ratio looks rare (here 6.5% of them at the default level 0.003, against 0.25% above the floor)
    rng = np.random.default_rng(0)
    floor = 1.0 - 1.0 / 3.0  # nine slots
    x1 = np.exp(rng.uniform(np.log(0.01), np.log(0.3), 20000)) * (1.0 - floor)
    x2 = x1 * rng.uniform(size=x1.size) ** (-1.0 / 3.0)  # (x1 / x2) ** 3 uniform on (0, 1)
    d1, d2 = floor + x1, floor + x2
    shares = {}
    for f in (floor, 0.0):
        _, screen = _screen_duplicates(d1[:300], d2[:300], 5.0, 0.01, f)
        assert screen["distance_floor"] == f
        chance = np.exp2(-log_distance_ratio(d1, d2, f) / screen["median_log_ratio"])
        shares[f] = [float(np.mean(chance < level)) for level in (0.003, 0.05)]
    assert 0.001 <= shares[floor][0] <= 0.006 and 0.03 <= shares[floor][1] <= 0.07, shares
    assert shares[0.0][0] > 0.03, shares
    assert np.isnan(log_distance_ratio(np.array([0.7]), np.array([np.nan]), floor)).all()
    assert log_distance_ratio(np.array([floor]), np.array([floor + 0.1]), floor)[0] > 10  # an exact match: d1 at 1e-7


def test_slot_spaces_record_their_floor_and_the_safeguard_tests_above_it():
    train, ids, holdout, holdout_ids, _ = _us_split(30, 40, 1, 1, seed=2)
    spaces = [
        PixelSpace(grid=16),
        PartSpace(grid=16),
        PartSpace(grid=16, kind="crops"),
        PartSpace(grid=16, kind="halves"),
    ]
    gate = build_safeguard(spaces, train, ids, holdout, holdout_ids, "dl", batch_size=32)
    for space in spaces:
        distances = (
            1.0
            - embed_variants(space, train[:8]).reshape(-1, space.embed(train[:1]).shape[1]) @ space.embed(train[:8]).T
        )
        assert distances.min() >= distance_floor(space) - 1e-5  # nothing comes nearer than the floor
        assert gate.calibrations[space.name].duplicate_screen["distance_floor"] == distance_floor(space)
        assert gate.ratio_floor[space.name] == distance_floor(space)
    # an exact copy matches every aligned region (four quadrants and the centre), one slot at a time: on the floor
    exact = 1.0 - embed_variants(spaces[1], train[:1])[0] @ spaces[1].embed(train[:1])[0]
    assert distance_floor(spaces[1]) == pytest.approx(float(exact.min()), abs=1e-5) == 1.0 - 1.0 / 5**0.5
    assert distance_floor(spaces[0]) == 0.0 and distance_floor(spaces[3]) == pytest.approx(1.0 - 1.0 / 8**0.5)
    # a calibration written before the floor was recorded measured its median on the raw distances: tested so
    checks = []
    for name, index in gate.indexes.items():
        cal = gate.calibrations[name]
        screen = {k: v for k, v in cal.duplicate_screen.items() if k != "distance_floor"}
        checks.append((index, Calibration.from_dict({**cal.to_dict(), "duplicate_screen": screen})))
    old = PrivacySafeguard(checks, batch_size=32, specificity=gate.specificity)
    assert old.ratio_floor == {name: 0.0 for name in gate.indexes}


def test_the_default_specificity_is_lowered_to_its_share_of_the_calibration_images():
    # thirteen spaces at 0.003 each refused up to 4% of new patients' images on top of the thresholds: the default
    # level is lowered until at most SPECIFICITY_SHARE of the calibration images are refused by it in some space
    chances = np.ones((200, 3))
    chances[:8, 0] = np.linspace(0.0005, 0.0025, 8)  # 8 images specific in one space or another: 4% at 0.003
    chances[8:10, 2] = 0.0001
    level = safeguard_module._specificity_within_share(chances, 0.003, 0.015)
    refused = (chances.min(axis=1) < level).sum()
    assert refused == 3 and level == pytest.approx(chances[1, 0])  # 3 of 200 = 1.5%: the two at 1e-4 and the least
    assert safeguard_module._specificity_within_share(chances, 0.003, 0.05) == 0.003  # within the share: as asked
    assert safeguard_module._specificity_within_share(np.ones((50, 2)), 0.003, 0.015) == 0.003


def test_build_safeguard_counts_the_specificity_test_in_all_spaces_together(monkeypatch):
    # on these ultrasound phantoms the crops space alone refuses 2.8% of the calibration images at 0.003, ten times
    # what the ratio law says: kept as given, the test refuses holdout (new) patients' images; counted, it may not
    train, ids, holdout, holdout_ids, new = _us_split(60, 34, 60, 2, seed=2)
    spaces = [PixelSpace(grid=16), PartSpace(grid=16, kind="crops"), PartSpace(grid=16, kind="regions")]
    args = (spaces, train, ids, holdout, holdout_ids, "dl")

    def specific(gate):
        return sum("much closer to one training patient" in (r.reason or "") for r in gate.check(holdout))

    explicit = build_safeguard(*args, batch_size=32, specificity=0.003)
    assert explicit.specificity == 0.003 and specific(explicit) >= 2  # asked for explicitly: kept as given
    default = build_safeguard(*args, batch_size=32)
    n = len(holdout) + next(iter(default.calibrations.values())).n_cross_patient
    assert default.specificity < DEFAULT_SPECIFICITY and specific(default) <= 0.015 * n
    monkeypatch.setattr(safeguard_module, "SPECIFICITY_SHARE", 0.0)  # no calibration image may be refused by it
    strict = build_safeguard(*args, batch_size=32)
    assert 0.0 < strict.specificity <= default.specificity and specific(strict) == 0
