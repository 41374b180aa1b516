"""A privacy space for the fine texture of an image: what a copy keeps when it is noised beyond the pixel space.

Two images of different patients share their coarse layout (the body on a dark background, the ultrasound fan), so on
a coarse grid they correlate at 0.8-0.98 and a copy is only caught while its own distortion stays below that gap.
Strong noise does not: an ultrasound image with multiplicative speckle of sd 0.5 is as far from its source on the
pixel space's 16-cell grid as a new patient is from the nearest training image. The fine texture of an image (its
speckle, the noise of its acquisition, the edges of its anatomy at full resolution) is a fingerprint of that one
image: images of different patients, even of the same patient on another day, do not share it (their texture
correlates at about 0), while a copy keeps it under added noise, gamma, inversion and quantisation.

:class:`TextureSpace` (``"texture"``) compares that texture: the image resampled to a fine grid minus its local mean
(a box filter), standardised, so distance = 1 - Pearson correlation of the two high-passed images. Blurred, shifted or
rotated copies lose the texture and are the other spaces' job; this one never loosens them (its own threshold).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_synth.privacy.spaces import (
    _apply_symmetry,
    _checked_invariances,
    _fingerprint,
    _query_symmetries,
    _standardise,
    scaled_batch,
)

__all__ = ["TextureSpace"]


class TextureSpace:
    """Distance = 1 - Pearson correlation of the images' fine texture (image minus its local mean).

    Args:
        grid: side of the grid images are resampled to (area interpolation; the whole field of view), fine enough to
            keep the texture: 64 for 2D images of 64 pixels or more.
        spatial_dims: 2 or 3.
        kernel: side of the box filter whose local mean is removed, in grid cells (odd); default about ``grid / 7``.
        invariances: ``"flip"``, ``"transpose"`` (with flips: rot90) and/or ``"invert"`` of the query.

    Raises:
        ValueError: for a grid under 8 cells, an even or too large kernel, or unknown invariances.
    """

    _VERSION = 1

    def __init__(
        self,
        grid: int = 64,
        spatial_dims: int = 2,
        kernel: int | None = None,
        invariances: Sequence[str] = ("flip", "transpose", "invert"),
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if int(grid) < 8:
            raise ValueError(f"grid must be at least 8 cells per axis to hold a texture, got {grid}")
        kernel = int(kernel) if kernel is not None else max(3, int(round(grid / 7)) | 1)
        if kernel % 2 == 0 or not 3 <= kernel < int(grid):
            raise ValueError(f"kernel must be an odd number of cells in [3, grid), got {kernel} for grid {grid}")
        invariances = _checked_invariances(invariances)
        self.name = "texture"
        self.grid, self.spatial_dims, self.kernel = int(grid), int(spatial_dims), kernel
        self.invariances = invariances
        self._symmetries, self.signs = _query_symmetries(self.spatial_dims, self.invariances)

    @property
    def dim(self) -> int:
        """Length of the vectors of single-channel images."""
        return self.grid**self.spatial_dims

    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors."""
        cfg = {
            "space": "texture",
            "version": self._VERSION,
            "grid": self.grid,
            "spatial_dims": self.spatial_dims,
            "kernel": self.kernel,
            "invariances": list(self.invariances),
        }
        return _fingerprint(cfg)

    def _texture(self, images: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
        """``(B, C, *grid)``: the images on the grid minus their local mean."""
        x = F.interpolate(scaled_batch(images, self.spatial_dims), size=(self.grid,) * self.spatial_dims, mode="area")
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        local = pool(F.pad(x, (self.kernel // 2,) * (2 * self.spatial_dims), mode="replicate"), self.kernel, stride=1)
        return x - local

    def embed(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, C, *spatial)`` -> ``(B, C * grid**spatial_dims)`` unit vectors of the texture.

        Raises:
            NonFiniteImageError: for NaN/Inf images.
            DegenerateImageError: for images without texture (constant, or smooth to within the box filter).
        """
        t = self._texture(images)
        return _standardise(t.reshape(t.shape[0], -1)).numpy().astype(np.float32, copy=False)

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """Query side ``(B, V, d)``: the texture under every symmetry, then negated (variant 0 = :meth:`embed`)."""
        t = self._texture(images)
        n = t.shape[0]
        sym = torch.stack([_apply_symmetry(t, p, f, 2) for p, f in self._symmetries], dim=1)
        v = _standardise(sym.reshape(n * len(self._symmetries), -1)).reshape(n, len(self._symmetries), -1)
        if len(self.signs) == 2:
            v = torch.cat([v, -v], dim=1)
        return v.numpy().astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return (
            f"TextureSpace(grid={self.grid}, spatial_dims={self.spatial_dims}, kernel={self.kernel}, "
            f"invariances={self.invariances})"
        )
