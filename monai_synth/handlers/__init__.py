"""Ignite handlers for monai_synth engines."""

from __future__ import annotations

from .ema import EMAHandler
from .privacy import PrivacySafeguardHandler
from .sample_grid import SampleGridHandler, make_sample_grid, save_grid_png
from .scale_factor import ScaleFactorHandler

__all__ = [
    "PrivacySafeguardHandler",
    "EMAHandler",
    "SampleGridHandler",
    "make_sample_grid",
    "save_grid_png",
    "ScaleFactorHandler",
]
