"""Inferers of monai_synth's networks: validation reconstructions and sliding-window decoding of large latents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer

from monai_synth.engines.utils import unwrap_model

__all__ = ["ReconstructionInferer", "SlidingWindowDecoder"]


class ReconstructionInferer(Inferer):
    """Inferer returning only ``autoencoder.reconstruct(x)`` (decoding ``z_mu``), for validation metrics."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return unwrap_model(network).reconstruct(inputs)


class SlidingWindowDecoder(torch.nn.Module):
    """An autoencoder whose ``decode_stage_2_outputs`` decodes the latent window by window (MONAI sliding window).

    A volume larger than the autoencoder decodes at once (e.g. larger than it was trained on, or than GPU memory
    allows for a 128^3 decoder pass) is decoded from overlapping latent windows of ``roi_size`` blended with Gaussian
    weights; MONAI's ``SlidingWindowInferer`` scales each window to the decoder's output size. It drops into MONAI's
    ``LatentDiffusionInferer.sample`` in place of the autoencoder.

    Args:
        autoencoder: the stage-1 ``AutoencoderKL``.
        roi_size: latent window size per spatial axis.
        overlap: fraction of overlap between windows.
        sw_batch_size: windows decoded per forward pass.
    """

    def __init__(
        self, autoencoder: torch.nn.Module, roi_size: Sequence[int], overlap: float = 0.25, sw_batch_size: int = 1
    ) -> None:
        super().__init__()
        self.autoencoder = unwrap_model(autoencoder)
        self.roi_size = tuple(int(r) for r in roi_size)
        if not self.roi_size or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be positive latent sizes, got {roi_size}")
        self.inferer = SlidingWindowInferer(
            roi_size=self.roi_size, sw_batch_size=int(sw_batch_size), overlap=float(overlap), mode="gaussian"
        )

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents ``(B, C, *spatial)`` into images, one window at a time where the latent exceeds ``roi_size``."""
        if len(self.roi_size) != z.ndim - 2:
            raise ValueError(f"roi_size {list(self.roi_size)} does not match latents of shape {tuple(z.shape)}")
        if all(s <= r for s, r in zip(z.shape[2:], self.roi_size)):
            return self.autoencoder.decode_stage_2_outputs(z)
        return self.inferer(z, self.autoencoder.decode_stage_2_outputs)
