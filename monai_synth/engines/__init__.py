"""Training engines for the two stages of latent diffusion, the latent cache, the sampler and checkpoints."""

from __future__ import annotations

from monai_synth.engines.autoencoder import (
    AutoencoderKLTrainer,
    AutoencoderPrepareBatch,
    LocalPerceptualLoss,
    ReconstructionInferer,
    check_autoencoder_spatial_size,
    kl_divergence,
)
from monai_synth.engines.checkpoint import (
    AtomicCheckpointSaver,
    CheckpointMetadata,
    CheckpointMismatchError,
    IterationSeedHandler,
    atomic_torch_save,
    checkpoint_fingerprint,
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
from monai_synth.engines.latents import LatentDataset, ScaleFactor, cache_latents, compute_scale_factor, encode_labels
from monai_synth.engines.sampler import LatentSampler, sample_latent_images
from monai_synth.engines.utils import unwrap_model

__all__ = [
    "AtomicCheckpointSaver",
    "AutoencoderKLTrainer",
    "AutoencoderPrepareBatch",
    "CheckpointMetadata",
    "CheckpointMismatchError",
    "IterationSeedHandler",
    "LatentDataset",
    "LatentDiffusionPrepareBatch",
    "LatentSampler",
    "LocalPerceptualLoss",
    "ReconstructionInferer",
    "RectifiedFlowPrepareBatch",
    "ScaleFactor",
    "atomic_torch_save",
    "WarmupCosine",
    "cache_latents",
    "check_autoencoder_spatial_size",
    "checkpoint_fingerprint",
    "compute_scale_factor",
    "diffusion_prepare_batch",
    "drop_condition",
    "encode_labels",
    "kl_divergence",
    "load_checkpoint",
    "make_condition",
    "sample_latent_images",
    "unwrap_model",
]
