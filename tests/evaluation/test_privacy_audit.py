"""The audit: chance levels in closed form, and the planted-memorisation control.

A "generator" returning lightly perturbed training images must be flagged; one returning new patients (a phantom
cohort with unseen patient ids) must not be.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.data.phantoms import generate_cohort
from monai_synth.evaluation.privacy import (
    audit_privacy,
    map_at_r_chance,
    match_rates,
    nearest_neighbour_analysis,
    pixel_vectors,
    precision_at_1_chance,
    reidentification_power,
)
from monai_synth.transforms.presets import intensity_transform


def _cohort(n_patients, first=0, per=3):
    tf = intensity_transform("us")
    recs = generate_cohort("us", n_patients, per, spatial_size=32, seed=0, first_patient=first)
    images = torch.stack([torch.as_tensor(np.asarray(tf(r["image"])), dtype=torch.float32) for r in recs])
    return images, [r["patient_id"] for r in recs]


@pytest.fixture(scope="module")
def cohorts():
    return {"train": _cohort(16), "holdout": _cohort(8, first=16), "unseen": _cohort(8, first=100)}


def test_chance_levels_match_a_random_ranking():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(10), 3)  # 10 patients, 3 images each
    ap, p1 = [], []
    for _ in range(2000):
        q = 0
        order = rng.permutation(np.arange(1, 30))  # a random ranking of the other 29 images
        rel = ids[order] == ids[q]
        hits = np.cumsum(rel[:2])
        ap.append(np.sum(hits / np.arange(1, 3) * rel[:2]) / 2)
        p1.append(rel[0])
    assert map_at_r_chance([2], [29]) == pytest.approx(np.mean(ap), abs=0.01)
    assert precision_at_1_chance([2], [29]) == pytest.approx(np.mean(p1), abs=0.015)


def test_reidentification_power_is_perfect_for_separable_patients_and_near_chance_for_noise():
    ids = [f"P{i // 3}" for i in range(30)]
    centres = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    perfect = torch.nn.functional.normalize(centres[torch.arange(30) // 3] + 0.01 * torch.randn(30, 16), dim=1)
    res = reidentification_power(perfect, ids)
    assert res["map_at_r"] == pytest.approx(1.0) and res["precision_at_1"] == pytest.approx(1.0)
    noise = reidentification_power(torch.nn.functional.normalize(torch.randn(30, 16), dim=1), ids)
    assert noise["map_at_r"] < 0.3 and res["map_at_r_chance"] == pytest.approx(map_at_r_chance([2] * 30, [29] * 30))


def test_match_rate_is_the_holdout_quantile_for_the_holdout():
    rates = match_rates(np.linspace(0.0, 1.0, 11), np.linspace(0.5, 1.5, 201), holdout_quantile=0.05)
    assert rates["match_rate_holdout"] == pytest.approx(0.05, abs=0.006)
    assert rates["match_rate"] == pytest.approx(6 / 11)


def test_nearest_neighbour_analysis_flags_exact_copies_only():
    train = pixel_vectors(torch.randn(20, 1, 8, 8))
    holdout = pixel_vectors(torch.randn(20, 1, 8, 8))
    copies = nearest_neighbour_analysis(train[:5], holdout, train)
    fresh = nearest_neighbour_analysis(pixel_vectors(torch.randn(20, 1, 8, 8)), holdout, train)
    assert copies["memorisation_rate"] == 1.0 and copies["share_below_q01"] == 1.0
    assert fresh["memorisation_rate"] <= 0.1


def test_planted_memorisation_is_flagged_and_unseen_patients_are_not(cohorts):
    (tr, ptr), (ho, pho), (new, pnew) = cohorts["train"], cohorts["holdout"], cohorts["unseen"]
    assert not set(pnew) & set(ptr)
    g = torch.Generator().manual_seed(5)
    copies = tr[:24] * 1.03 + 0.02 + 0.03 * torch.randn(tr[:24].shape, generator=g)
    leak, leak_private = audit_privacy(tr, ptr, ho, pho, copies, steps=60)
    clean, _ = audit_privacy(tr, ptr, ho, pho, new, steps=60)
    assert leak["memorisation_rate"] > 0.8 and leak["reid_match_rate"] > 0.5
    assert clean["memorisation_rate"] < 0.15 and clean["reid_match_rate"] < 0.15
    assert clean["reid_match_rate_holdout"] < 0.15
    # the network re-identifies real patients above chance (else the match rates mean nothing)
    assert clean["reid_map_at_r_real"] > 2 * clean["reid_chance"]
    # the private report's closest pair of a copy is its source image
    pair = leak_private["closest_pairs"]["pixels"][0]
    assert pair["train"] == pair["synthetic"]
    assert "closest_pairs" not in leak and not any(p in str(leak) for p in ptr)
