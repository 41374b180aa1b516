"""monai_synth: privacy-safeguarded conditional latent diffusion transformers for medical images."""

from __future__ import annotations

__version__ = "0.1.0"
