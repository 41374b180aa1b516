"""Fidelity metrics: zero-ish for one distribution, large for a shifted one, and the real floor next to them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monai_synth.evaluation.features import random_feature_space
from monai_synth.evaluation.fidelity import (
    bootstrap_interval,
    evaluate_fidelity,
    fid,
    kid,
    mmd_permutation_test,
    ms_ssim_diversity,
    prdc_metrics,
)


def _feats(n, shift=0.0, seed=0):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)).double() + shift


def test_fid_and_kid_grow_with_a_shift():
    a, b, c = _feats(200, seed=0), _feats(200, seed=1), _feats(200, shift=1.0, seed=2)
    assert fid(a, b) < 0.5 < 4.0 < fid(a, c)
    assert kid(a, b)[0] < 0.05 < kid(a, c)[0]


def test_mmd_permutation_test_rejects_only_a_different_distribution():
    a, b, c = _feats(60, seed=0), _feats(60, seed=1), _feats(60, shift=0.8, seed=2)
    assert mmd_permutation_test(a, b, permutations=200)["p_value"] > 0.05
    assert mmd_permutation_test(a, c, permutations=200)["p_value"] < 0.01


def test_prdc_recall_drops_for_a_collapsed_generator():
    real = _feats(100, seed=0)
    collapsed = real[:5].repeat(20, 1) + 0.01 * _feats(100, seed=1)
    assert prdc_metrics(real, _feats(100, seed=2))["recall"] > 0.8
    assert prdc_metrics(real, collapsed)["coverage"] < 0.3


def test_bootstrap_interval_holds_the_estimate():
    a, b = _feats(80, seed=0), _feats(80, shift=0.5, seed=1)
    lo, hi = bootstrap_interval(fid, a, b, n_boot=50)
    assert lo <= fid(a, b) <= hi and hi - lo > 0


def test_ms_ssim_diversity_is_one_for_copies_and_lower_for_different_images():
    img = torch.rand(1, 1, 64, 64)
    assert ms_ssim_diversity(img.repeat(4, 1, 1, 1), pairs=10) > 0.99
    assert ms_ssim_diversity(torch.rand(4, 1, 64, 64), pairs=10) < 0.5
    assert math.isnan(ms_ssim_diversity(img, pairs=10))


def test_evaluate_fidelity_reports_synthetic_next_to_the_real_floor_per_class():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 1, 16, 16, generator=g)
    labels = [i % 2 for i in range(60)]
    good, bad = torch.randn(40, 1, 16, 16, generator=g), torch.randn(40, 1, 16, 16, generator=g) * 0.2 + 1.0
    space = random_feature_space(2, seed=0)
    args = dict(n_boot=10, permutations=20, ssim_pairs=5)
    res_good = evaluate_fidelity(
        space, real[:40], labels[:40], real[40:], labels[40:], good, labels[:40], ["a", "b"], **args
    )
    res_bad = evaluate_fidelity(
        space, real[:40], labels[:40], real[40:], labels[40:], bad, labels[:40], ["a", "b"], **args
    )
    assert set(res_good["per_class"]) == {"a", "b"} and set(res_good["ms_ssim"]) == {"a", "b"}
    assert res_good["fid_real_floor"] == res_bad["fid_real_floor"]
    assert res_bad["fid"] > 3 * res_good["fid"]
    assert (
        res_good["overall"]["synthetic"]["fid_ci"][0]
        <= res_good["fid"]
        <= res_good["overall"]["synthetic"]["fid_ci"][1]
    )
    assert res_good["space"]["weights_sha256"] == space.weights_hash


def test_fid_equals_torchmetrics_and_monai():
    from monai.metrics import FIDMetric
    from torchmetrics.image.fid import FrechetInceptionDistance

    from monai_synth.evaluation.fidelity import _GivenFeatures

    a, b = _feats(300, seed=0), _feats(200, shift=0.3, seed=1) * 1.2
    metric = FrechetInceptionDistance(feature=_GivenFeatures(8))
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert fid(a, b) == pytest.approx(float(metric.compute()), rel=1e-6)
    assert fid(a, b) == pytest.approx(float(FIDMetric()(b, a)), rel=1e-6)


def test_mmd_statistic_is_the_unbiased_estimate():
    a, b = _feats(7, seed=3), _feats(5, shift=0.4, seed=4)
    res = mmd_permutation_test(a, b, permutations=1, bandwidth=2.0)
    k = lambda x, y: torch.exp(-torch.cdist(x, y).square() / 8.0)  # noqa: E731
    kaa, kbb = k(a, a), k(b, b)
    expected = (kaa.sum() - kaa.trace()) / 42 + (kbb.sum() - kbb.trace()) / 20 - 2 * k(a, b).mean()
    assert res["mmd2"] == pytest.approx(float(expected), rel=1e-9)


def test_patient_bootstrap_resamples_whole_patients_and_widens_the_interval_for_clustered_images():
    gen = torch.Generator().manual_seed(0)
    patients = [f"P{i // 10}" for i in range(100)]  # 10 patients, 10 near-identical images each
    real = torch.randn(10, 1, generator=gen).repeat_interleave(10, 0) + 0.01 * torch.randn(100, 1, generator=gen)
    other = torch.randn(100, 1, generator=gen) * 0.01
    diff = lambda a, b: float(a.mean() - b.mean())  # noqa: E731
    lo_i, hi_i = bootstrap_interval(diff, real, other, n_boot=300)
    lo_p, hi_p = bootstrap_interval(diff, real, other, n_boot=300, groups_a=patients)
    assert (hi_p - lo_p) > 2 * (hi_i - lo_i)  # 10 independent units, not 100
    draws = []
    fn = lambda a, b: draws.append(a[:, 0].tolist()) or 0.0  # noqa: E731
    bootstrap_interval(fn, torch.arange(100.0)[:, None], other, n_boot=5, groups_a=patients)
    for rows in draws[:-1]:  # the last call is the estimate itself
        counts = np.bincount(np.asarray(rows, dtype=int) // 10, minlength=10)
        assert len(rows) == 100 and all(c % 10 == 0 for c in counts) and sum(counts) == 100


def test_fid_and_its_bootstrap_run_on_one_thread_and_restore_the_callers_threads(monkeypatch):
    from monai_synth.evaluation import fidelity

    seen = []

    def recording_fid(a, b):
        seen.append(torch.get_num_threads())
        return fid(a, b)

    monkeypatch.setattr(fidelity, "fid", recording_fid)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(40, 4, generator=g), torch.randn(40, 4, generator=g)
        out = fidelity._compare(a, b, n_boot=5, permutations=5, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 7 and set(seen) == {1}  # the estimate, 5 resamples and the interval's bias
    assert out["fid"] == pytest.approx(fid(b, a))
