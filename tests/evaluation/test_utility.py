"""Utility arms: same classifier and budget, AUC with patient-level intervals and a paired test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.evaluation.utility import _half_replacement, evaluate_utility, patient_bootstrap, roc_auc


def _cohort(n_patients, per_patient=2, seed=0, swap=False, prefix="P"):
    """Class 1 images carry a bright square; ``swap`` labels them 0 (a generator that got the condition wrong)."""
    g = torch.Generator().manual_seed(seed)
    y = np.repeat(np.arange(n_patients) % 2, per_patient)
    x = torch.randn(len(y), 1, 16, 16, generator=g) * 0.5
    x[torch.as_tensor(y == 1), :, 4:12, 4:12] += 2.0
    pids = [f"{prefix}{i // per_patient:03d}" for i in range(len(y))]
    return x, (1 - y if swap else y), pids


def test_roc_auc_binary_and_one_vs_rest():
    y = np.array([0, 1, 2, 0, 1, 2])
    assert roc_auc(y, np.eye(3)[y], 3) == 1.0
    assert roc_auc(y[:4] % 2, np.eye(2)[1 - y[:4] % 2], 2) == 0.0
    assert np.isnan(roc_auc(np.zeros(4, int), np.full((4, 2), 0.5), 2))


@pytest.mark.parametrize("num_classes, present", [(2, [0, 1]), (5, [0, 1, 2, 3, 4]), (5, [0, 2, 3])])
def test_roc_auc_equals_scikit_learn_with_ties(num_classes, present):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(num_classes + len(present))
    y = rng.choice(present, 300)
    counts = rng.integers(1, 4, (300, num_classes))
    probs = counts / counts.sum(1, keepdims=True)  # few distinct values: many ties
    if num_classes == 2:
        expected = roc_auc_score(y, probs[:, 1])
    elif len(present) == num_classes:
        expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    else:
        p = probs[:, present] / probs[:, present].sum(1, keepdims=True)
        expected = roc_auc_score(np.searchsorted(present, y), p, multi_class="ovr", average="macro")
    assert roc_auc(y, probs, num_classes) == pytest.approx(expected, abs=1e-12)


def test_paired_bootstrap_separates_a_perfect_from_a_random_arm_only():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    pids = [f"P{i // 2}" for i in range(80)]
    perfect, noise = np.eye(2)[y], rng.dirichlet([1, 1], size=80)
    res = patient_bootstrap(y, pids, {"a": perfect, "b": noise, "c": perfect.copy()}, 2, n_boot=200)
    assert res["paired"]["a_vs_b"]["p_value"] < 0.01
    assert res["paired"]["a_vs_c"]["p_value"] == 1.0
    assert res["ci"]["a"] == [1.0, 1.0] and res["ci"]["b"][0] < 0.5 < res["ci"]["b"][1]


def test_patient_bootstrap_is_wider_than_an_image_bootstrap_for_repeat_images():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 10)
    probs = rng.dirichlet([1, 1], size=20)
    repeated = np.repeat(probs, 5, axis=0)
    ys = np.repeat(y, 5)
    by_patient = patient_bootstrap(ys, [f"P{i // 5}" for i in range(100)], {"a": repeated}, 2, n_boot=300)
    by_image = patient_bootstrap(ys, [f"I{i}" for i in range(100)], {"a": repeated}, 2, n_boot=300)
    width = lambda r: r["ci"]["a"][1] - r["ci"]["a"][0]  # noqa: E731
    assert width(by_patient) > 1.5 * width(by_image)


def test_half_replacement_drops_half_the_patients_and_keeps_the_label_mix():
    y = np.repeat([0, 1, 0, 1], 3)
    pids = np.repeat(["A", "B", "C", "D"], 3)
    syn = np.array([0] * 10 + [1] * 10)
    keep, chosen = _half_replacement(y, pids, syn, np.random.default_rng(0))
    assert len(set(pids[keep])) == 2 and len(keep) + len(chosen) == len(y)
    removed = np.setdiff1d(np.arange(len(y)), keep)
    assert sorted(syn[chosen]) == sorted(y[removed]) and len(set(chosen.tolist())) == len(chosen)


def test_evaluate_utility_flags_a_release_with_wrong_labels():
    xtr, ytr, ptr = _cohort(12, seed=0)
    xho, yho, pho = _cohort(10, seed=1, prefix="H")
    good_x, good_y, _ = _cohort(12, seed=2)
    bad_x, bad_y, _ = _cohort(12, seed=2, swap=True)
    kw = dict(num_classes=2, steps=30, batch_size=16, n_boot=50)
    good = evaluate_utility(xtr, ytr, ptr, xho, yho, pho, good_x, good_y, **kw)
    bad = evaluate_utility(xtr, ytr, ptr, xho, yho, pho, bad_x, bad_y, **kw)
    assert good["auc_real"] > 0.9 and good["auc_synthetic"] > 0.9
    assert bad["auc_synthetic"] < 0.2 and bad["auc_real"] == good["auc_real"]
    assert bad["paired"]["synthetic_vs_real"]["p_value"] < 0.05
    assert good["sizes"]["half"] == good["sizes"]["real"]
    assert set(good["roc"]) == {"synthetic", "real", "half"}
