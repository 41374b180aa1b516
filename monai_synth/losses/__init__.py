"""Losses of the training engines (KL, perceptual from local weights)."""

from __future__ import annotations

from monai_synth.losses.kl import kl_divergence
from monai_synth.losses.perceptual import LocalPerceptualLoss

__all__ = ["LocalPerceptualLoss", "kl_divergence"]
