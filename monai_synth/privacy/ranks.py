"""A privacy space blind to any intensity curve: each image's pixel values replaced by their ranks within it.

Pearson correlation ignores a gain and an offset, and the pixel space undoes a few gamma curves, but a copy under any
other monotone intensity map (histogram equalisation, a contrast window, a log or sigmoid curve, a lookup table) is
as far from its source there as a new patient is: on PET slices, where a few hot organs carry the correlation,
histogram-equalised copies sat 12x the pixel space's threshold from their sources and passed the whole gate. Ranks are
what every such map keeps: a copy's rank image is its source's, up to ties. :class:`RankSpace` (``"ranks"``) is the
pixel space on rank images, with flips, transposes (2D), small shifts and inversion (reversed ranks).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from monai_synth.privacy.spaces import PixelSpace, scaled_batch

__all__ = ["RankSpace", "intensity_ranks"]


def intensity_ranks(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> the same shape, each image's (and channel's) values replaced by their mean rank among
    its own values, scaled to (0, 1): ties (a background, a posterised copy) share their mean rank."""
    flat = x.reshape(x.shape[0] * x.shape[1], -1).numpy()
    ranks = rankdata(flat, method="average", axis=1)
    return torch.from_numpy(((ranks - 0.5) / flat.shape[1]).astype(np.float32)).reshape(x.shape)


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
