"""A privacy space for rotated and rescaled 2D copies: the central disc of the image, low-passed, searched over angles.

The pixel space rotates the whole square query back. A copy rotated by 25 degrees has lost the training image's
corners (filled with background), and no angle brings them back: rotated back at the exact angle, such a copy is
still 0.02-0.16 (1 - Pearson r) from its source on the pixel space's grid, where the closest image of another patient
is about 0.12 away. Speckle adds to that: a copy rotated, cropped and re-noised is farther still.

:class:`DiscSpace` (``"disc"``) compares only the disc inscribed in the image (radius a fraction of the side), which a
rotation about the centre keeps whole and a crop or zoom of up to ``1 - 2 * radius`` keeps inside the field of view,
on a coarse grid where each cell averages many pixels, so multiplicative speckle is averaged out. The query is rotated
in fine steps (default every 5 degrees to +-30), zoomed in fine steps (0.8-1.25) and moved by up to 1.5 cells in
half-cell steps at every angle, rotated by 35-45 degrees either way and moved by whole cells, resampled at twice the
grid and only then reduced to it, mirrored / transposed and inverted; the index holds each training image's disc once.
Its own calibrated threshold, so it never loosens the other spaces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_synth.privacy.inscribed import InscribedSpace
from monai_synth.privacy.orbits import grid_flips, layout
from monai_synth.privacy.spaces import (
    _apply_symmetry,
    _check_inscribed_settings,
    _checked_invariances,
    _fine_grid,
    _query_symmetries,
    _shift_steps,
)

__all__ = ["DiscSpace"]


class DiscSpace(InscribedSpace):
    """Distance = 1 - Pearson correlation of the central discs of two images on a coarse grid, the query rotated and
    zoomed in fine steps (2D).

    Args:
        grid: side of the grid the image is reduced to (area interpolation of the whole field of view).
        radius: radius of the compared disc as a fraction of the side (at most 0.5: the inscribed disc). A copy
            zoomed in by ``z`` (cropped and resized) keeps the disc when ``radius <= 0.5 / z``.
        rotations: angles in degrees the query is rotated by (0 is always included).
        zooms: magnifications of the query (1.0 is always included); a copy cropped to a fraction ``f`` of each
            side and resized back is undone by zoom ``f``.
        max_shift: the query is also moved by every multiple of ``shift_step`` grid cells up to this, per axis,
            under every angle (unzoomed): a copy rotated and moved.
        shift_step: step of those moves in grid cells. Half a cell (the default) catches a copy rotated by 15 degrees
            and moved by 1.5 cells (6 px at 64 px), which whole cells miss, at three times the variants (12,064
            instead of 3,744 with ``max_shift=1, shift_step=1``); the 2D pixel space's rotations, which it replaces,
            cost more.
        wide_rotations: larger angles, each unzoomed and moved by whole cells only (up to 1 per axis): with the
            flips and transposes (rot90) they close the gap between ``rotations`` and the next right angle. A copy
            rotated by 45 degrees sat 0.08-0.13 from its source with angles to +-30 (PET threshold 0.012) and passed
            the six pixel-based spaces 5/5; whole-cell moves keep them to 864 more variants (7%).
        invariances: ``"flip"``, ``"transpose"`` (with flips: rot90) and/or ``"invert"`` of the query.

    Raises:
        ValueError: for a grid under 8 cells, a radius outside (0.2, 0.5], angles or zooms out of range, unknown
            invariances.
    """

    _VERSION = 1

    def __init__(
        self,
        grid: int = 16,
        spatial_dims: int = 2,
        radius: float = 0.4,
        rotations: Sequence[float] = tuple(range(-30, 31, 5)),
        zooms: Sequence[float] = (0.8, 0.85, 0.9, 0.95, 1.05, 1.1, 1.15, 1.2, 1.25),
        max_shift: float = 1.5,
        shift_step: float = 0.5,
        invariances: Sequence[str] = ("flip", "transpose", "invert"),
        wide_rotations: Sequence[float] = (-45.0, -40.0, -35.0, 35.0, 40.0, 45.0),
    ) -> None:
        if spatial_dims != 2:
            raise ValueError(
                f"the disc space compares 2D images, got spatial_dims={spatial_dims}; volumes are rotated about each "
                "axis by the ball space"
            )
        _check_inscribed_settings(grid, radius, (*rotations, *wide_rotations), zooms)
        self.name = "disc"
        self.grid, self.spatial_dims, self.radius = int(grid), 2, float(radius)
        self.rotations = (0.0,) + tuple(sorted({round(float(r), 4) for r in rotations} - {0.0}))
        self.zooms = (1.0,) + tuple(sorted({round(float(z), 4) for z in zooms} - {1.0}))
        steps = _shift_steps(self.grid, self.radius, max_shift, shift_step)
        self.max_shift, self.shift_step = float(max_shift), float(shift_step)
        shifts = sorted(((dy, dx) for dy in steps for dx in steps), key=lambda s: (abs(s[0]) + abs(s[1]), s))
        # (zoom, angle, shift in grid cells): every zoom with every angle unshifted, and every angle with every shift
        # unzoomed (a copy rotated and moved); the identity first
        self._maps = [(z, r, (0.0, 0.0)) for z in self.zooms for r in self.rotations]
        self._maps += [(1.0, r, s) for s in shifts[1:] for r in self.rotations]
        self.wide_rotations = tuple(sorted({round(float(r), 4) for r in wide_rotations} - set(self.rotations)))
        whole = sorted(
            ((dy, dx) for dy in (-1.0, 0.0, 1.0) for dx in (-1.0, 0.0, 1.0)), key=lambda s: (abs(s[0]) + abs(s[1]), s)
        )
        self._maps += [(1.0, r, s) for s in whole for r in self.wide_rotations]
        self.invariances = _checked_invariances(invariances)
        self._symmetries, self.signs = _query_symmetries(2, self.invariances)
        self._set_mask()
        self._coords_cache: dict[tuple[int, ...], torch.Tensor] = {}  # image size -> sampling grids, see _coords
        # (sign, zoom, angle, symmetry) of every variant; identity first: variant 0 is what `embed` returns
        self.variant_ops: list[tuple] = [
            (sign, z, r, t, sym) for sign in self.signs for z, r, t in self._maps for sym in self._symmetries
        ]

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """Query side ``(B, V, d)`` in the order of :attr:`variant_ops` (variant 0 = :meth:`embed`)."""
        fine = _fine_grid(images, 2, self.grid)
        n, affine = fine.shape[0], len(self._maps)
        g0 = F.interpolate(fine, size=(self.grid, self.grid), mode="area")
        g = F.interpolate(self._resampled(fine), size=g0.shape[2:], mode="area")
        g[::affine] = g0  # the identity stays bit-exact
        sym = torch.stack([_apply_symmetry(g, p, f, 2) for p, f in self._symmetries], dim=1)  # (n * A, S, C, H, W)
        v = self._vectors(sym.reshape(-1, *g.shape[1:])).reshape(n, affine * len(self._symmetries), -1)
        if len(self.signs) == 2:
            v = torch.cat([v, -v], dim=1)
        return v.numpy().astype(np.float32, copy=False)

    def orbit_layout(self, nv: int, d: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The variants of :meth:`embed_variants` (``nv`` per image, ``d`` values each) that are one map under the
        flips (:mod:`monai_synth.privacy.orbits`): the search screens each such orbit once."""
        cells, per = int(self._mask.sum()), len(self._symmetries)
        if d % cells or nv != len(self.variant_ops):
            return None
        maps = np.arange(len(self._maps)) * per
        return grid_flips((self.grid,) * 2, d // cells, self._mask.numpy()), layout(
            self._symmetries, lambda s: maps + s
        )

    def _resampled(self, fine: torch.Tensor) -> torch.Tensor:
        """``(B * M, C, *fine)``: every image through every (zoom, angle, shift) map, edges replicated.

        The images ride along as channels of one sample per map, so the sampling grid of every map is made once per
        image size (and kept): building it per image, with each image copied per map, took a third of the variants'
        time."""
        n, c, m = fine.shape[0], fine.shape[1], len(self._maps)
        coords = self._coords(tuple(fine.shape[2:]))
        src = fine.reshape(1, n * c, *fine.shape[2:]).expand(m, -1, -1, -1)
        out = F.grid_sample(src, coords, mode="bilinear", padding_mode="border", align_corners=False)
        return out.reshape(m, n, c, *out.shape[2:]).transpose(0, 1).reshape(n * m, c, *out.shape[2:])

    def _coords(self, size: tuple[int, ...]) -> torch.Tensor:
        """``(M, *size, 2)`` sampling grid of every map at this image size."""
        if size not in self._coords_cache:
            theta = torch.zeros(len(self._maps), 2, 3)
            for k, (z, deg, (dy, dx)) in enumerate(self._maps):
                c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
                theta[k, :, :2] = torch.tensor([[c, -s], [s, c]]) / z  # content magnified by z
                move = [-2.0 * dx / self.grid, -2.0 * dy / self.grid]  # content moved by (dy, dx)
                theta[k, :, 2] = torch.tensor(move)
            self._coords_cache[size] = F.affine_grid(theta, [len(self._maps), 1, *size], align_corners=False)
        return self._coords_cache[size]

    def __repr__(self) -> str:
        return (
            f"DiscSpace(grid={self.grid}, radius={self.radius}, rotations={self.rotations}, zooms={self.zooms}, "
            f"max_shift={self.max_shift}, shift_step={self.shift_step}, invariances={self.invariances})"
        )
