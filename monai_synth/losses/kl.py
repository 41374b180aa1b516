"""The KL term of a variational autoencoder's loss."""

from __future__ import annotations

import torch

__all__ = ["kl_divergence"]


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch (MONAI tutorials' form)."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(1).mean()
