"""Ignite handlers for monai_synth engines: checkpoints, reseeding, EMA weights, scale factor, sample grids, safeguard."""

from __future__ import annotations

from .checkpoint_saver import AtomicCheckpointSaver
from .decoder_noise import DecoderNoiseHandler
from .ema import EMAWeightsHandler
from .privacy import PrivacySafeguardHandler
from .sample_grid import SampleGridHandler, make_sample_grid, save_grid_png
from .scale_factor import ScaleFactorHandler
from .seed import IterationSeedHandler

__all__ = [
    "AtomicCheckpointSaver",
    "DecoderNoiseHandler",
    "EMAWeightsHandler",
    "IterationSeedHandler",
    "PrivacySafeguardHandler",
    "SampleGridHandler",
    "ScaleFactorHandler",
    "make_sample_grid",
    "save_grid_png",
]
