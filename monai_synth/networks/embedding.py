"""Copy-detection and patient re-identification encoder used by the learned ``embedding`` privacy space.

The network maps one image to a unit-length vector so that an image and its altered copies (rotated, shifted,
cropped, noised, blurred, partly replaced), and images of the same patient (repeat studies), land close together,
and other images land far apart. It is trained in :mod:`monai_synth.privacy.embedding`; this module only defines
the architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers.factories import Pool
from torch import nn

__all__ = ["PatientEmbeddingNet", "rank_normalise"]

_INPUT_NORMS = ("none", "rank")


class PatientEmbeddingNet(nn.Module):
    """Small residual CNN -> global average pooling -> MLP projection -> L2-normalised embedding.

    The design follows the encoder + projection head of supervised contrastive learning (Khosla et al.,
    "Supervised Contrastive Learning", NeurIPS 2020), scaled down so that it trains in seconds on a CPU for
    small cohorts. Global pooling makes the vector insensitive to where the anatomy sits in the field of view,
    which is what a copy detector needs (a shifted copy is still a copy).

    Choices that matter for learning at all on small, similar-looking cohorts:

    * the residual stages normalise with group normalisation with one group (a layer norm over channels and space,
      the default) or batch normalisation (what :func:`~monai_synth.privacy.embedding.train_embedding` uses: on the
      phantom cohorts it reached a lower loss in the same few hundred CPU steps), not instance norm: instance norm zeroes every
      channel's spatial mean, so the global average pool that follows would see almost no image content;
    * the projection head has a batch norm (as in SimCLR's head): it centres the pooled features across the
      batch, so at initialisation the images do not all map to nearly the same vector, which stalls the
      contrastive loss at its chance value;
    * ``input_norm="rank"`` replaces each image's values by their ranks (:func:`rank_normalise`) before the first
      layer: any monotone change of contrast (gamma, gain, offset, windowing) leaves the ranks unchanged, so the
      vector cannot move with it, and an intensity inversion (``x -> -x``) exactly negates them.

    In evaluation mode (how :class:`~monai_synth.privacy.embedding.EmbeddingSpace` runs it) all of these are fixed
    per-image maps, so an image's vector does not depend on the rest of its batch.

    Args:
        spatial_dims: number of spatial dimensions of the input, 2 or 3.
        in_channels: number of input channels (1 for the grey-level images of this package).
        channels: output channels of each residual stage; every stage after the first halves the resolution,
            so inputs should have at least ``2 ** (len(channels) - 1)`` pixels per axis.
        out_dim: length of the output embedding.
        num_res_units: sub-units (conv + norm + act) per residual stage.
        act: activation type and arguments, as understood by MONAI's layer factories.
        norm: normalisation type and arguments, as understood by MONAI's layer factories.
        dropout: dropout probability inside the residual stages.
        input_norm: ``"none"`` (the model-space values as they are; how version-1 weights were trained) or
            ``"rank"`` (see above).

    Raises:
        ValueError: for unsupported ``spatial_dims``, non-positive channel counts, ``out_dim`` or
            ``num_res_units``, an empty ``channels``, or an unknown ``input_norm``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        out_dim: int = 128,
        num_res_units: int = 2,
        act: tuple | str = "PRELU",
        norm: tuple | str = ("GROUP", {"num_groups": 1}),
        dropout: float = 0.0,
        input_norm: str = "none",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels}.")
        channels = tuple(int(c) for c in channels)
        if len(channels) == 0 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive integers, got {channels}.")
        if int(out_dim) < 1:
            raise ValueError(f"out_dim must be a positive integer, got {out_dim}.")
        if int(num_res_units) < 1:
            raise ValueError(f"num_res_units must be at least 1, got {num_res_units}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if input_norm not in _INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {list(_INPUT_NORMS)}, got {input_norm!r}.")

        self.spatial_dims = spatial_dims
        self.in_channels = int(in_channels)
        self.channels = channels
        self.out_dim = int(out_dim)
        self.input_norm = input_norm

        self.stem = Convolution(
            spatial_dims, self.in_channels, channels[0], strides=1, kernel_size=3, act=act, norm=norm
        )
        stages: list[nn.Module] = []
        prev = channels[0]
        for i, c in enumerate(channels):
            if i > 0:
                # average-pool then convolve, rather than a strided convolution: the box filter reduces the
                # aliasing that makes strided CNNs change their output when the input moves by a few pixels.
                stages.append(Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2))
            stages.append(
                ResidualUnit(
                    spatial_dims,
                    prev,
                    c,
                    strides=1,
                    kernel_size=3,
                    subunits=num_res_units,
                    act=act,
                    norm=norm,
                    dropout=dropout or None,
                )
            )
            prev = c
        self.stages = nn.Sequential(*stages)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        # projection head: contrastive training works better on a non-linear head (SimCLR / SupCon);
        # we keep the head's output as the embedding because the privacy index compares exactly that space.
        self.head = nn.Sequential(
            nn.Linear(prev, prev, bias=False),
            nn.BatchNorm1d(prev),
            nn.ReLU(inplace=True),
            nn.Linear(prev, self.out_dim),
        )

    @property
    def min_size(self) -> int:
        """Smallest spatial size per axis the network handles (one pixel left after the last down-sampling)."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images.

        Args:
            x: images of shape ``(B, in_channels, *spatial)`` with ``spatial_dims`` spatial axes.

        Returns:
            float tensor ``(B, out_dim)`` whose rows have unit L2 norm, so cosine similarity is a dot product.

        Raises:
            ValueError: when ``x`` has the wrong number of dimensions or channels.
        """
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected input of shape (B, C, {'D, ' if self.spatial_dims == 3 else ''}H, W) for "
                f"spatial_dims={self.spatial_dims}, got shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})."
            )
        if self.input_norm == "rank":
            x = rank_normalise(x)
        h = self.stages(self.stem(x))
        h = self.pool(h).flatten(1)
        return F.normalize(self.head(h), dim=1)


def rank_normalise(x: torch.Tensor) -> torch.Tensor:
    """Each channel of each image with its values replaced by their mid-ranks among its own values, scaled to [-1, 1].

    A per-image histogram equalisation: the result depends only on the order of the values, so any strictly
    increasing intensity map leaves it unchanged, and negating the image negates it exactly (mid-ranks, so tied
    values, e.g. a flat background, all get the same rank and no artificial texture). ``(B, C, *spatial)`` in and out.
    """
    flat = x.flatten(2)
    srt = flat.sort(dim=2).values
    lo = torch.searchsorted(srt, flat.contiguous(), right=False)
    hi = torch.searchsorted(srt, flat.contiguous(), right=True)
    n = flat.shape[2]
    r = (lo + hi - 1).to(x.dtype) / max(n - 1, 1) - 1.0
    return r.reshape(x.shape)
