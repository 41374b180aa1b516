"""A perceptual distance whose feature extractor is read from a local file, so training never downloads weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["LocalPerceptualLoss"]


class LocalPerceptualLoss(torch.nn.Module):
    """LPIPS-style perceptual distance with a feature extractor read from a local file (never downloaded).

    The distance is the mean over layers of the squared difference of channel-normalised features (Zhang et al.
    2018, without the learned linear heads). Images with fewer channels than the extractor expects are repeated
    along the channel axis.

    Args:
        network: a feature extractor module, or a path to a TorchScript file (``torch.jit.save``) of one. Its
            forward returns a tensor or a list/tuple of tensors (one per layer).
        in_channels: channels the extractor expects (e.g. 3 for ImageNet networks); ``None`` leaves images as they are.

    Raises:
        FileNotFoundError: the weights file is missing (with what to do instead).
    """

    def __init__(self, network: torch.nn.Module | str | os.PathLike, in_channels: int | None = None) -> None:
        super().__init__()
        if isinstance(network, (str, os.PathLike)):
            path = Path(network)
            if not path.is_file():
                raise FileNotFoundError(
                    f"perceptual network file {str(path)!r} not found. Perceptual loss needs a local TorchScript "
                    "feature extractor; set perceptual_weight to 0 to train without it."
                )
            network = torch.jit.load(str(path), map_location="cpu")
        self.network = network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.in_channels = in_channels

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            x = x.repeat(1, self.in_channels // x.shape[1], *([1] * (x.ndim - 2)))
        feats = self.network(x)
        return list(feats) if isinstance(feats, (list, tuple)) else [feats]

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = input.new_zeros(())
        fi, ft = self._features(input), self._features(target)
        for a, b in zip(fi, ft):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (a - b).pow(2).sum(1).mean()
        return total / max(len(fi), 1)
