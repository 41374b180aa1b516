"""Tiny networks and data shared by the engine tests: 8-channel AutoencoderKL on 16-pixel images, tiny DiT."""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from tiny_networks import tiny_autoencoder

from monai_synth.networks import DiffusionTransformer

LABELS = ("3", "4a", "4b")


def make_autoencoder(seed: int = 0) -> AutoencoderKL:
    return tiny_autoencoder(seed=seed)


def make_discriminator(seed: int = 0) -> PatchDiscriminator:
    torch.manual_seed(seed)
    return PatchDiscriminator(spatial_dims=2, channels=8, in_channels=1, num_layers_d=2, norm="INSTANCE")


def make_dit(seed: int = 0, num_classes: int = len(LABELS), randomize: bool = False) -> DiffusionTransformer:
    """Tiny DiT on (3, 8, 8) latents with a one-hot context; ``randomize`` replaces the adaLN-Zero zeros."""
    torch.manual_seed(seed)
    net = DiffusionTransformer.from_preset(
        "tiny", spatial_dims=2, in_channels=3, out_channels=3, input_size=8, context_dim=num_classes
    )
    if randomize:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


def make_images(n: int = 8, seed: int = 0, labels=LABELS) -> list[dict]:
    """Model-space images whose brightness depends on the class, with patient ids and a continuous condition."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        k = i % len(labels)
        image = (torch.rand((1, 16, 16), generator=gen) - 0.5) * 0.5 + (k - 1) * 0.4
        items.append({"image": image, "label": labels[k], "patient_id": f"P{i:04d}", "age": float(40 + i)})
    return items
