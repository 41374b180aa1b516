"""A privacy space for rotated 3D copies: the ball inscribed in the volume, searched over rotations about each axis.

The 3D pixel space rotates the whole cubic query back. A copy rotated by 20 degrees about the axis the body spans has
lost the anatomy that the rotation moved out through the volume's faces (replaced by air), and no angle brings it
back: rotated back at the exact angle, such a CT phantom copy is still 0.008-0.027 (1 - Pearson r) from its source,
where the closest volume of another patient is 0.017-0.03 away.

:class:`BallSpace` (``"ball"``) compares only the ball inscribed in the volume (radius a fraction of the side), which
a rotation about the centre maps onto itself and a crop or zoom of up to ``1 / (2 * radius)`` keeps inside the field
of view. The query is rotated about each axis in fine steps (default every 5 degrees to +-30), resampled at twice the
grid and only then reduced to it; the mirror flips and inversion are tried as well. Zooms of every angle are
optional and off by default: on MRI phantoms (zooms 0.9, 1.1, 1.2) they brought 4 of 18 unseen volumes below the
smallest holdout distance, while the rotated copies are caught without them. The index holds each training volume's ball once. Its own calibrated
threshold, so it never loosens the other spaces. The 3D counterpart of :class:`~monai_synth.privacy.disc.DiscSpace`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_synth.privacy.spaces import (
    _apply_symmetry,
    _check_inscribed_settings,
    _checked_invariances,
    _fine_grid,
    _fingerprint,
    _linear_variants,
    _masked_vectors,
    _plane_rotation,
    _query_symmetries,
)

__all__ = ["BallSpace"]


class BallSpace:
    """Distance = 1 - Pearson correlation of the central balls of two volumes on a coarse grid, the query rotated
    about each axis in fine steps (3D).

    Args:
        grid: side of the grid the volume is reduced to (area interpolation of the whole field of view).
        radius: radius of the compared ball as a fraction of the side (at most 0.5: the inscribed ball). A copy
            zoomed in by ``z`` (cropped and resized) keeps the ball when ``radius <= 0.5 / z``.
        rotations: angles in degrees the query is rotated by about each of the three axes (0 is always included).
        zooms: magnifications of the query, each combined with every rotation (1.0 is always included; none other
            by default: zooming lets another patient's volume match too).
        invariances: ``"flip"`` (the mirror flips of the unrotated query) and/or ``"invert"``.

    Raises:
        ValueError: for a grid under 8 cells, a radius outside (0.2, 0.5], angles or zooms out of range, unknown
            invariances.
    """

    _VERSION = 1

    def __init__(
        self,
        grid: int = 16,
        spatial_dims: int = 3,
        radius: float = 0.4,
        rotations: Sequence[float] = tuple(range(-30, 31, 5)),
        zooms: Sequence[float] = (),
        invariances: Sequence[str] = ("flip", "invert"),
    ) -> None:
        if spatial_dims != 3:
            raise ValueError(
                f"the ball space compares volumes, got spatial_dims={spatial_dims}; 2D images are rotated by the disc "
                "space"
            )
        _check_inscribed_settings(grid, radius, rotations, zooms)
        if "transpose" in invariances:
            raise ValueError(
                "the ball space does not compare axis permutations (48 per volume); leave 'transpose' out (the 3D "
                "pixel space compares them)"
            )
        self.name = "ball"
        self.grid, self.spatial_dims, self.radius = int(grid), 3, float(radius)
        self.rotations = (0.0,) + tuple(sorted({round(float(r), 4) for r in rotations} - {0.0}))
        self.zooms = (1.0,) + tuple(sorted({round(float(z), 4) for z in zooms} - {1.0}))
        self.invariances = _checked_invariances(invariances)
        symmetries, self.signs = _query_symmetries(3, self.invariances)
        self._flips = symmetries[1:]
        # (zoom, axis, angle) of every resampling: the identity first, then every zoom with no rotation and with
        # every angle about each axis. affine_grid orders its coordinates by the spatial axes reversed.
        turns = [(None, 0.0)] + [(axis, r) for axis in range(3) for r in self.rotations[1:]]
        self._maps = [(z, axis, r) for z in self.zooms for axis, r in turns]
        centre = (torch.arange(self.grid, dtype=torch.float32) + 0.5 - self.grid / 2) / self.grid
        zz, yy, xx = torch.meshgrid(centre, centre, centre, indexing="ij")
        self._mask = (zz**2 + yy**2 + xx**2 <= self.radius**2).flatten()
        # (sign, zoom, axis, angle, symmetry) of every variant; identity first: variant 0 is what `embed` returns
        ident = symmetries[0]
        self.variant_ops: list[tuple] = [(s, z, a, r, ident) for s in self.signs for z, a, r in self._maps]
        self.variant_ops += [(s, 1.0, None, 0.0, f) for s in self.signs for f in self._flips]

    @property
    def dim(self) -> int:
        """Length of the vectors of single-channel volumes: the grid cells inside the ball."""
        return int(self._mask.sum())

    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors."""
        cfg = {
            "space": "ball",
            "version": self._VERSION,
            "grid": self.grid,
            "radius": self.radius,
            "rotations": list(self.rotations),
            "zooms": list(self.zooms),
            "invariances": list(self.invariances),
        }
        return _fingerprint(cfg)

    def _ball(self, g: torch.Tensor) -> torch.Tensor:
        """``(M, C, grid, grid, grid)`` -> ``(M, C * cells in the ball)``, standardised."""
        return _masked_vectors(g, self._mask)

    def embed(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, C, D, H, W)`` -> ``(B, d)`` unit vectors of the central ball.

        Raises:
            NonFiniteImageError: for NaN/Inf volumes.
            DegenerateImageError: for volumes constant within the ball.
        """
        g = F.interpolate(_fine_grid(images, 3, self.grid), size=(self.grid,) * 3, mode="area")
        return self._ball(g).numpy().astype(np.float32, copy=False)

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """Query side ``(B, V, d)`` in the order of :attr:`variant_ops` (variant 0 = :meth:`embed`)."""
        fine = _fine_grid(images, 3, self.grid)
        n, size = fine.shape[0], (self.grid,) * 3
        g0 = F.interpolate(fine, size=size, mode="area")
        maps = []
        for z, axis, deg in self._maps:
            rot = torch.eye(3) if axis is None else _plane_rotation(3, 2 - axis, deg)
            maps.append(rot / z)  # output point p samples the input at R p / z: content magnified by z
        # one map at a time: memory of one fine copy per volume; the identity stays bit-exact
        grids = [g0] + [F.interpolate(_linear_variants(fine, [m]), size=size, mode="area") for m in maps[1:]]
        grids += [_apply_symmetry(g0, p, f, 2) for p, f in self._flips]
        grids = torch.stack(grids, dim=1)  # (B, M + flips, C, *grid)
        v = self._ball(grids.reshape(-1, *g0.shape[1:])).reshape(n, grids.shape[1], -1)
        # order of variant_ops: per sign, the maps then the flips
        if len(self.signs) == 2:
            v = torch.cat([v, -v], dim=1)
        return v.numpy().astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return (
            f"BallSpace(grid={self.grid}, radius={self.radius}, rotations={self.rotations}, zooms={self.zooms}, "
            f"invariances={self.invariances})"
        )
