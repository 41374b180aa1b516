"""Restoration utility: degradations in the modality's physical units, and the equivalence test's verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.data.phantoms import generate_cohort
from monai_synth.evaluation.restoration import degrade, evaluate_restoration, image_quality
from monai_synth.transforms.presets import intensity_transform


def _cohort(modality, n_patients, first=0, per=2):
    tf = intensity_transform(modality)
    recs = generate_cohort(modality, n_patients, per, spatial_size=16, seed=0, first_patient=first)
    images = torch.stack([torch.as_tensor(np.asarray(tf(r["image"])), dtype=torch.float32) for r in recs])
    return images, [r["patient_id"] for r in recs]


def test_ct_noise_has_the_stated_sigma_in_hounsfield_units():
    tf = intensity_transform("ct")
    clean = tf(torch.zeros(64, 1, 16, 16))  # water: 0 HU, far from the window's edges
    noisy = degrade(clean, "denoise", "ct", seed=1, options={"sigma_hu": 30.0})
    assert float((tf.inverse(noisy) - tf.inverse(clean)).std()) == pytest.approx(30.0, rel=0.05)


def test_pet_noise_is_poisson_its_variance_grows_with_the_uptake():
    tf = intensity_transform("pet")
    low, high = tf(torch.full((64, 1, 16, 16), 1.0)), tf(torch.full((64, 1, 16, 16), 4.0))
    k = 20.0
    var = [float(tf.inverse(degrade(x, "denoise", "pet", 0, {"counts_per_suv": k})).var()) for x in (low, high)]
    assert var[0] == pytest.approx(1.0 / k, rel=0.1) and var[1] == pytest.approx(4.0 / k, rel=0.1)


def test_superres_input_keeps_the_grid_and_loses_the_finest_detail():
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1.0
    x = checker.reshape(1, 1, 16, 16)
    low = degrade(x, "superres", "mri")
    assert low.shape == x.shape and float(low.abs().max()) < 1e-6  # a 1-pixel checkerboard averages out
    smooth = torch.linspace(-1, 1, 16).reshape(1, 1, 16, 1).expand(1, 1, 16, 16)
    assert float((degrade(smooth, "superres", "mri") - smooth).abs().max()) < 0.1


def test_psnr_is_exact_for_a_constant_error():
    clean = torch.zeros(2, 1, 16, 16)
    q = image_quality(clean + 0.02, clean)  # MSE 4e-4, range 2: 10 log10(4 / 4e-4) = 40 dB
    assert np.allclose(q["psnr"], 40.0) and q["ssim"].shape == (2,)


@pytest.mark.parametrize("task", ["denoise", "superres"])
def test_real_and_synthetic_of_one_population_are_equivalent_and_blank_synthetic_is_not(task):
    train, _ = _cohort("pet", 12)
    hold, phold = _cohort("pet", 8, first=50)
    same, _ = _cohort("pet", 12, first=100)
    res = evaluate_restoration(task, "pet", train, hold, phold, same, steps=150, seed=0)
    assert res["psnr_real"] > res["psnr_degraded"] + 1.0, "the restoration network learnt nothing"
    assert res["tost"]["psnr"]["margin"] == 0.5 and abs(res["tost"]["psnr"]["difference"]) < 0.5
    assert res["tost"]["ssim"]["equivalent"]
    blank = torch.full_like(same, -1.0)  # a "generator" of empty images: nothing to learn from
    res = evaluate_restoration(task, "pet", train, hold, phold, blank, steps=150, seed=0)
    assert not res["tost"]["psnr"]["equivalent"] and res["psnr_synthetic"] < res["psnr_real"]
