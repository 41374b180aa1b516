"""Training engines for the two stages of latent diffusion, the latent cache, the sampler and checkpoints.

Losses are in :mod:`monai_synth.losses`, inferers in :mod:`monai_synth.inferers`, Ignite handlers in
:mod:`monai_synth.handlers`.
"""

from __future__ import annotations

from monai_synth.engines.autoencoder import (
    AutoencoderKLTrainer,
    AutoencoderPrepareBatch,
)
from monai_synth.engines.checkpoint import (
    CheckpointMetadata,
    CheckpointMismatchError,
    atomic_torch_save,
    checkpoint_fingerprint,
    latest_checkpoint,
    load_checkpoint,
)
from monai_synth.engines.diffusion import (
    LatentDiffusionPrepareBatch,
    RectifiedFlowPrepareBatch,
    WarmupCosine,
    diffusion_prepare_batch,
    drop_condition,
    make_condition,
)
from monai_synth.engines.latents import (
    LatentDataset,
    ScaleFactor,
    cache_latents,
    compute_scale_factor,
    encode_labels,
    ensure_latent_cache,
    latent_channel_stats,
    standardise_latent_channels,
)
from monai_synth.engines.sampler import Generator, LatentSampler, sample_latent_images
from monai_synth.engines.utils import unwrap_model

__all__ = [
    "AutoencoderKLTrainer",
    "AutoencoderPrepareBatch",
    "CheckpointMetadata",
    "CheckpointMismatchError",
    "Generator",
    "LatentDataset",
    "LatentDiffusionPrepareBatch",
    "LatentSampler",
    "RectifiedFlowPrepareBatch",
    "ScaleFactor",
    "atomic_torch_save",
    "WarmupCosine",
    "cache_latents",
    "checkpoint_fingerprint",
    "compute_scale_factor",
    "latent_channel_stats",
    "standardise_latent_channels",
    "diffusion_prepare_batch",
    "drop_condition",
    "encode_labels",
    "ensure_latent_cache",
    "latest_checkpoint",
    "load_checkpoint",
    "make_condition",
    "sample_latent_images",
    "unwrap_model",
]
