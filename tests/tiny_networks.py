"""The tiny autoencoder every test builds: one place for its shape, so the suite stays fast in one edit."""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL


def tiny_autoencoder(
    spatial_dims: int = 2,
    channels: tuple[int, ...] = (8, 8),
    latent_channels: int = 3,
    network: type[AutoencoderKL] = AutoencoderKL,
    seed: int = 0,
) -> AutoencoderKL:
    """A two-level, attention-free ``network`` (AutoencoderKL or a subclass) seeded for reproducible weights."""
    torch.manual_seed(seed)
    return network(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=channels,
        latent_channels=latent_channels,
        num_res_blocks=1,
        norm_num_groups=4,
        attention_levels=(False,) * len(channels),
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
