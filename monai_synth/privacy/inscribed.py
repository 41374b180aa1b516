"""What the disc (2D) and ball (3D) privacy spaces share: the inscribed region's vectors, size and fingerprint.

Both compare only the cells of a coarse grid that lie inside the disc or ball inscribed in the image, which a rotation
about the centre maps onto itself; they differ in how they turn and move the query (their own ``embed_variants``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_synth.privacy.spaces import _fine_grid, _fingerprint, _masked_vectors

__all__ = ["InscribedSpace"]


class InscribedSpace:
    """Base of :class:`~monai_synth.privacy.disc.DiscSpace` and :class:`~monai_synth.privacy.ball.BallSpace`.

    A subclass sets ``name``, ``grid``, ``spatial_dims``, ``radius``, ``rotations``, ``zooms``, ``max_shift``,
    ``shift_step``, ``invariances`` and ``_VERSION`` (everything that changes its vectors), and calls
    :meth:`_set_mask`.
    """

    name: str
    grid: int
    spatial_dims: int
    radius: float
    _VERSION: int

    def _set_mask(self) -> None:
        """The grid cells inside the inscribed disc / ball (radius a fraction of the side)."""
        centre = (torch.arange(self.grid, dtype=torch.float32) + 0.5 - self.grid / 2) / self.grid
        axes = torch.meshgrid(*[centre] * self.spatial_dims, indexing="ij")
        self._mask = (sum(a**2 for a in axes) <= self.radius**2).flatten()

    @property
    def dim(self) -> int:
        """Length of the vectors of single-channel images: the grid cells inside the inscribed region."""
        return int(self._mask.sum())

    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors."""
        cfg = {
            "space": self.name,
            "version": self._VERSION,
            "grid": self.grid,
            "radius": self.radius,
            "rotations": list(self.rotations),
            "zooms": list(self.zooms),
            "max_shift": self.max_shift,
            "shift_step": self.shift_step,
            "invariances": list(self.invariances),
        }
        if getattr(self, "wide_rotations", ()):  # spaces without them keep their fingerprints
            cfg["wide_rotations"] = list(self.wide_rotations)
        return _fingerprint(cfg)

    def _vectors(self, g: torch.Tensor) -> torch.Tensor:
        """``(M, C, *grid)`` -> ``(M, C * cells in the region)``, standardised."""
        return _masked_vectors(g, self._mask)

    def embed(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, C, *spatial)`` -> ``(B, d)`` unit vectors of the inscribed region.

        Raises:
            NonFiniteImageError: for NaN/Inf images.
            DegenerateImageError: for images constant within the region.
        """
        fine = _fine_grid(images, self.spatial_dims, self.grid)
        g = F.interpolate(fine, size=(self.grid,) * self.spatial_dims, mode="area")
        return self._vectors(g).numpy().astype(np.float32, copy=False)
