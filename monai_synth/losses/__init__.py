"""Losses of the training engines (KL, perceptual from local weights) and of the privacy embedding (SupCon)."""

from __future__ import annotations

from monai_synth.losses.contrastive import SupervisedContrastiveLoss
from monai_synth.losses.kl import kl_divergence
from monai_synth.losses.perceptual import LocalPerceptualLoss

__all__ = ["LocalPerceptualLoss", "SupervisedContrastiveLoss", "kl_divergence"]
