"""A privacy space blind to any intensity curve: each image's pixel values replaced by their ranks within it.

Pearson correlation ignores a gain and an offset, and the pixel space undoes a few gamma curves, but a copy under any
other monotone intensity map (histogram equalisation, a contrast window, a log or sigmoid curve, a lookup table) is
as far from its source there as a new patient is: on PET slices, where a few hot organs carry the correlation,
histogram-equalised copies sat 12x the pixel space's threshold from their sources and passed the whole gate. Ranks are
what every such map keeps: a copy's rank image is its source's, up to ties. :class:`RankSpace` (``"ranks"``) is the
pixel space on rank images, with flips, transposes (2D), small shifts and inversion (reversed ranks).

A curve that differs from one part of the image to another (histogram equalisation of each part on its own, a smooth
gain field, a faint overlay of another image) keeps no global ranks, but it keeps each pixel's rank among its
neighbours: :class:`LocalRankSpace` (``"localranks"``) is the pixel space on those local ranks (a census transform's
count of darker neighbours).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from monai_synth.privacy.spaces import PixelSpace, scaled_batch

__all__ = ["LocalRankSpace", "RankSpace", "intensity_ranks", "local_ranks"]


def intensity_ranks(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> the same shape, each image's (and channel's) values replaced by their mean rank among
    its own values, scaled to (0, 1): ties (a background, a posterised copy) share their mean rank."""
    flat = x.reshape(x.shape[0] * x.shape[1], -1).numpy()
    ranks = rankdata(flat, method="average", axis=1)
    return torch.from_numpy(((ranks - 0.5) / flat.shape[1]).astype(np.float32)).reshape(x.shape)


def local_ranks(x: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """``(B, C, *spatial)`` -> the same shape, each value replaced by its rank among its ``(2 radius + 1) ** n``
    neighbourhood: the share of its neighbours below it, ties counted half (edges replicated, so a value beyond the
    border ties with itself)."""
    nd = x.ndim - 2
    padded = F.pad(x, (radius,) * (2 * nd), mode="replicate")
    out = torch.zeros_like(x)
    offsets = [o for o in itertools.product(range(2 * radius + 1), repeat=nd) if any(v != radius for v in o)]
    for offset in offsets:
        nb = padded[(slice(None), slice(None), *[slice(o, o + n) for o, n in zip(offset, x.shape[2:])])]
        out += (nb < x).float() + 0.5 * (nb == x).float()
    return out / len(offsets)


class RankSpace(PixelSpace):
    """Distance = 1 - Pearson correlation of the images' rank images on a grid (Spearman-like, per grid cell).

    Measured on 2D phantom slices at 64^2 (80 training patients of 3 slices, 108 holdout slices; threshold = the
    holdout's 1% quantile of this space alone): histogram-equalised copies at distance 0 in every modality (PET in the
    pixel space: 12x its threshold), gamma and brightened copies at 0, median-filtered (5 px) PET, CT and ultrasound
    copies 4 of 4 below the threshold, elastically warped (2 px) 3-4 of 4 in every modality; new patients' slices
    0 of 60 below it in PET and CT, 1 of 60 in ultrasound, 2 of 60 in MRI. Copies whose intensities collapse onto a
    few values (posterised PET and CT, where the body is one level) or whose geometry changed are the other spaces'
    job.

    Args:
        grid: side of the grid the rank images are reduced to (area: each cell holds the mean rank of its pixels).
        spatial_dims: 2 or 3.
        invariances: any of :class:`~monai_synth.privacy.spaces.PixelSpace`'s; ``"invert"`` is the reversed ranks.
        max_shift: largest shift in grid cells when ``"shift"`` is requested.
    """

    def __init__(
        self,
        grid: int = 16,
        spatial_dims: int = 2,
        invariances: Sequence[str] = ("flip", "transpose", "shift", "invert"),
        max_shift: int = 2,
    ) -> None:
        super().__init__(grid=grid, spatial_dims=spatial_dims, invariances=invariances, max_shift=max_shift)
        self.name = "ranks"

    def _prepared(self, images: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
        return intensity_ranks(scaled_batch(images, self.spatial_dims))

    def __repr__(self) -> str:
        return (
            f"RankSpace(grid={self.grid}, spatial_dims={self.spatial_dims}, invariances={self.invariances}, "
            f"max_shift={self.max_shift})"
        )


class LocalRankSpace(RankSpace):
    """Distance = 1 - Pearson correlation, on a grid, of each pixel's rank among its neighbours (:func:`local_ranks`).

    Any intensity change that is monotone over each small neighbourhood keeps these ranks, however it varies across
    the image. Measured on 2D phantom slices at 64^2 (80 training patients of 3 slices, 60 new patients; the largest
    copy distance over the new patients' 1% quantile, this space alone, ``benchmarks/space_reach.py``): copies
    equalised per half of each axis PET 0.52, CT 0.77, MRI 0.20, ultrasound 0.13 (``ranks``: PET 19.3); blended
    70/30 with another image PET 0.59, CT 0.98, MRI 0.39, ultrasound 0.27 (``ranks``: PET 2.2); under a smooth gain
    field 0.01-0.05. Larger neighbourhoods (5-25 px) did worse on PET. Copies that moved or lost detail are the other
    spaces' job (rotation 10 degrees: 1.1-2.2).

    Args:
        radius: neighbourhood half-width in pixels of the judged image (1: 3 x 3, or 3 x 3 x 3 in 3D).
        others: as :class:`RankSpace`.
    """

    def __init__(
        self,
        grid: int = 16,
        spatial_dims: int = 2,
        invariances: Sequence[str] = ("flip", "transpose", "shift", "invert"),
        max_shift: int = 2,
        radius: int = 1,
    ) -> None:
        if int(radius) < 1:
            raise ValueError(f"radius must be at least 1 pixel, got {radius}")
        super().__init__(grid=grid, spatial_dims=spatial_dims, invariances=invariances, max_shift=max_shift)
        self.name = "localranks"
        self.radius = int(radius)

    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors (the pixel space's settings and the neighbourhood)."""
        return hashlib.sha256(f"{super().fingerprint()}:radius={self.radius}".encode()).hexdigest()

    def _prepared(self, images: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
        return local_ranks(scaled_batch(images, self.spatial_dims), self.radius)

    def __repr__(self) -> str:
        return (
            f"LocalRankSpace(grid={self.grid}, spatial_dims={self.spatial_dims}, invariances={self.invariances}, "
            f"max_shift={self.max_shift}, radius={self.radius})"
        )
