"""Losses: the closed-form KL term and a perceptual distance read only from a local file."""

from __future__ import annotations

import pytest
import torch

from monai_synth.losses import LocalPerceptualLoss, kl_divergence


def test_kl_divergence_matches_closed_form():
    mu, sigma = torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 0.5]])
    expected = 0.5 * ((0.25 + 1 - 0 - 1) + (1 + 0.25 - torch.log(torch.tensor(0.25)) - 1))
    assert float(kl_divergence(mu, sigma)) == pytest.approx(float(expected))
    assert float(kl_divergence(torch.zeros(2, 3), torch.ones(2, 3))) == 0.0


def test_perceptual_loss_from_local_file_only(tmp_path):
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
    path = tmp_path / "features.pt"
    torch.jit.script(features).save(str(path))
    loss = LocalPerceptualLoss(path)
    x, y = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(x, y)) > 0
    with pytest.raises(FileNotFoundError, match="perceptual_weight"):
        LocalPerceptualLoss(tmp_path / "missing.pt")
