"""Privacy spaces for partial copies: a part of a training image inside a candidate.

A whole-image correlation does not see a copy that fills only part of the candidate: half of a training image
joined to another image, a training image behind a masking border, a training image shrunk into one tile of a mosaic
or pasted onto a larger canvas. Two spaces catch those, each with its own index and calibrated threshold (so they
never loosen the whole-image ``pixel`` space):

* :class:`PartSpace` (``"parts"``) compares *aligned regions*: each quadrant (each octant in 3D) and the central
  region of the candidate with the same region of every training image, and the whole candidate with crops of every
  training image (centre and, in 2D, corners) resized to a common grid (a crop of a training image, kept at its size
  or blown up); as ``"halves"``, the whole candidate with the half of every training image at either end of one
  axis, two or all three (a half, a quadrant or an octant of a training volume blown up).
* :class:`TileSpace` (``"tiles"``) compares *windows* of the candidate, at several scales and positions over its
  whole field of view, with every whole training image.

Both keep the index one row per training image (what lets the index scale, see :mod:`monai_synth.privacy.index`):

* ``parts`` stores the R standardised regions of a training image side by side, scaled by ``1 / sqrt(R)``, and a
  query variant holds one standardised candidate region in its slot and zeros elsewhere, so the inner product is
  that region's Pearson correlation ``r`` divided by ``sqrt(R)`` and the distance is ``1 - r / sqrt(R)``: an exact
  half copy scores ``1 - 1 / sqrt(R)`` (0.553 in 2D), unrelated regions about 1.
* ``tiles`` stores the training image like :class:`~monai_synth.privacy.spaces.PixelSpace`; every window of the
  candidate, resampled to the grid, is a query variant: distance ``1 - r`` of the best window.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_synth.privacy.orbits import grid_flips, layout
from monai_synth.privacy.seams import seam_windows
from monai_synth.privacy.spaces import (
    DegenerateImageError,
    _affine_variants,
    _apply_symmetry,
    _checked_invariances,
    _fingerprint,
    _linear_variants,
    _plane_rotation,
    _query_symmetries,
    _scaled,
    _standardise,
    scaled_batch,
)

__all__ = ["PartSpace", "TileSpace"]


class PartSpace:
    """Aligned regions of the image, each compared with the same region of every training image (``"parts"``), or
    crops of every training image compared with the whole candidate (``"crops"``).

    ``kind="regions"`` (name ``parts``) catches a candidate that keeps one region of a training image and replaces
    the rest: half of a training image joined to another image (two quadrants match), a copy behind a masking border
    (the centre matches). ``kind="crops"`` (name ``crops``) catches a crop of a training image, kept at its own size
    or resized (the whole candidate matches the crop). ``kind="halves"`` (name ``halves``) compares the whole
    candidate with the half of every training image at either end of one axis, two or all three (3D: 26 slots), under
    the symmetries, unrotated: a corner quadrant of a volume blown up to the whole, which the centred 3D crops miss;
    with ``slabs``, also with slabs of one axis (a copy cut along one axis and stretched back).
    Each is a separate space with its own threshold: more slots give an unrelated image more chances to correlate
    somewhere, which would loosen the others' thresholds (and every query variant fills the whole row, so the 26
    halves in the crops space cost it 4.8x its query floats).

    Args:
        kind: ``"regions"``, ``"crops"`` or ``"halves"``.
        grid: side of the grid the whole image is resampled to before it is cut into regions (even, >= 8).
        spatial_dims: 2 or 3.
        centre: fraction of each side the central region spans.
        crops: fractions of each side of the crops of training images compared with the whole candidate (the centre
            crop and, in 2D, the four corner crops of each size), for ``kind="crops"``.
        invariances: ``"flip"``, ``"transpose"`` (with flips: rot90) and/or ``"invert"``, applied to the whole
            candidate before it is cut, so a mirrored half is caught as well.
        rotations: angles (degrees; 2D in the image plane, 3D about each of the three axes) the candidate is also
            rotated back by before it is cut: a
            rotated copy has background corners, which the aligned centre region mostly leaves out. Ignored for
            ``kind="halves"``.
        slabs: ``kind="halves"``: fractions of one axis; each training image also has a slot for the slab spanning
            that fraction of one axis (at its centre and at either end) and the whole of the others, compared with the
            whole candidate under the symmetries: a copy cut along one axis and stretched back to the model size (a
            half is the slab of 0.5 at an end). The pixel space's stretches miss such a copy where the axis's ends
            hold what dominates the correlation (a PET slice's brain and bladder): they cannot bring the cut part back.
        slab_stretches: magnifications of the unturned candidate along a slab's axis about its anchor, also tried in
            the slab's slot (those that hold the whole candidate): a copy cut to a fraction between the slabs' (each
            slab alone holds about +-0.01 of its fraction on PET slices).
        slab_anchors: where along its axis a slab lies: any of ``"low"``, ``"centre"``, ``"high"``.
        corners: ``kind="halves"``: fractions of every axis; each training image also has a slot for its corner window
            of that fraction at each of the ``2 ** spatial_dims`` corners, compared with the whole candidate under the
            symmetries: a copy cropped at a corner and resized back (the 3D crops are centred only, and a slab or half
            holds one or two axes of such a copy, not all three).
        corner_stretches: magnifications of the unturned candidate about each corner, also tried in that corner's
            slots: a copy cropped to a fraction between the corners' (each corner slot alone holds about +-0.015 of
            its fraction on CT volumes).
        moved_slabs: instead of the whole candidate, each slab slot at an end of its axis holds the candidate's slab
            of the same fraction at the other end (unturned): a copy moved by ``1 - fraction`` of the side along that
            axis, the vacated part filled (the 2D crops do this with their corner windows; the 3D corner windows hold
            the whole candidate only). Centred slabs still hold the whole candidate.
        moved: ``kind="crops"`` (2D only): each corner crop's slot also holds the candidate's window of the same size
            at the three other corners (unrotated, no symmetry): a training image moved by ``1 - crop`` of the side
            along one axis or both, the rest filled. Wrapped shifts of the whole image restore a copy moved on a
            background, not one moved on a canvas where the source had anatomy (ultrasound): such copies, moved by a
            quarter of the side, sat 0.18-0.26 from their sources in the pixel space (threshold 0.093) and 2 of 3
            passed the whole default gate. ``kind="regions"``: each quadrant's (octant's) slot also holds each of the
            candidate's other quadrants (octants), unrotated, no symmetry: a quarter of a training image pasted into
            another corner, or a copy cut into quadrants and rearranged, matches one slot exactly where the aligned
            quadrants match none (ultrasound and CT phantoms: 3 of 3 of each released by the whole gate without them,
            CT volumes 2 of 2).
    """

    _VERSION = 1

    def __init__(
        self,
        grid: int = 16,
        spatial_dims: int = 2,
        kind: str = "regions",
        centre: float = 0.75,
        crops: Sequence[float] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9),
        invariances: Sequence[str] = ("flip", "transpose", "invert"),
        rotations: Sequence[float] = (),
        moved: bool = False,
        slabs: Sequence[float] = (),
        slab_stretches: Sequence[float] = (),
        slab_anchors: Sequence[str] = ("low", "centre", "high"),
        moved_slabs: bool = False,
        corners: Sequence[float] = (),
        corner_stretches: Sequence[float] = (),
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if int(grid) < 8 or int(grid) % 2:
            raise ValueError(f"grid must be an even number >= 8, got {grid}")
        if not 0.25 <= float(centre) < 1.0:
            raise ValueError(f"centre must be a fraction of the side in [0.25, 1), got {centre}")
        if not all(0.25 <= float(c) < 1.0 for c in crops):
            raise ValueError(f"crops must be fractions of the side in [0.25, 1), got {list(crops)}")
        if not all(0.25 <= float(f) < 1.0 for f in slabs):
            raise ValueError(f"slabs must be fractions of one axis in [0.25, 1), got {list(slabs)}")
        if not all(0.25 <= float(f) < 1.0 for f in corners):
            raise ValueError(f"corners must be fractions of every axis in [0.25, 1), got {list(corners)}")
        if not slab_anchors or not set(slab_anchors) <= {"low", "centre", "high"}:
            raise ValueError(f"slab_anchors must be some of 'low', 'centre', 'high', got {list(slab_anchors)}")
        invariances = _checked_invariances(invariances)
        if kind not in ("regions", "crops", "halves"):
            raise ValueError(f"kind must be 'regions', 'crops' or 'halves', got {kind!r}")
        self.kind = kind
        self.name = {"regions": "parts", "crops": "crops", "halves": "halves"}[kind]
        self.crops = tuple(sorted({round(float(c), 4) for c in crops})) if kind == "crops" else ()
        self.grid, self.spatial_dims, self.centre = int(grid), int(spatial_dims), float(centre)
        self.invariances = invariances
        self.rotations = (0.0,) + tuple(sorted({round(float(r), 4) for r in rotations} - {0.0}))
        if kind == "halves":
            self.rotations = (0.0,)
        half = self.grid // 2
        margin = int(round(self.grid * (1.0 - self.centre) / 2))
        self.regions: list[tuple[slice, ...]] = [
            tuple(slice(o, o + half) for o in corner) for corner in itertools.product((0, half), repeat=spatial_dims)
        ]
        self.regions.append(tuple(slice(margin, self.grid - margin) for _ in range(spatial_dims)))
        if kind != "regions":
            self.regions = []
        self._sizes = [math.prod(s.stop - s.start for s in r) for r in self.regions]
        self.crop_grid = self.grid // 2  # coarse: a crop of an unknown fraction is registered only roughly
        self._anchors = ("centre", "low-low", "low-high", "high-low", "high-high") if spatial_dims == 2 else ("centre",)
        self._sizes += [self.crop_grid**spatial_dims] * (len(self.crops) * len(self._anchors))
        # the half of a training image at either end of one axis, two or (3D) all three: a half, a quadrant, an
        # octant; each slot holds the whole candidate under each symmetry, unrotated
        # per axis: None (the whole axis) or (fraction, "low" | "centre" | "high")
        self._halves: list[tuple[tuple[float, str] | None, ...]] = []
        self.slabs = tuple(sorted({round(float(f), 4) for f in slabs})) if kind == "halves" else ()
        if kind == "halves":
            ends = itertools.product((None, (0.5, "low"), (0.5, "high")), repeat=spatial_dims)
            self._halves = [h for h in ends if any(h)]
        # the corner window of a fraction of every axis, at each corner: a copy cropped at a corner and resized back
        self.corners = tuple(sorted({round(float(f), 4) for f in corners})) if kind == "halves" else ()
        self._first_corner = len(self._halves)
        self._corner_cuts = [
            tuple((f, end) for end in ends)
            for f in self.corners
            for ends in itertools.product(("low", "high"), repeat=spatial_dims)
        ]
        self._halves += self._corner_cuts
        self.corner_stretches = (
            tuple(sorted({round(float(z), 4) for z in corner_stretches} - {1.0})) if self.corners else ()
        )
        # a slab of one axis: that axis cut to the fraction (at an anchor), the others whole; after the halves
        self.slab_anchors = tuple(a for a in ("low", "centre", "high") if a in slab_anchors) if self.slabs else ()
        self._slab_cuts = [
            tuple((f, anchor) if a == axis else None for a in range(spatial_dims))
            for axis in range(spatial_dims)
            for f in self.slabs
            for anchor in self.slab_anchors
        ]
        self._halves += self._slab_cuts
        self._sizes += [self.crop_grid**spatial_dims] * len(self._halves)
        self.slab_stretches = tuple(sorted({round(float(z), 4) for z in slab_stretches} - {1.0})) if self.slabs else ()
        # (slab slot, the cut of the candidate it holds instead of the whole): the same fraction at the other end
        other_end = {"low": "high", "high": "low"}
        self._moved_slabs = [
            (i, tuple(None if c is None else (c[0], other_end[c[1]]) for c in cuts))
            for i, cuts in enumerate(self._slab_cuts)
            if moved_slabs and any(c is not None and c[1] in other_end for c in cuts)
        ]
        # the slabs that hold the whole candidate (and its stretches), and the halves' slots that do (under the
        # symmetries): all but the moved slabs'
        moved_cuts = {i for i, _ in self._moved_slabs}
        self._whole_slabs = [i for i in range(len(self._slab_cuts)) if i not in moved_cuts]
        first_slab = len(self._halves) - len(self._slab_cuts)
        self._whole_halves = [h for h in range(len(self._halves)) if h - first_slab not in moved_cuts]
        self._offsets = np.cumsum([0, *self._sizes])
        self._symmetries, self.signs = _query_symmetries(self.spatial_dims, self.invariances)
        # (slot, crop fraction, window anchor) of the moved windows: each corner crop's slot holds the candidate's
        # window of that size at every other corner
        self.moved = bool(moved) and (spatial_dims == 2 or kind == "regions")
        corners = [a for a in self._anchors if a != "centre"]
        self._moved = (
            [
                (len(self.regions) + i * len(self._anchors) + self._anchors.index(a), c, b)
                for i, c in enumerate(self.crops)
                for a in corners
                for b in corners
                if a != b
            ]
            if self.moved and kind == "crops"
            else []
        )
        # (candidate's quadrant, slot it is compared in) of the moved quadrants
        quadrants = range(2**spatial_dims) if kind == "regions" else range(0)
        self._moved_quadrants = [(i, j) for i in quadrants for j in quadrants if i != j] if self.moved else []

    @property
    def dim(self) -> int:
        """Length of the vectors of single-channel images."""
        return int(self._offsets[-1])

    @property
    def distance_floor(self) -> float:
        """The distance of an exact match, ``1 - 1 / sqrt(R)``: a query fills one slot of the R a training row holds."""
        return 1.0 - 1.0 / math.sqrt(len(self._offsets) - 1)

    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors."""
        return _fingerprint(
            {
                "space": self.name,
                "version": self._VERSION,
                "grid": self.grid,
                "spatial_dims": self.spatial_dims,
                "centre": self.centre,
                "crops": list(self.crops),
                "rotations": list(self.rotations),
                "anchors": list(self._anchors),
                **({"rotation_axes": 3} if self.spatial_dims == 3 and len(self.rotations) > 1 else {}),
                **({"moved": "every corner"} if self.moved else {}),
                **({"halves": "each end of every set of axes"} if self._halves else {}),
                **({"slabs": list(self.slabs)} if self.slabs else {}),
                **({"corners": list(self.corners)} if self.corners else {}),
                **({"corner_stretches": list(self.corner_stretches)} if self.corner_stretches else {}),
                **({"slab_stretches": list(self.slab_stretches)} if self.slab_stretches else {}),
                **({"slab_anchors": list(self.slab_anchors)} if self.slabs and len(self.slab_anchors) < 3 else {}),
                **({"moved_slabs": True} if self._moved_slabs else {}),
                "invariances": list(self.invariances),
            }
        )

    def _rotation_maps(self) -> list[torch.Tensor]:
        """3D: the identity, then every angle about each axis (``affine_grid`` orders coordinates by reversed axes)."""
        maps = [torch.eye(3)]
        return maps + [_plane_rotation(3, 2 - axis, r) for axis in range(3) for r in self.rotations[1:]]

    def _regions(self, g: torch.Tensor, full: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per slot: ``(B, size)`` standardised vectors (zero rows where constant) and the ``(B,)`` valid mask.

        ``full`` (training side) is the image at full resolution, cut into the crops; without it (query side) the
        crop slots hold the whole candidate.
        """
        pieces = [g[(slice(None), slice(None), *region)] for region in self.regions]
        whole = self._reduced(g)
        for c in self.crops:
            for anchor in self._anchors:
                if full is None:
                    pieces.append(whole)
                    continue
                pieces.append(self._crop(full, c, anchor))
        if full is not None:  # the query's halves slots are filled in embed_variants
            pieces += [self._half(full, ends) for ends in self._halves]
        return [_standardised_piece(piece) for piece in pieces]

    def _reduced(self, x: torch.Tensor, cut: Sequence[slice] = ()) -> torch.Tensor:
        """``(B, C, *crop_grid)``: the window ``cut`` of ``x`` (one slice per spatial axis; all of it by default),
        reduced to the crop grid (area)."""
        return F.interpolate(
            x[(slice(None), slice(None), *cut)], size=(self.crop_grid,) * self.spatial_dims, mode="area"
        )

    def _half(self, full: torch.Tensor, cuts: Sequence[tuple[float, str] | None]) -> torch.Tensor:
        """``(B, C, *crop_grid)``: each axis cut to ``(fraction, anchor)`` at its ``"low"`` end, ``"centre"`` or
        ``"high"`` end (``None``: the whole axis), reduced to the crop grid."""
        cut = []
        for spec, n in zip(cuts, full.shape[2:]):
            if spec is None:
                cut.append(slice(None))
                continue
            fraction, anchor = spec
            side = max(1, int(round(n * fraction)) if fraction != 0.5 else n // 2)
            start = 0 if anchor == "low" else n - side if anchor == "high" else (n - side) // 2
            cut.append(slice(start, start + side))
        return self._reduced(full, cut)

    def _crop(self, full: torch.Tensor, fraction: float, anchor: str) -> torch.Tensor:
        """``(B, C, *crop_grid)``: the crop of ``fraction`` of each side at ``anchor``, reduced to the crop grid."""
        crop = []
        for axis, n in enumerate(full.shape[2:]):
            side = max(1, int(round(n * fraction)))
            ends = anchor.split("-") if anchor != "centre" else None
            start = (n - side) // 2 if ends is None else (0 if ends[axis] == "low" else n - side)
            crop.append(slice(start, start + side))
        return self._reduced(full, crop)

    def _stretched_slabs(self, g: torch.Tensor, first: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(slot, vectors, valid)`` of the candidate ``g`` magnified along each slab's axis by every
        :attr:`slab_stretches` factor about the slab's anchor (its low end, centre or high end), for the slab slots
        from ``first`` on: a copy cut to a fraction between the slabs' matches one of them stretched."""
        if not self.slab_stretches:
            return []
        stretched: dict[tuple[int, str], torch.Tensor] = {}
        out = []
        for h in self._whole_slabs:
            cuts = self._slab_cuts[h]
            axis = next(a for a, c in enumerate(cuts) if c is not None)
            anchor = cuts[axis][1]
            if (axis, anchor) not in stretched:
                coord = self.spatial_dims - 1 - axis  # affine_grid orders its coordinates by reversed axes
                at = {"low": -1.0, "centre": 0.0, "high": 1.0}[anchor]
                maps = []
                for z in self.slab_stretches:  # output point p samples the input at at + (p - at) / z
                    m = torch.cat([torch.eye(self.spatial_dims), torch.zeros(self.spatial_dims, 1)], dim=1)
                    m[coord, coord], m[coord, -1] = 1.0 / z, at * (1.0 - 1.0 / z)
                    maps.append(m)
                stretched[(axis, anchor)] = self._reduced(_linear_variants(g, maps))  # (B * Z, C, *crop_grid)
            z = len(self.slab_stretches)
            out += [(first + h, *_standardised_piece(stretched[(axis, anchor)][k::z])) for k in range(z)]
        return out

    def _stretched_corners(self, g: torch.Tensor, first: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(slot, vectors, valid)`` of the candidate ``g`` magnified about each corner by every
        :attr:`corner_stretches` factor, for the corner slots from ``first`` on: a copy cropped at a corner to a
        fraction between the corners' matches one of them stretched."""
        if not self.corner_stretches:
            return []
        z = len(self.corner_stretches)
        ends = list(itertools.product(("low", "high"), repeat=self.spatial_dims))
        stretched = {}
        for corner in ends:  # output point p samples the input at at + (p - at) / z, per axis
            maps = []
            for zoom in self.corner_stretches:
                m = torch.cat([torch.eye(self.spatial_dims) / zoom, torch.zeros(self.spatial_dims, 1)], dim=1)
                for axis, end in enumerate(corner):
                    at = -1.0 if end == "low" else 1.0
                    m[self.spatial_dims - 1 - axis, -1] = at * (1.0 - 1.0 / zoom)  # reversed axes (affine_grid)
                maps.append(m)
            stretched[corner] = self._reduced(_linear_variants(g, maps))  # (B * Z, C, *crop_grid)
        out = []
        for c, cuts in enumerate(self._corner_cuts):
            piece = stretched[tuple(end for _, end in cuts)]
            out += [(first + c, *_standardised_piece(piece[k::z])) for k in range(z)]
        return out

    def embed(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """Training side: every standardised region in its slot, scaled by ``1 / sqrt(R)``.

        Raises:
            NonFiniteImageError: for NaN/Inf images.
            DegenerateImageError: when every region is constant.
        """
        full = scaled_batch(images, self.spatial_dims)
        g = F.interpolate(full, size=(self.grid,) * self.spatial_dims, mode="area")
        parts = self._regions(g, full)
        if not bool(torch.stack([v for _, v in parts]).any(dim=0).all()):
            raise DegenerateImageError("an image is constant in every region; correlation is undefined")
        vec = torch.cat([p for p, _ in parts], dim=1) / math.sqrt(len(parts))
        return vec.numpy().astype(np.float32, copy=False)

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """Query side ``(B, V, d)``: one variant per (sign, symmetry, slot), the candidate's part alone in its slot.

        A constant region cannot be compared; its variant repeats the first comparable region of the same image
        instead (so it never adds a spurious distance), and an image with no comparable region is refused.
        """
        full = scaled_batch(images, self.spatial_dims)
        g = F.interpolate(full, size=(self.grid,) * self.spatial_dims, mode="area")
        n = g.shape[0]
        slots = len(self._offsets) - 1 - len(self._halves)  # the halves' slots hold the unrotated candidate alone
        if not slots or len(self.rotations) == 1:
            turned = g[:, None]
        elif self.spatial_dims == 3:  # about each axis; the identity stays bit-exact
            turned = _linear_variants(g, self._rotation_maps()).reshape(n, -1, *g.shape[1:])
            turned[:, 0] = g
        else:
            turned = _affine_variants(g, (1.0,), self.rotations).reshape(n, len(self.rotations), *g.shape[1:])
        variants = len(self._symmetries) * turned.shape[1] * slots
        variants += len(self._moved) + len(self._moved_quadrants) + len(self._symmetries) * len(self._whole_halves)
        # the slabs' slots also hold the candidate (unturned) stretched a little along the slab's axis about its anchor;
        # moved slabs: only the candidate's slab at the other end of the axis
        variants += len(self._whole_slabs) * len(self.slab_stretches) + len(self._moved_slabs)
        variants += len(self._corner_cuts) * len(self.corner_stretches)
        # written straight into one tensor, negations included: building each variant as its own zero vector, then
        # stacking and concatenating them, cost the crops space half of its judging time
        v = torch.zeros(n, variants * len(self.signs), self.dim)
        at = 0
        for (perm, flips), k in itertools.product(self._symmetries, range(turned.shape[1]) if slots else ()):
            parts = self._regions(_apply_symmetry(turned[:, k], perm, flips, 2))
            valid = torch.stack([ok for _, ok in parts], dim=1)  # (B, R)
            if not bool(valid.any(dim=1).all()):
                raise DegenerateImageError("an image is constant in every region; correlation is undefined")
            first = valid.float().argmax(dim=1)
            for r, (vec, ok) in enumerate(parts):
                v[:, at, self._offsets[r] : self._offsets[r + 1]] = vec
                for i in torch.nonzero(~ok).flatten().tolist():  # a constant region: the first comparable one instead
                    f = int(first[i])
                    v[i, at] = 0.0
                    v[i, at, self._offsets[f] : self._offsets[f + 1]] = parts[f][0][i]
                at += 1
        moved = [(r, *_standardised_piece(self._crop(full, c, anchor))) for r, c, anchor in self._moved]
        if self._moved_quadrants:
            quadrants = self._regions(g)
            moved += [(r, *quadrants[q]) for q, r in self._moved_quadrants]
        if self._halves:  # the whole candidate, under each symmetry, in every half's slot
            whole = self._reduced(g)  # the even grid halved: the symmetries commute with it, so reduce once
            for perm, flips in self._symmetries:
                vec, ok = _standardised_piece(_apply_symmetry(whole, perm, flips, 2))
                if not bool(ok.all()):
                    raise DegenerateImageError("an image is constant; correlation is undefined")
                moved += [(slots + h, vec, ok) for h in self._whole_halves]
            first_slab = slots + len(self._halves) - len(self._slab_cuts)
            moved += self._stretched_slabs(g, first_slab)
            moved += self._stretched_corners(g, slots + self._first_corner)
            moved += [(first_slab + h, *_standardised_piece(self._half(full, cut))) for h, cut in self._moved_slabs]
        for r, vec, ok in moved:  # the candidate's corner windows / quadrants in the other corners' slots
            v[:, at, self._offsets[r] : self._offsets[r + 1]] = vec
            for i in torch.nonzero(~ok).flatten().tolist():  # a constant window repeats the first variant
                v[i, at] = v[i, 0]
            at += 1
        if len(self.signs) == 2:
            torch.neg(v[:, :variants], out=v[:, variants:])
        return v.numpy().astype(np.float32, copy=False)

    def __repr__(self) -> str:
        slabs = f", slabs={self.slabs}" if self.slabs else ""
        return f"PartSpace(grid={self.grid}, spatial_dims={self.spatial_dims}, kind={self.kind!r}, centre={self.centre}{slabs})"


def _standardised_piece(piece: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, *grid)`` -> ``(B, size)`` standardised vectors (zero rows where constant) and the ``(B,)`` valid mask."""
    flat = piece.reshape(piece.shape[0], -1)
    centred = _scaled(flat) - _scaled(flat).mean(dim=1, keepdim=True)
    norm = centred.norm(dim=1, keepdim=True)
    valid = (norm.flatten() > 1e-6 * centred.shape[1] ** 0.5) & torch.isfinite(norm.flatten())
    return torch.where(valid[:, None], centred / norm.clamp_min(1e-30), torch.zeros_like(centred)), valid


class TileSpace:
    """Windows of the candidate over its whole field of view, each compared with every whole training image.

    Catches a training image (at any size) that sits somewhere inside a candidate: one tile of a mosaic, a corner
    of a larger canvas, one side of a side-by-side pair. Windows are squares (cubes) of ``scale`` times the
    candidate's shortest side at every scale, slid by a quarter of their side over the whole image (the last
    window always touches the far edge, and the centred window is always there), and the halves of each axis (one
    side of a pair squeezed side by side), resampled to the grid and tried mirrored / transposed / inverted. Also the
    windows cut at the image's own straight seams (``seam_limit``): a picture pasted between two steps.

    Args:
        grid: side of the grid windows and training images are resampled to.
        spatial_dims: 2 or 3.
        scales: window sides as fractions of the candidate's shortest side. The whole image (scale 1 of a square
            candidate) is the ``pixel`` space's job; a non-square candidate is also tried with scale-1 windows.
        stride: window step as a fraction of the window side.
        fine_scales: scales slid by half of ``stride``. A picture pasted between two positions a quarter of its side
            apart is misregistered by up to an eighth of its side, which on PET phantoms costs more than the distance
            between two patients; windows of large scales are few, so the finer step costs little there.
        invariances: ``"flip"``, ``"transpose"``, ``"invert"``.
        reference: the training images' shape on the index (``spatial_size``): windows take its proportions instead of
            a square's, so a candidate larger than that geometry (a canvas of whole training volumes) is judged with
            windows of a training volume's shape slid over every axis, at every scale. None: squares (cubes).
        fractions: per-axis fractions of the candidate's own extent (3D): windows that span one or two axes whole and
            a fraction of the others, slid over every axis, each compared as is and inverted (not under the other
            symmetries: they would multiply the variants by 8). A canvas of training volumes laid out along some axes
            and squeezed to the candidate's shape holds each volume in such a window, which no cube matches.
        seam_limit: up to this many more windows per image, cut at its straight seams (planes in 3D)
            (:func:`~monai_synth.privacy.seams.seam_windows`: a picture pasted between two window positions, registered
            to the pixel), under every symmetry; an image with fewer repeats its first. 0: none.
        seam_scales: sides of the windows that start or end at one seam, as fractions of the shortest side.
    """

    _VERSION = 2

    def __init__(
        self,
        grid: int = 16,
        spatial_dims: int = 2,
        scales: Sequence[float] = (0.9, 0.8, 0.5, 1.0 / 3.0),
        stride: float = 0.25,
        invariances: Sequence[str] = ("flip", "transpose", "invert"),
        reference: Sequence[int] | None = None,
        fractions: Sequence[float] = (),
        fine_scales: Sequence[float] = (),
        name: str = "tiles",
        halves: bool = True,
        seam_limit: int = 0,
        seam_scales: Sequence[float] = (),
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if int(grid) < 4:
            raise ValueError(f"grid must be at least 4 cells per axis, got {grid}")
        if reference is not None and (len(reference) != spatial_dims or min(int(r) for r in reference) < 1):
            raise ValueError(
                f"reference must be {spatial_dims} positive sizes (the index's spatial_size), got {reference}"
            )
        if not all(0.1 <= float(f) < 1.0 for f in fractions):
            raise ValueError(f"fractions must be fractions of an axis in [0.1, 1), got {list(fractions)}")
        if not scales or not all(0.1 <= float(s) < 1.0 for s in scales):
            raise ValueError(f"scales must be fractions of the shortest side in [0.1, 1), got {list(scales)}")
        if not 0.05 <= float(stride) <= 1.0:
            raise ValueError(f"stride must be a fraction of the window side in [0.05, 1], got {stride}")
        if int(seam_limit) < 0:
            raise ValueError(f"seam_limit must be >= 0, got {seam_limit}")
        if seam_limit and (not seam_scales or not all(0.1 <= float(s) < 1.0 for s in seam_scales)):
            raise ValueError(f"seam_scales must be fractions of the shortest side in [0.1, 1), got {list(seam_scales)}")
        invariances = _checked_invariances(invariances)
        self.seam_limit = int(seam_limit)
        self.seam_scales = tuple(sorted({round(float(s), 4) for s in seam_scales}, reverse=True))
        self.name, self.halves = str(name), bool(halves)
        self.grid, self.spatial_dims = int(grid), int(spatial_dims)
        self.scales = tuple(sorted({round(float(s), 4) for s in scales}, reverse=True))
        self.stride = float(stride)
        self.fine_scales = tuple(sorted({round(float(f), 4) for f in fine_scales}, reverse=True))
        if not set(self.fine_scales) <= set(self.scales):
            raise ValueError(f"fine_scales must be among scales {list(self.scales)}, got {list(fine_scales)}")
        self.invariances = invariances
        self.reference = None if reference is None else tuple(int(r) for r in reference)
        self.fractions = tuple(sorted({round(float(f), 6) for f in fractions}, reverse=True))
        self._symmetries, self.signs = _query_symmetries(self.spatial_dims, self.invariances)

    @property
    def dim(self) -> int:
        """Length of the vectors of single-channel images."""
        return self.grid**self.spatial_dims

    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors."""
        cfg = {
            "space": self.name,
            "version": self._VERSION,
            "grid": self.grid,
            "spatial_dims": self.spatial_dims,
            "scales": list(self.scales),
            "stride": self.stride,
            "invariances": list(self.invariances),
        }
        if self.reference is not None or self.fractions:  # settings of the 3D windows (2D fingerprints unchanged)
            cfg.update({"reference": list(self.reference or ()), "fractions": list(self.fractions)})
        if self.fractions:  # fraction windows cut at unrounded positions, sampled on the grid
            cfg["fraction_windows"] = "unrounded"
        if self.fine_scales:
            cfg["fine_scales"] = list(self.fine_scales)
        if not self.halves:
            cfg["halves"] = False
        if self.seam_limit:
            # the windows' order decides which are kept: cubes of one side first (a volume's seams combine thrice);
            # 2D windows ranked by their four edges together first (order 3)
            order = 3 if self.spatial_dims == 2 else 2
            cfg.update({"seam_limit": self.seam_limit, "seam_scales": list(self.seam_scales), "seam_order": order})

        return _fingerprint(cfg)

    def embed(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """Training side: the whole image on the grid, standardised (as the ``pixel`` space's plain vector)."""
        g = F.interpolate(scaled_batch(images, self.spatial_dims), size=(self.grid,) * self.spatial_dims, mode="area")
        return _standardise(g.reshape(g.shape[0], -1)).numpy().astype(np.float32, copy=False)

    def windows(self, shape: Sequence[int]) -> list[tuple[slice, ...]]:
        """The windows judged in an image of spatial ``shape``: every scale, every position, the far edges included;
        the fraction windows (see :meth:`fraction_windows`) last."""
        main = self._main_windows(shape)
        return main + self.fraction_windows(shape, exclude=main)

    def _main_windows(self, shape: Sequence[int]) -> list[tuple[slice, ...]]:
        """The windows compared under every symmetry: every scale and position, and the halves of each axis."""
        shape = [int(s) for s in shape]
        aspect = self.reference or (1,) * len(shape)
        fit = min(n / a for n, a in zip(shape, aspect))  # the largest window of the reference's proportions
        sized = [max(1, int(round(a * fit))) for a in aspect]
        scales = self.scales if sized == shape else (1.0, *self.scales)
        out: list[tuple[slice, ...]] = []
        for scale in scales:
            sides = [max(2, int(round(a * fit * scale))) for a in aspect]
            out.extend(self._slid(shape, sides, self.stride / 2 if scale in self.fine_scales else self.stride))
        # halves: the whole extent of the other axes and half of one, at its start, middle and end: one side of a
        # pair squeezed side by side into the candidate's shape (resampled to the grid, it is that image again)
        for axis, n in enumerate(shape if self.halves else ()):
            half = max(2, n // 2)
            for start in sorted({0, (n - half) // 2, n - half}):
                out.append(tuple(slice(start, start + half) if a == axis else slice(0, m) for a, m in enumerate(shape)))
        return out

    def fraction_windows(self, shape: Sequence[int], exclude: Sequence[tuple[slice, ...]] = ()) -> list[tuple]:
        """Windows spanning one or more axes whole and a fraction (``fractions``) of the others, slid over every axis
        (those already in ``exclude`` left out): where a canvas laid out along some axes and squeezed to the
        candidate's shape holds each training volume.

        Each window is ``((start, side), ...)`` per axis in voxels, not rounded to whole voxels: a volume squeezed to
        a third of a 32-voxel axis spans 10.67 voxels, and a window cut at 10 or 11 voxels misregisters it by a
        twentieth of its side, which on CT phantoms costs as much as the distance between two patients.
        """

        def key(w: Sequence[tuple[float, float]]) -> tuple:
            return tuple((round(a, 4), round(b, 4)) for a, b in w)

        shape = [int(s) for s in shape]
        seen = {key([(s.start, s.stop - s.start) for s in w]) for w in exclude}
        out: list[tuple] = []
        for fr in itertools.product((1.0, *self.fractions), repeat=len(shape)):
            if all(f == 1.0 for f in fr) or 1.0 not in fr:
                continue
            for w in itertools.product(*[self._slid_exact(n, f) for n, f in zip(shape, fr)]):
                if key(w) not in seen:
                    seen.add(key(w))
                    out.append(w)
        return out

    def _slid_exact(self, n: int, fraction: float) -> list[tuple[float, float]]:
        """``(start, side)`` of a window of ``fraction`` of an axis of ``n`` voxels at every step of ``stride`` times
        its side, the far edge and the centre too; unrounded."""
        side = n * fraction
        if fraction >= 1.0:
            return [(0.0, float(n))]
        step, room = side * self.stride, n - side
        pos = [k * step for k in range(int(room / step + 1e-6) + 1)] + [room, room / 2]
        return [(p, side) for p in sorted({round(p, 6) for p in pos})]

    def _resampled_exact(self, x: torch.Tensor, windows: Sequence[tuple]) -> torch.Tensor:
        """``(B, W, C, *grid)``: every unrounded window of ``x`` sampled on the grid (trilinear, from ``x`` reduced to
        at most twice the grid, so a whole axis is sampled as area interpolation would and a large volume is not
        aliased)."""
        nd, grid = self.spatial_dims, self.grid
        work = tuple(min(n, 2 * grid) for n in x.shape[2:])
        src = F.interpolate(x, size=work, mode="area") if work != tuple(x.shape[2:]) else x
        scale = torch.tensor([[side / n for (_, side), n in zip(w, x.shape[2:])] for w in windows])
        centre = torch.tensor([[(2 * a + side) / n - 1.0 for (a, side), n in zip(w, x.shape[2:])] for w in windows])
        # normalised coordinates of the sample points of every window (align_corners=False), stacked on the first
        # output axis so the volume is sampled once, never repeated per window
        unit = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2.0 - 1.0
        axes = [unit[None, :] * scale[:, a : a + 1] + centre[:, a : a + 1] for a in range(nd)]  # per axis (W, grid)
        mesh = torch.meshgrid(*[torch.arange(grid)] * nd, indexing="ij")
        coords = torch.stack([axes[a][:, mesh[a]] for a in reversed(range(nd))], dim=-1)  # (W, *grid, nd): x, y, z
        coords = coords.reshape(1, len(windows) * grid, *coords.shape[2:]).expand(x.shape[0], *([-1] * (nd + 1)))
        out = F.grid_sample(src, coords, mode="bilinear", padding_mode="border", align_corners=False)
        return out.reshape(x.shape[0], x.shape[1], len(windows), *[grid] * nd).movedim(2, 1)

    def _slid(self, shape: Sequence[int], sides: Sequence[int], stride: float) -> list[tuple[slice, ...]]:
        """Windows of ``sides`` at every step of ``stride`` times their side per axis, the far edge and centre too."""
        starts = []
        for n, side in zip(shape, sides):
            step = max(1, int(round(side * stride)))
            pos = list(range(0, max(n - side, 0) + 1, step))
            pos += [max(n - side, 0), max(n - side, 0) // 2]  # the far edge and the centre, always
            starts.append(sorted(set(pos)))
        return [tuple(slice(o, o + s) for o, s in zip(corner, sides)) for corner in itertools.product(*starts)]

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """Query side ``(B, V, d)``: every window x symmetry x sign (fraction windows x sign), resampled to the grid and
        standardised.

        A constant window (e.g. plain background) cannot be compared; it repeats the image's first comparable window
        instead, and an image with no comparable window is refused.
        """
        x = scaled_batch(images, self.spatial_dims)
        n, size = x.shape[0], (self.grid,) * self.spatial_dims
        main = self._main_windows(x.shape[2:])

        def resampled(windows: list[tuple[slice, ...]]) -> torch.Tensor:  # (B, W, C, *grid)
            return torch.stack(
                [F.interpolate(x[(slice(None), slice(None), *w)], size=size, mode="area") for w in windows], dim=1
            )

        tiles = resampled(main)
        if self.seam_limit:
            tiles = torch.cat([tiles, self._seam_tiles(x, main[0])], dim=1)
        sym = torch.cat([_apply_symmetry(tiles, p, f, 3) for p, f in self._symmetries], dim=1)
        extra = self.fraction_windows(x.shape[2:], exclude=main)
        if extra:  # as they are: under every symmetry they would be 8 times as many
            sym = torch.cat([sym, self._resampled_exact(x, extra)], dim=1)
        flat = sym.reshape(n, sym.shape[1], -1)
        centred = flat - flat.mean(dim=2, keepdim=True)
        norm = centred.norm(dim=2, keepdim=True)
        valid = (norm[..., 0] > 1e-6 * flat.shape[2] ** 0.5) & torch.isfinite(norm[..., 0])
        if not bool(valid.any(dim=1).all()):
            raise DegenerateImageError("an image is constant in every window; correlation is undefined")
        v = centred / norm.clamp_min(1e-30)
        # a constant window repeats the first window comparable under every symmetry, under its own symmetry: its
        # variants stay one window's flips (the search screens them as one orbit, see orbit_layout, and drops them as
        # repeats of that window's); anything else constant repeats the first comparable variant
        m = len(self._symmetries) * tiles.shape[1]  # the windows under every symmetry (the fraction windows follow)
        whole = valid[:, :m].reshape(n, len(self._symmetries), -1).all(dim=1)  # (n, windows)
        has = whole.any(dim=1)[:, None]
        at = (torch.arange(m) // tiles.shape[1] * tiles.shape[1])[None] + whole.float().argmax(dim=1)[:, None]
        same = torch.gather(v[:, :m], 1, at[..., None].expand(-1, -1, v.shape[2]))
        v[:, :m] = torch.where((valid[:, :m] | ~has)[..., None], v[:, :m], same)
        valid[:, :m] |= has
        first = valid.float().argmax(dim=1)
        v = torch.where(valid[..., None], v, v[torch.arange(n), first][:, None, :])
        if len(self.signs) == 2:
            v = torch.cat([v, -v], dim=1)
        return v.numpy().astype(np.float32, copy=False)

    def orbit_layout(self, nv: int, d: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The variants of :meth:`embed_variants` (``nv`` per image, ``d`` values each) that are one window under the
        flips (:mod:`monai_synth.privacy.orbits`): the search screens each such orbit once. 2D only: orbits of a
        volume's 8 flips of 4,096 values were slower (random rows: ``S`` sums 8 terms, and at 8,192 rows most pairs
        passed its bound), so a volume's variants are screened one by one."""
        cells, per = self.grid**self.spatial_dims, len(self._symmetries) * len(self.signs)
        if d % cells or nv % per or self.fractions or self.spatial_dims != 2:
            return None
        n = nv // per  # windows, each under every symmetry and sign
        return grid_flips((self.grid,) * 2, d // cells), layout(self._symmetries, lambda s: s * n + np.arange(n))

    def _seam_tiles(self, x: torch.Tensor, fallback: tuple[slice, ...]) -> torch.Tensor:
        """``(B, seam_limit, C, *grid)``: each image's windows cut at its seams, on the grid, the first repeated (or
        ``fallback``, where none shows) up to ``seam_limit``."""
        size = (self.grid,) * self.spatial_dims
        out = []
        for image in x:
            windows = seam_windows(image, self.seam_scales, self.seam_limit) or [fallback]
            tiles = torch.cat([F.interpolate(image[(None, slice(None), *w)], size=size, mode="area") for w in windows])
            out.append(torch.cat([tiles, tiles[:1].expand(self.seam_limit - len(windows), *tiles.shape[1:])]))
        return torch.stack(out)

    def __repr__(self) -> str:
        return (
            f"TileSpace(name={self.name!r}, grid={self.grid}, spatial_dims={self.spatial_dims}, scales={self.scales})"
        )
