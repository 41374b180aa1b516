"""calibrate_threshold: the holdout quantile, the floor, its confidence interval, the holdout percentiles, and the
refusals that keep it meaningful (training patients or near-copies of training images in the holdout)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom

from monai_synth.data.phantoms import generate_cohort
from monai_synth.privacy.calibration import (
    Calibration,
    HoldoutDuplicateError,
    calibrate_threshold,
    joint_space_quantile,
    min_holdout_size,
    quantile_confidence_interval,
    tail_quantile,
    tail_scale,
)
from monai_synth.privacy.index import TrainingIndex
from monai_synth.privacy.spaces import PixelSpace, space_distance
from monai_synth.transforms.presets import intensity_transform

HOLDOUT_IDS = [f"H{i}" for i in range(120)]


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
    cal = calibrate_threshold(index, holdout, holdout_patient_ids=HOLDOUT_IDS)
    data = json.loads(json.dumps(cal.to_dict()))  # what a certificate holds
    back = Calibration.from_dict(data)
    assert back == cal and back.threshold_ci == cal.threshold_ci and back.duplicate_screen == cal.duplicate_screen
    for t in (0.0, cal.threshold, cal.summary["p50"], 0.7, 3.0):
        assert back.holdout_percentile(t) == cal.holdout_percentile(t)
    text = json.dumps(data)
    assert not [p for p in [*index.patients, *HOLDOUT_IDS] if f'"{p}"' in text]  # no patient id goes into it


def test_old_dicts_without_interval_screen_or_distances_still_load(setup):
    _, index, _, holdout = setup
    data = calibrate_threshold(index, holdout, holdout_patient_ids=HOLDOUT_IDS).to_dict()
    for key in ("threshold_ci", "ci_level", "duplicate_screen", "holdout_distances"):
        del data[key]
    old = Calibration.from_dict(data)
    assert old.threshold_ci is None and old.duplicate_screen is None
    with pytest.raises(ValueError, match="holds no holdout distances.*recalibrate"):
        old.holdout_percentile(0.5)
    with pytest.raises(ValueError, match="unknown fields \\['extra'\\]"):
        Calibration.from_dict({**data, "extra": 1})


def test_holdout_percentile_is_the_share_of_holdout_images_closer_than_the_distance(setup):
    space, index, train, holdout = setup
    cal = calibrate_threshold(index, holdout, quantile=0.05, holdout_patient_ids=HOLDOUT_IDS)
    nn = space_distance(space.embed(holdout), space.embed(train)).min(axis=1)
    for t in np.linspace(0.4, 0.9, 11):
        assert cal.holdout_percentile(t) == pytest.approx(np.mean(nn < t), abs=1 / 120)
    assert cal.holdout_percentile(0.0) == 0.0 and cal.holdout_percentile(2.0) == 1.0
    assert cal.holdout_percentile(cal.threshold) == pytest.approx(0.05, abs=1 / 120)
    with pytest.raises(ValueError, match="finite"):
        cal.holdout_percentile(float("nan"))


def test_large_holdouts_keep_a_compact_dict_with_percentiles_within_a_thousandth():
    rng = np.random.default_rng(0)
    distances = rng.gamma(20.0, 0.02, size=20_000)
    cal = Calibration("pixel", 0.2, 0.01, 0.0, 0.2, len(distances), 0, "fp", holdout_distances=distances)
    data = cal.to_dict()
    assert len(data["holdout_distances"]) == 1001 and len(json.dumps(data)) < 15_000
    back = Calibration.from_dict(json.loads(json.dumps(data)))
    for t in np.quantile(distances, [0.0005, 0.01, 0.3, 0.5, 0.99]):
        assert back.holdout_percentile(t) == pytest.approx(np.mean(distances < t), abs=1e-3)
    assert Calibration.from_dict(back.to_dict()).to_dict() == back.to_dict()  # stable once thinned


def test_threshold_interval_brackets_the_quantile_with_order_statistics(setup):
    _, index, _, holdout = setup
    cal = calibrate_threshold(index, holdout, quantile=0.05, holdout_patient_ids=HOLDOUT_IDS, ci_level=0.9)
    lo, hi = cal.threshold_ci
    d = cal.holdout_distances
    assert lo <= cal.quantile_value <= hi and cal.ci_level == 0.9
    # 5% of 120: l-th and u-th smallest with P(Bin(120, .05) <= l-1) <= .05 and P(Bin <= u-1) >= .95 -> l=2, u=11
    assert binom.cdf(1, 120, 0.05) <= 0.05 < binom.cdf(2, 120, 0.05)
    assert binom.cdf(9, 120, 0.05) < 0.95 <= binom.cdf(10, 120, 0.05)
    assert (lo, hi) == (d[1], d[10]) and cal.summary["ci_coverage"] >= 0.9
    floored = calibrate_threshold(
        index, holdout, quantile=0.05, floor=0.62, holdout_patient_ids=HOLDOUT_IDS, ci_level=0.9
    )
    assert floored.threshold_ci == (max(0.62, d[1]), max(0.62, d[10]))


def test_interval_without_a_low_enough_order_statistic_falls_back_to_zero():
    lo, hi, coverage = quantile_confidence_interval(np.linspace(0.3, 0.8, 100), 0.01)
    assert lo == 0.0 and hi == pytest.approx(0.3 + 3 * 0.5 / 99) and coverage >= 0.95  # 4th smallest


@pytest.mark.parametrize(("n", "q"), [(100, 0.01), (300, 0.01), (60, 0.05)])
def test_interval_covers_the_true_quantile_at_least_at_its_level(n, q):
    rng = np.random.default_rng(n)
    hits = [
        lo <= q <= hi  # uniform samples: the true q-quantile is q
        for lo, hi, _ in (quantile_confidence_interval(np.sort(rng.random(n)), q, 0.95, 0.0, 1.0) for _ in range(2000))
    ]
    assert np.mean(hits) >= 0.94


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


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quantile": 0.0},
        {"quantile": 0.7},
        {"floor": -0.1},
        {"floor": float("nan")},
        {"ci_level": 1.0},
        {"duplicate_z": 0.0},
        {"duplicate_alpha": 1.5},
    ],
)
def test_bad_settings_fail_early(setup, kwargs):
    _, index, _, holdout = setup
    with pytest.raises(ValueError):
        calibrate_threshold(index, holdout, **kwargs)


# ---------------------------------------------------------------------------------------------- duplicate screen
@pytest.mark.parametrize(
    "copy",
    [
        pytest.param(lambda x, g: x, id="exact"),
        pytest.param(lambda x, g: x + 0.3 * torch.randn(x.shape, generator=g), id="noised"),  # correlation ~0.96
        pytest.param(lambda x, g: 0.5 * x + 2.0, id="intensity rescaled"),
    ],
)
def test_a_training_image_planted_in_the_holdout_is_refused_by_row(setup, copy):
    _, index, train, holdout = setup
    planted = holdout.clone()
    planted[17] = copy(train[5], torch.Generator().manual_seed(0))
    expected = r"^1 holdout images look like near-duplicates of training images in the 'pixel' space: rows 17 \(H17\) "
    expected += r"at \S+ from training row 5\..*Remove those images .* pass duplicate_check=False \(`monai-synth guard "
    with pytest.raises(HoldoutDuplicateError, match=expected + r"--no-duplicate-check`\)\.$") as err:
        calibrate_threshold(index, planted, holdout_patient_ids=HOLDOUT_IDS)
    assert err.value.rows == [17]


def test_a_space_that_learned_identities_leaves_a_look_alike_out_of_its_threshold_with_a_warning(setup):
    _, _, train, holdout = setup

    class IdentitySpace(PixelSpace):
        identity_space = True

    index = TrainingIndex.build(IdentitySpace(grid=8), train, [f"T{i // 2}" for i in range(80)], "dl")
    planted = holdout.clone()
    planted[17] = train[5] + 0.05 * torch.randn(train[5].shape, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"^1 holdout images resemble one training patient .*rows 17 \(H17\) at "):
        cal = calibrate_threshold(index, planted, quantile=0.05, holdout_patient_ids=HOLDOUT_IDS)
    others = torch.arange(120) != 17
    ids = [h for h, keep in zip(HOLDOUT_IDS, others) if keep]
    clean = calibrate_threshold(index, holdout[others], quantile=0.05, holdout_patient_ids=ids)
    assert cal.duplicate_screen["flagged"] == 1
    assert cal.threshold >= clean.threshold  # the look-alike does not pull it down
    pixel_index = TrainingIndex.build(PixelSpace(grid=8), train, [f"T{i // 2}" for i in range(80)], "dl")
    with pytest.raises(HoldoutDuplicateError):  # the same holdout is refused in a pixel-based space
        calibrate_threshold(pixel_index, planted, quantile=0.05, holdout_patient_ids=HOLDOUT_IDS)


def test_several_copies_are_all_named_and_vectors_are_screened_too(setup):
    space, index, train, holdout = setup
    planted = holdout.clone()
    g = torch.Generator().manual_seed(1)
    for row, src in [(3, 10), (50, 11), (51, 11), (119, 79)]:
        planted[row] = train[src] + 0.2 * torch.randn(train[src].shape, generator=g)
    with pytest.raises(HoldoutDuplicateError, match=r"^4 holdout images.*rows 3 \(H3\).*; 50 .*; 51 .*; 119 ") as err:
        calibrate_threshold(index, planted, holdout_patient_ids=HOLDOUT_IDS)
    assert err.value.rows == [3, 50, 51, 119]
    with pytest.raises(HoldoutDuplicateError, match=r"rows 3 at ") as err, pytest.warns(UserWarning, match="ids"):
        calibrate_threshold(index, holdout_vectors=space.embed(planted), quantile=0.05)  # no ids: positions only
    assert err.value.rows == [3, 50, 51, 119]


def test_message_says_how_far_the_copies_would_pull_the_threshold(setup):
    _, index, train, holdout = setup
    planted = holdout.clone()
    planted[[7, 8, 9]] = train[[20, 21, 22]]
    clean = calibrate_threshold(index, holdout, holdout_patient_ids=HOLDOUT_IDS)
    with pytest.raises(HoldoutDuplicateError, match=r"pull the 0\.01 quantile threshold from 0\.5\d+ down to ") as err:
        calibrate_threshold(index, planted, holdout_patient_ids=HOLDOUT_IDS)
    assert clean.threshold > 0.5 and err.value.rows == [7, 8, 9]


def test_switching_the_screen_off_is_recorded(setup):
    _, index, train, holdout = setup
    planted = holdout.clone()
    planted[[7, 8, 9]] = train[[20, 21, 22]]
    cal = calibrate_threshold(index, planted, holdout_patient_ids=HOLDOUT_IDS, duplicate_check=False)
    assert cal.duplicate_screen is None and cal.threshold < 1e-3  # what the screen is there to prevent
    clean = calibrate_threshold(index, holdout, holdout_patient_ids=HOLDOUT_IDS)
    assert clean.duplicate_screen["flagged"] == 0 and clean.duplicate_screen["z_min"] == 5.0


def _model_space(records):
    scale = intensity_transform("us")
    return torch.stack([torch.as_tensor(np.asarray(scale(r["image"]))) for r in records]).float()


def _blur(x):
    k = torch.tensor([1.0, 2.0, 1.0])
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), ((k[:, None] * k[None]) / 16)[None, None])


def _rotate(x, degrees):
    t = np.deg2rad(degrees)
    theta = torch.tensor([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0]], dtype=torch.float32)
    grid = F.affine_grid(theta[None].expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


@pytest.fixture(scope="module")
def phantoms():
    train = generate_cohort("us", 30, 3, spatial_size=32, seed=0)
    holdout = generate_cohort("us", 40, 3, spatial_size=32, seed=0, first_patient=1000)
    index = TrainingIndex.build(PixelSpace(grid=32), _model_space(train), [r["patient_id"] for r in train], "us")
    return index, _model_space(train), _model_space(holdout), [r["patient_id"] for r in holdout]


def test_clean_phantom_holdout_is_not_refused(phantoms):
    index, _, holdout, ids = phantoms
    cal = calibrate_threshold(index, holdout, holdout_patient_ids=ids)
    assert cal.duplicate_screen["flagged"] == 0 and cal.threshold > 0.2


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(_blur, id="blurred"),
        pytest.param(lambda x: _rotate(x, 3.0), id="rotated 3 degrees"),
        pytest.param(lambda x: x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), id="noised"),
    ],
)
def test_altered_copies_that_would_lower_the_phantom_threshold_are_refused(phantoms, alter):
    # the issue: a training patient in the holdout under another id; its lightly altered images pulled the 1%
    # threshold down so far that blurred, rotated and noised copies passed the safeguard
    index, train, holdout, ids = phantoms
    planted = holdout.clone()
    planted[[30, 31, 32]] = alter(train[[12, 13, 14]])  # one training patient's three studies
    with pytest.raises(HoldoutDuplicateError, match=r"^3 holdout images.*rows 30 \(P1010\).*31 \(P1010\).*32 ") as err:
        calibrate_threshold(index, planted, holdout_patient_ids=[*ids[:30], "P1010", "P1010", "P1010", *ids[33:]])
    assert err.value.rows == [30, 31, 32]


def test_a_collapsed_space_is_refused():
    """A space that maps every image to about one vector (an untrained or collapsed embedding) cannot guard anything."""
    import faiss

    from monai_synth.privacy.calibration import CollapsedSpaceError
    from monai_synth.privacy.index import TrainingIndex

    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 16)).astype(np.float32)
    train = base + 1e-5 * rng.normal(size=(40, 16)).astype(np.float32)
    shard = faiss.IndexFlatIP(16)
    shard.add(train / np.linalg.norm(train, axis=1, keepdims=True))
    index = TrainingIndex([shard], np.arange(40, dtype=np.int32), [f"P{i}" for i in range(40)], "embedding", "s", "d")
    holdout = base + 1e-5 * rng.normal(size=(200, 16)).astype(np.float32)
    with pytest.raises(CollapsedSpaceError, match="median distance"):
        calibrate_threshold(index, holdout_vectors=holdout, holdout_patient_ids=[f"H{i}" for i in range(200)])


def _new_images_refused(calibration: dict, fresh: dict, q: float, scales: dict | None = None) -> float:
    """Share of fresh draws (new patients' images) below some space's threshold at ``q``."""
    thresholds = {k: tail_quantile(np.sort(d), q, (scales or {}).get(k)) for k, d in calibration.items()}
    return float(np.mean(np.any([fresh[k] < thresholds[k] for k in calibration], axis=0)))


def test_joint_space_quantile_keeps_the_union_of_spaces_at_the_asked_share_for_new_images():
    rng = np.random.default_rng(0)
    independent = {k: rng.random(400) for k in "abc"}
    fresh = {k: rng.random(200_000) for k in "abc"}
    q = joint_space_quantile(independent, 0.02)
    assert 0.02 / 6 <= q < 0.02
    assert 0.01 <= _new_images_refused(independent, fresh, q) <= 0.025
    assert _new_images_refused(independent, fresh, 0.02) > 0.04  # three spaces at their own 2% refuse about 6%
    same = rng.random(400)
    assert joint_space_quantile({"a": same, "b": same * 2}, 0.02) == 0.02  # spaces that agree lose nothing
    with pytest.raises(ValueError, match="same holdout images"):
        joint_space_quantile({"a": rng.random(10), "b": rng.random(11)}, 0.1)
    with pytest.raises(ValueError, match="finite"):
        joint_space_quantile({"a": np.array([0.1, np.nan])}, 0.5)


@pytest.mark.parametrize("offset", [0.0, 0.85])
def test_few_calibration_images_keep_the_asked_rate_for_new_images_by_the_tail_model(offset):
    # 8 spaces, 300 calibration images, 1% asked: thresholds no lower than the smallest distance refuse about
    # 8 / 301 = 2.7% of new images; extrapolated by the lower tail and chosen leave-one-out, about the asked 1%. The
    # distances have a power-law tail from 0 (F(d) = d ** 6, as nearest-neighbour distances behave) or sit on a floor
    # shared by every image (0.85 + d / 100, as the crops space's do), where the tail is as wide as the images differ
    rng = np.random.default_rng(1)
    k, n = 8, 300

    def draw(size):
        d = rng.random(size) ** (1 / 6.0)
        return offset + d / 100 if offset else d

    modelled, clamped = [], []
    for _ in range(20):
        cal = {f"s{i}": draw(n) for i in range(k)}
        fresh = {s: draw(20_000) for s in cal}
        scales = {s: tail_scale(np.sort(d)) for s, d in cal.items()}
        q = joint_space_quantile(cal, 0.01, tail_scales=scales)
        modelled.append(_new_images_refused(cal, fresh, q, scales))
        clamped.append(_new_images_refused(cal, fresh, joint_space_quantile(cal, 0.01)))
    assert np.mean(clamped) > 0.02
    assert 0.004 <= np.mean(modelled) <= 0.015


def test_tail_quantile_interpolates_on_plotting_positions_and_extrapolates_below_the_smallest_value():
    d = np.array([0.2, 0.4, 0.6, 0.8])  # at the 1/5, ..., 4/5 quantiles on average
    assert tail_quantile(d, 0.4) == pytest.approx(0.4)
    assert tail_quantile(d, 0.5) == pytest.approx(0.5)
    assert tail_quantile(d, 0.9) == 0.8
    assert tail_quantile(d, 0.1) == 0.2  # no tail model: no lower than the smallest value
    assert tail_quantile(d, 0.1, tail_scale=0.1) == pytest.approx(0.2 + 0.1 * np.log(0.5))
    assert tail_quantile(d, 0.01, tail_scale=0.05) == pytest.approx(0.15)  # at most one scale below the smallest
    assert tail_quantile(d, 0.001, tail_scale=1.0) == 0.1  # and never below half of it
    # normalised spacings j * (d_(j+1) - d_(j)) of the ten smallest of 200: 0.01 * (1 + 2 + ... + 10) / 10
    many = np.arange(200) / 100.0
    assert tail_scale(many) == pytest.approx(0.055)
    assert tail_scale(many, count=1) == pytest.approx(0.01)
    # the scale follows the spread, not the offset: the same images on a floor of 0.85 give the same scale
    assert tail_scale(0.85 + many) == pytest.approx(tail_scale(many))
    # ten gaps of fewer than 200 values reach into the bulk: no tail model
    assert tail_scale(many[:199]) == 0.0 and tail_scale(d) == 0.0 and tail_scale(d[:1]) == 0.0


def test_build_safeguard_calibrates_spaces_jointly_so_unseen_images_pass_at_the_asked_rate():
    from monai_synth.privacy.partial import PartSpace
    from monai_synth.privacy.safeguard import build_safeguard

    g = torch.Generator().manual_seed(0)
    train, holdout = torch.rand(40, 1, 8, 8, generator=g), torch.rand(200, 1, 8, 8, generator=g)
    spaces = [PixelSpace(grid=8), PartSpace(grid=8, kind="crops")]
    args = (train, [f"P{i}" for i in range(40)], holdout, [f"H{i}" for i in range(200)], "dl")
    joint = build_safeguard(spaces, *args, quantile=0.05)
    apart = build_safeguard(spaces, *args, quantile=0.05, joint=False)
    refused_joint = np.mean([not r.passed for r in joint.check(holdout)])
    refused_apart = np.mean([not r.passed for r in apart.check(holdout)])
    assert refused_joint <= 0.05 < refused_apart
    for name, cal in joint.calibrations.items():
        assert cal.quantile == 0.05 and 0.0125 <= cal.space_quantile <= 0.05
        assert cal.threshold <= apart.thresholds[name]
        assert Calibration.from_dict(cal.to_dict()).space_quantile == cal.space_quantile
        # the threshold's tail model, from the calibration distances, recorded so the certificate can redo it
        assert cal.tail_scale == pytest.approx(tail_scale(cal.holdout_distances))
        assert cal.threshold == pytest.approx(tail_quantile(cal.holdout_distances, cal.space_quantile, cal.tail_scale))
        assert Calibration.from_dict(cal.to_dict()).tail_scale == cal.tail_scale


def test_joint_calibration_warns_when_the_holdout_is_too_small_for_the_asked_rate(monkeypatch):
    from monai_synth.privacy import safeguard as safeguard_module
    from monai_synth.privacy.partial import PartSpace
    from monai_synth.privacy.safeguard import build_safeguard

    g = torch.Generator().manual_seed(1)
    train, holdout = torch.rand(20, 1, 8, 8, generator=g), torch.rand(250, 1, 8, 8, generator=g)
    spaces = [PixelSpace(grid=8), PartSpace(grid=8, kind="crops"), PartSpace(grid=8, kind="regions")]
    ids = [f"P{i}" for i in range(20)]
    # below 200 calibration distances there is no tail model: each threshold is about its smallest distance
    args = (spaces, train, ids, holdout[:100], [f"H{i}" for i in range(100)], "dl")
    with pytest.warns(UserWarning, match=r"100 calibration images \(all holdout\) .* smallest .* at least 300"):
        build_safeguard(*args, cross_patient_images=0)
    # by default every training image joins as a cross-patient sample: still too few, and the warning counts them
    with pytest.warns(UserWarning, match=r"120 calibration images \(100 holdout, 20 training images .* at least 300"):
        build_safeguard(*args)
    # with a tail model, where the joint quantile lies beyond its reach (one scale below the smallest distance), each
    # space still refuses about 1 / (e (n + 1)): 3 / (e 251) = 0.44%, more than an asked 0.4%
    args = (spaces, train, ids, holdout, [f"H{i}" for i in range(250)], "dl")
    original = safeguard_module.joint_space_quantile
    monkeypatch.setattr(safeguard_module, "joint_space_quantile", lambda *a, **k: min(1e-5, original(*a, **k)))
    with pytest.warns(UserWarning, match=r"250 calibration images \(all holdout\) .* one tail scale .* at least 276"):
        build_safeguard(*args, quantile=0.004, cross_patient_images=0)
