"""A privacy space for rotated 3D copies: the ball inscribed in the volume, searched over rotations about each axis.

The 3D pixel space rotates the whole cubic query back. A copy rotated by 20 degrees about the axis the body spans has
lost the anatomy that the rotation moved out through the volume's faces (replaced by air), and no angle brings it
back: rotated back at the exact angle, such a CT phantom copy is still 0.008-0.027 (1 - Pearson r) from its source,
where the closest volume of another patient is 0.017-0.03 away.

:class:`BallSpace` (``"ball"``) compares only the ball inscribed in the volume (radius a fraction of the side), which
a rotation about the centre maps onto itself and a crop or zoom of up to ``1 / (2 * radius)`` keeps inside the field
of view. The query is rotated about each axis in fine steps (default every 5 degrees to +-30), resampled at twice the
grid and only then reduced to it, and at every angle moved by up to 1.5 cells in half-cell steps within the
rotation's plane (a copy rotated and moved; a half cell is one voxel of the fine grid, so the moves are slices, not
resamplings); the mirror flips and inversion are tried as well. Zooms of every angle are optional and off by
default: on MRI phantoms (zooms 0.9, 1.1, 1.2) they brought 4 of 18 unseen volumes below the smallest holdout
distance, while the rotated copies are caught without them. The index holds each training volume's ball once. Its own
calibrated threshold, so it never loosens the other spaces. The 3D counterpart of
:class:`~monai_synth.privacy.disc.DiscSpace`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_synth.privacy.inscribed import InscribedSpace
from monai_synth.privacy.spaces import (
    _apply_symmetry,
    _check_inscribed_settings,
    _checked_invariances,
    _fine_grid,
    _linear_variants,
    _plane_rotation,
    _query_symmetries,
    _shift_steps,
)

__all__ = ["BallSpace"]


class BallSpace(InscribedSpace):
    """Distance = 1 - Pearson correlation of the central balls of two volumes on a coarse grid, the query rotated
    about each axis in fine steps (3D).

    Args:
        grid: side of the grid the volume is reduced to (area interpolation of the whole field of view).
        radius: radius of the compared ball as a fraction of the side (at most 0.5: the inscribed ball). A copy
            zoomed in by ``z`` (cropped and resized) keeps the ball when ``radius <= 0.5 / z``.
        rotations: angles in degrees the query is rotated by about each of the three axes (0 is always included).
        zooms: magnifications of the query, each combined with every rotation (1.0 is always included; none other
            by default: zooming lets another patient's volume match too).
        max_shift: the query is also moved by every multiple of ``shift_step`` grid cells up to this along the two
            axes of each rotation's plane, under every angle about that axis (unzoomed): a copy rotated and moved
            within one plane. Moves along all three axes at once are not tried (7x the variants).
        shift_step: step of those moves in grid cells. Half a cell (the default) catches a CT copy rotated by 15
            degrees and moved by 1.5 cells (3 voxels at 32^3), which the unmoved rotations miss.
        invariances: ``"flip"`` (the mirror flips of the unrotated query) and/or ``"invert"``.
        wide_rotations: larger angles about each axis, unzoomed and unmoved (36 more variants): PET volumes rotated by
            45 degrees passed the whole default gate 2/2 with angles to +-30; these bring them within 0.0005 of their
            sources (the nearest other patient 0.024).

    Raises:
        ValueError: for a grid under 8 cells, a radius outside (0.2, 0.5], angles or zooms out of range, unknown
            invariances.
    """

    _VERSION = 2

    def __init__(
        self,
        grid: int = 16,
        spatial_dims: int = 3,
        radius: float = 0.4,
        rotations: Sequence[float] = tuple(range(-30, 31, 5)),
        zooms: Sequence[float] = (),
        max_shift: float = 1.5,
        shift_step: float = 0.5,
        invariances: Sequence[str] = ("flip", "invert"),
        wide_rotations: Sequence[float] = (-45.0, -40.0, -35.0, 35.0, 40.0, 45.0),
    ) -> None:
        if spatial_dims != 3:
            raise ValueError(
                f"the ball space compares volumes, got spatial_dims={spatial_dims}; 2D images are rotated by the disc "
                "space"
            )
        _check_inscribed_settings(grid, radius, (*rotations, *wide_rotations), zooms)
        if "transpose" in invariances:
            raise ValueError(
                "the ball space does not compare axis permutations (48 per volume); leave 'transpose' out (the 3D "
                "pixel space compares them)"
            )
        self.name = "ball"
        self.grid, self.spatial_dims, self.radius = int(grid), 3, float(radius)
        self.rotations = (0.0,) + tuple(sorted({round(float(r), 4) for r in rotations} - {0.0}))
        self.zooms = (1.0,) + tuple(sorted({round(float(z), 4) for z in zooms} - {1.0}))
        steps = _shift_steps(self.grid, self.radius, max_shift, shift_step)
        if abs(2 * float(shift_step) - round(2 * float(shift_step))) > 1e-6:
            raise ValueError(
                f"the ball moves its query by whole voxels of its fine grid (half cells): shift_step must be a "
                f"multiple of 0.5 grid cells, got {shift_step}"
            )
        self.max_shift, self.shift_step = float(max_shift), float(shift_step)
        self.invariances = _checked_invariances(invariances)
        symmetries, self.signs = _query_symmetries(3, self.invariances)
        self._flips = symmetries[1:]
        # (zoom, axis, angle, move in cells per axis) of every resampling: the identity first, then every zoom with no
        # rotation and with every angle about each axis. affine_grid orders its coordinates by the spatial axes
        # reversed.
        turns = [(None, 0.0)] + [(axis, r) for axis in range(3) for r in self.rotations[1:]]
        still = (0.0, 0.0, 0.0)
        self._maps = [(z, axis, r, still) for z in self.zooms for axis, r in turns]
        # then (unzoomed) every move within the plane of each axis's rotations, under every angle about that axis;
        # the unrotated moves once (the three planes share the moves along one axis)
        moved = {}
        for axis in range(3):
            for r in self.rotations:
                for a in steps:
                    for b in steps:
                        shift = [a, b]
                        shift.insert(axis, 0.0)
                        if shift != list(still):
                            key = (None if r == 0.0 else axis, r, tuple(shift))
                            moved[key] = (1.0, *key)
        self._maps += list(moved.values())
        # larger angles about each axis, unzoomed and unmoved: a PET volume rotated by 45 degrees passed the whole gate
        self.wide_rotations = tuple(sorted({round(float(r), 4) for r in wide_rotations} - set(self.rotations)))
        self._maps += [(1.0, axis, r, still) for axis in range(3) for r in self.wide_rotations]
        self._set_mask()
        # (sign, zoom, axis, angle, move, symmetry) of every variant; identity first: variant 0 is what `embed` returns
        ident = symmetries[0]
        self.variant_ops: list[tuple] = [(s, z, a, r, t, ident) for s in self.signs for z, a, r, t in self._maps]
        self.variant_ops += [(s, 1.0, None, 0.0, still, f) for s in self.signs for f in self._flips]
        self.variant_ops.sort(key=lambda op: op[0] < 0)  # as embed_variants returns them: all variants, then negated

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """Query side ``(B, V, d)`` in the order of :attr:`variant_ops` (variant 0 = :meth:`embed`)."""
        fine = _fine_grid(images, 3, self.grid)
        n, size, side = fine.shape[0], (self.grid,) * 3, (2 * self.grid,) * 3
        g0 = F.interpolate(fine, size=size, mode="area")
        grids: list[torch.Tensor | None] = [g0] + [None] * (len(self._maps) - 1)
        moves: dict[tuple, list[tuple[int, tuple]]] = {}  # (axis, angle) -> (position, move) of the moved maps
        for k, (_, axis, deg, shift) in enumerate(self._maps):
            if any(shift):
                moves.setdefault((axis, deg), []).append((k, shift))
        for k, (z, axis, deg, shift) in enumerate(self._maps):
            if any(shift) or (k > 0 and z == 1.0 and (axis, deg) in moves):
                continue  # resampled below, with the moves
            if k > 0:  # output point p samples the input at R p / z: content magnified by z
                rot = torch.eye(3) if axis is None else _plane_rotation(3, 2 - axis, deg)
                grids[k] = F.interpolate(_linear_variants(fine, [rot / z]), size=size, mode="area")
        pad = int(round(2 * self.max_shift))
        for (axis, deg), moved in moves.items():
            rot = torch.eye(3) if axis is None else _plane_rotation(3, 2 - axis, deg)
            turned = fine if axis is None else _linear_variants(fine, [rot])
            unmoved = self._maps.index((1.0, axis, deg, (0.0, 0.0, 0.0)))
            if unmoved > 0:
                grids[unmoved] = F.interpolate(turned, size=size, mode="area")
            # a move by half a cell is one voxel of the fine grid (twice the grid): moved by slicing, edges replicated
            if tuple(turned.shape[2:]) != side:
                turned = F.interpolate(turned, size=side, mode="trilinear", align_corners=False)
            padded = F.pad(turned, (pad,) * 6, mode="replicate")
            windows = []
            for _, shift in moved:
                o = [pad - int(round(2 * d)) for d in shift]
                windows.append(padded[:, :, o[0] : o[0] + side[0], o[1] : o[1] + side[1], o[2] : o[2] + side[2]])
            g = F.interpolate(torch.cat(windows), size=size, mode="area").reshape(len(moved), *g0.shape)
            for (k, _), gk in zip(moved, g):
                grids[k] = gk
        grids = [g[:, None] for g in grids] + [_apply_symmetry(g0, p, f, 2)[:, None] for p, f in self._flips]
        grids = torch.cat(grids, dim=1)  # (B, M + flips, C, *grid)
        v = self._vectors(grids.reshape(-1, *g0.shape[1:])).reshape(n, grids.shape[1], -1)
        # order of variant_ops: the maps then the flips, then all of them negated
        if len(self.signs) == 2:
            v = torch.cat([v, -v], dim=1)
        return v.numpy().astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return (
            f"BallSpace(grid={self.grid}, radius={self.radius}, rotations={self.rotations}, zooms={self.zooms}, "
            f"max_shift={self.max_shift}, shift_step={self.shift_step}, invariances={self.invariances})"
        )
