"""Inferers of monai_synth's networks, for MONAI evaluators and validation handlers."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer

from monai_synth.engines.utils import unwrap_model

__all__ = ["ReconstructionInferer"]


class ReconstructionInferer(Inferer):
    """Inferer returning only ``autoencoder.reconstruct(x)`` (decoding ``z_mu``), for validation metrics."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return unwrap_model(network).reconstruct(inputs)
