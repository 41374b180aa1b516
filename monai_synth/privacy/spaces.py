"""Privacy spaces: where "is this synthetic image a near-copy of a training image?" is measured.

A privacy space maps a batch of model-space images to one vector per image. Every space in monai_synth
returns **L2-normalised** vectors, so the distance between two images is

    distance(u, v) = 1 - <u, v> = ||u - v||^2 / 2,      0 = identical, 1 = unrelated, 2 = opposite,

which FAISS computes exactly with ``IndexFlatIP`` (or ``IndexFlatL2`` halved). Keeping one distance for all
spaces lets one index class, one calibration and one safeguard serve the cheap pixel space and the
learned embedding space alike.

Spaces may be *invariant* to a small group of transforms (flips, shifts): they expose
:meth:`PixelSpace.embed_variants`, one vector per transformed copy of each query image, and the index
takes the minimum distance over the copies. Transforming the *query* rather than indexing transformed
training copies keeps the index one row per training image, which is what lets it scale to a million
images (see :mod:`monai_synth.privacy.index`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from monai_synth.privacy.orbits import grid_flips, layout_of_ops

__all__ = [
    "PrivacySpace",
    "PixelSpace",
    "NonFiniteImageError",
    "DegenerateImageError",
    "as_image_batch",
    "check_finite",
    "embed_variants",
    "images_per_batch",
    "note_query_size",
    "space_distance",
    "distance_floor",
]


class NonFiniteImageError(ValueError):
    """An image holds NaN or Inf values; it cannot be compared, so it must never be released."""


class DegenerateImageError(ValueError):
    """An image has no structure to compare (e.g. constant); refused rather than waved through."""


@runtime_checkable
class PrivacySpace(Protocol):
    """What the index, calibration and safeguard need from a privacy space.

    Attributes:
        name: short key used in certificates and thresholds (``"pixel"``, ``"embedding"``).

    Methods:
        fingerprint: a string that changes whenever the mapping from images to vectors changes
            (parameters, learned weights); the training index records it and refuses to serve a space
            whose fingerprint differs.
        embed: ``(B, C, *spatial)`` model-space images -> ``(B, d)`` float32 numpy array of L2-normalised
            vectors; distance = ``1 - dot``. Must raise (never return a vector) for NaN/Inf input.
    """

    name: str

    def fingerprint(self) -> str: ...

    def embed(self, images: torch.Tensor | np.ndarray) -> np.ndarray: ...


def as_image_batch(images: torch.Tensor | np.ndarray | Sequence, spatial_dims: int | None = None) -> torch.Tensor:
    """Convert images to a float32 CPU tensor ``(B, C, *spatial)``.

    Accepts a batch tensor/array or a sequence of channel-first images of equal shape.

    Raises:
        ValueError: if the shape does not match ``spatial_dims`` (when given).
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("empty image sequence: nothing to embed")
        images = torch.stack([torch.as_tensor(np.asarray(i) if not torch.is_tensor(i) else i) for i in images])
    x = torch.as_tensor(images).detach().to(device="cpu", dtype=torch.float32)
    if spatial_dims is not None and x.ndim != spatial_dims + 2:
        raise ValueError(
            f"expected images of shape (B, C, {', '.join(['*'] * spatial_dims)}) for spatial_dims={spatial_dims}, "
            f"got {tuple(x.shape)}"
        )
    if x.ndim < 3:
        raise ValueError(f"expected images of shape (B, C, *spatial), got {tuple(x.shape)}")
    return x


def check_finite(images: torch.Tensor) -> None:
    """Raise :class:`NonFiniteImageError` naming the offending batch items if any value is NaN or Inf."""
    bad = ~torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteImageError(f"images {bad.nonzero().flatten().tolist()} of the batch contain NaN or Inf values")


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """Each row divided by its largest magnitude: correlation ignores scale, and huge values can no longer overflow."""
    peak = x.abs().amax(dim=1, keepdim=True)
    return x / torch.where(peak > 0, peak, torch.ones_like(peak))


def scaled_batch(images: torch.Tensor | np.ndarray | Sequence, spatial_dims: int) -> torch.Tensor:
    """``(B, C, *spatial)`` float images, checked finite and each divided by its largest magnitude: area interpolation
    of values near the float32 limit would overflow to Inf.

    Raises:
        NonFiniteImageError: for NaN/Inf images.
    """
    x = as_image_batch(images, spatial_dims)
    check_finite(x)
    return _scaled(x.reshape(x.shape[0], -1)).reshape(x.shape)


def _median_filtered(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, *spatial)`` images, each value replaced by the median of its ``size``-wide neighbourhood (edges
    replicated). Impulse noise (salt and pepper) is gone after it; a smooth image hardly changes."""
    nd, r = x.ndim - 2, size // 2
    w = F.pad(x, (r,) * (2 * nd), mode="replicate")
    for axis in range(nd):
        w = w.unfold(2 + axis, size, 1)
    return w.reshape(*x.shape, -1).median(dim=-1).values


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-norm per row, so the dot product of two rows is their Pearson correlation.

    Raises:
        DegenerateImageError: for rows with no structure (constant) or a norm that is not finite: a degenerate vector
            is never turned into a distance.
    """
    x = _scaled(x)
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    flat = ~(norm.flatten() > 1e-6 * x.shape[1] ** 0.5) | ~torch.isfinite(norm.flatten())
    if bool(flat.any()):
        raise DegenerateImageError(
            f"images {flat.nonzero().flatten().tolist()[:10]} of the batch are constant or not finite; correlation is "
            "undefined"
        )
    return x / norm


_INVARIANCES = ("flip", "transpose", "shift", "zoom", "rotate", "invert")


def _fine_grid(images: torch.Tensor | np.ndarray | Sequence, spatial_dims: int, grid: int) -> torch.Tensor:
    """Images at twice ``grid`` per axis (or their own size when smaller), where rotations and zooms resample:
    resampled on the coarse grid itself, interpolation blurs a copy as far from its source as another patient is.

    Raises:
        NonFiniteImageError: for NaN/Inf images.
    """
    x = scaled_batch(images, spatial_dims)
    size = tuple(min(2 * grid, n) for n in x.shape[2:])
    return F.interpolate(x, size=size, mode="area") if tuple(x.shape[2:]) != size else x


def _check_inscribed_settings(grid: int, radius: float, rotations: Sequence[float], zooms: Sequence[float]) -> None:
    """The settings the disc and ball spaces share, each with what is allowed."""
    if int(grid) < 8:
        raise ValueError(f"grid must be at least 8 cells per axis, got {grid}")
    if not 0.2 < float(radius) <= 0.5:
        raise ValueError(f"radius must be a fraction of the side in (0.2, 0.5], got {radius}")
    if not all(-180.0 <= float(r) <= 180.0 for r in rotations):
        raise ValueError(f"rotations must be angles in degrees within [-180, 180], got {list(rotations)}")
    if not all(0.25 <= float(z) <= 4.0 for z in zooms):
        raise ValueError(f"zooms must lie in [0.25, 4], got {list(zooms)}")


def _shift_steps(grid: int, radius: float, max_shift: float, shift_step: float) -> list[float]:
    """The moves (grid cells) per axis the disc and ball spaces try: every multiple of ``shift_step`` up to
    ``max_shift``, each way, 0 included.

    Raises:
        ValueError: for a move that would carry the inscribed disc or ball well out of the field of view, or a step
            outside [0.1, 4] cells.
    """
    limit = grid * (0.5 - radius) + 2
    if not 0.0 <= float(max_shift) < limit:
        raise ValueError(f"max_shift must be in [0, {limit:g}) grid cells, got {max_shift}")
    if not 0.1 <= float(shift_step) <= 4.0:
        raise ValueError(f"shift_step must be in [0.1, 4] grid cells, got {shift_step}")
    k = int(float(max_shift) / float(shift_step) + 1e-6)
    return [round(i * float(shift_step), 4) for i in range(-k, k + 1)]


def _masked_vectors(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(M, C, *grid)`` -> ``(M, C * cells in mask)``, standardised: the cells of an inscribed disc or ball."""
    v = g.reshape(g.shape[0], g.shape[1], -1)[:, :, mask]
    return _standardise(v.reshape(v.shape[0], -1))


def _affine_variants(g: torch.Tensor, zooms: Sequence[float], rotations: Sequence[float]) -> torch.Tensor:
    """``(B * Z * R, C, *grid)``: every image magnified by every zoom and rotated (in the first two axes) by every angle.

    Identity (zoom 1, angle 0) first and bit-exact; edges replicated.
    """
    ops = [(z, r) for z in zooms for r in rotations]
    if len(ops) == 1:
        return g
    n, nd = g.shape[0], g.ndim - 2
    theta = torch.zeros(len(ops), nd, nd + 1)
    for k, (z, deg) in enumerate(ops):
        rot = torch.eye(nd)
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        rot[:2, :2] = torch.tensor([[c, -s], [s, c]])
        theta[k, :, :nd] = rot / z  # output point p samples the input at R p / z: content magnified by z
    theta = theta.repeat(n, 1, 1)
    src = g.repeat_interleave(len(ops), dim=0)
    coords = F.affine_grid(theta, list(src.shape), align_corners=False)
    out = F.grid_sample(src, coords, mode="bilinear", padding_mode="border", align_corners=False)
    out[:: len(ops)] = g
    return out


def _linear_variants(g: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B * L, C, *grid)``: every image resampled through every ``(nd, nd)`` linear map about the centre (or
    ``(nd, nd + 1)`` affine map).

    Output point ``p`` samples the input at ``A p`` (``A p + t``); edges replicated. Used for the 3D rotations about
    each axis (with the ball's moves within the rotation's plane) and the zooms within one plane.
    """
    n, nd = g.shape[0], g.ndim - 2
    theta = torch.zeros(len(maps), nd, nd + 1)
    for k, a in enumerate(maps):
        theta[k, :, : a.shape[1]] = a  # (nd, nd + 1): a translation (normalised coordinates) in the last column
    theta = theta.repeat(n, 1, 1)
    src = g.repeat_interleave(len(maps), dim=0)
    coords = F.affine_grid(theta, list(src.shape), align_corners=False)
    return F.grid_sample(src, coords, mode="bilinear", padding_mode="border", align_corners=False)


def _shear_map(axis: int, k: float) -> torch.Tensor:
    """``(2, 2)`` shear about the centre for :func:`_linear_variants`: points move along ``axis`` by ``k`` times their
    offset along the other axis (``affine_grid`` orders its coordinates by reversed axes)."""
    m = torch.eye(2)
    m[1 - axis, axis] = k
    return m


def _stretch_map(axis: int, zoom: float, nd: int = 2) -> torch.Tensor:
    """``(nd, nd)`` magnification of spatial ``axis`` alone by ``zoom`` about the centre, for
    :func:`_linear_variants` (``affine_grid`` orders its coordinates by reversed axes)."""
    scale = torch.ones(nd)
    scale[nd - 1 - axis] = 1.0 / zoom
    return torch.diag(scale)


def _plane_rotation(nd: int, axis: int, degrees: float) -> torch.Tensor:
    """``(nd, nd)`` rotation by ``degrees`` about ``axis`` (3D: in the plane of the two other axes)."""
    rot = torch.eye(nd)
    i, j = [a for a in range(nd) if a != axis][:2]
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _plane_zoom(nd: int, axis: int, zoom: float) -> torch.Tensor:
    """``(nd, nd)`` magnification by ``zoom`` of every axis but ``axis`` (3D: a zoom within one plane)."""
    scale = torch.full((nd,), 1.0 / zoom)
    scale[axis] = 1.0
    return torch.diag(scale)


def _fingerprint(cfg: dict) -> str:
    """Short hash of a space's settings: what a saved index is checked against."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _checked_invariances(invariances: Sequence[str]) -> tuple[str, ...]:
    """The sorted invariances of a region, crop, tile or texture space; refuses names it does not know."""
    unknown = set(invariances) - {"flip", "transpose", "invert"}
    if unknown:
        raise ValueError(f"unknown invariances {sorted(unknown)}; choose from 'flip', 'transpose', 'invert'")
    return tuple(sorted(set(invariances)))


def _query_symmetries(spatial_dims: int, invariances: Sequence[str]) -> tuple[list, tuple[int, ...]]:
    """The symmetries (see :func:`_symmetries`) and intensity signs a query is tried under, from its invariances."""
    symmetries = _symmetries(spatial_dims, "flip" in invariances, "transpose" in invariances)
    return symmetries, ((1, -1) if "invert" in invariances else (1,))


def _symmetries(spatial_dims: int, flip: bool, transpose: bool) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(axis permutation, flipped axes) pairs: the identity first, then flips and/or axis permutations (rot90)."""
    perms = list(itertools.permutations(range(spatial_dims))) if transpose else [tuple(range(spatial_dims))]
    axes = range(spatial_dims)
    flips = [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)] if flip else [()]
    return [(p, f) for p in perms for f in flips]


def _apply_symmetry(w: torch.Tensor, perm: tuple[int, ...], flips: tuple[int, ...], first: int) -> torch.Tensor:
    """Permute then flip the spatial axes of ``w``, which start at dimension ``first``."""
    if perm != tuple(range(len(perm))):
        lead = list(range(first))
        w = w.permute(*lead, *[first + a for a in perm])
    return torch.flip(w, dims=[first + a for a in flips]) if flips else w


class PixelSpace:
    """Images on a fixed grid, intensity-standardised: distance = 1 - Pearson correlation.

    Cheap, needs no training and is exact, so it is the default privacy space. Pearson correlation ignores
    a global intensity offset and gain, so a near-copy with its contrast rescaled or with added noise is still
    close. It is not invariant to geometry by itself: ``invariances`` catch transformed copies by comparing every
    such variant of the *query* and keeping the smallest distance:

    * ``"flip"``: every combination of axis flips; ``"transpose"``: every axis permutation (with flips: rot90);
    * ``"shift"``: every integer shift of up to ``max_shift`` grid cells per axis, the vacated cells filled from the
      edge and, for the unzoomed, unrotated query, also wrapped around, up to ``wrap_shift`` cells (a copy moved on
      a background canvas);
    * ``"zoom"``: the query magnified by each factor in ``zooms`` about the centre (a copy cropped by a fraction
      ``f`` of each side and resized back is undone by ``1 - 2 f``); 3D also by each factor in ``plane_zooms``
      within each plane and over the whole volume, compared alone (a border added in-plane or all round and
      resized back);
    * ``"rotate"``: the query rotated by each angle in ``rotations`` (degrees; 2D in the image plane, combined with
      every shift and zoom; 3D about each of the three axes, compared alone);
    * ``"invert"``: the negated query as well, so an intensity-inverted copy (Pearson r = -1) is as close as the copy.

    ``gammas`` (any invariances): the query on its own [0, 1] range raised to each power, at full resolution before
    the grid, under every symmetry and shift (3D: unflipped with every shift, and under the mirror flips with the
    one-cell shifts): Pearson correlation ignores gain and offset, not a gamma curve, and a PET copy with gamma 0.5
    (the faint body lifted against the hot spots) sat 0.08 from its source on the grid, three times the nearest other
    patient; the power 2 undoes it exactly. The vacated cells of a moved power are wrapped around, as for a copy moved
    on a background canvas. Powers between the ones tried are undone in part: on PET volumes, with
    0.5, 0.7, 1.4 and 2, a copy with gamma 0.6 comes within 0.009 of its source (0.06 without), the nearest other
    patient 0.023.

    Args:
        grid: side of the grid images are resampled to (area interpolation), so images of any size compare
            (the whole field of view, never a crop) and the vector has ``grid ** spatial_dims`` entries per channel.
        spatial_dims: 2 or 3.
        invariances: any of the names above.
        max_shift: largest shift in grid cells when ``"shift"`` is requested.
        median: width of a median filter the query also goes through (at up to four times the grid) before the
            grid, under every symmetry and shift (0: none). Salt and pepper noise on 5% of a PET slice's pixels left
            copies 0.03-0.11 from their sources (the nearest other patient 0.05); median-filtered, 0.0004-0.002.
        wrap_shift: largest of the wrapped shifts (unzoomed, unrotated query; default ``max_shift``): a copy moved
            by a quarter of the side on its background (4 cells of 16) sat 0.26-0.38 from its source on PET slices,
            and the wrapped shifts, compared without zooms, cost a fifth of the edge-filled ones.
        zooms: magnifications tried when ``"zoom"`` is requested (1.0 is always included).
        rotations: angles tried when ``"rotate"`` is requested (0 is always included).
        plane_zooms: 3D only: magnifications tried alone within each plane and over the whole volume when ``"zoom"``
            is requested (default: ``zooms``). They are cheap (one variant each, not one per shift), so a finer set
            than ``zooms`` costs little.
        gammas: powers the query's [0, 1] intensities are raised to (a copy with gamma ``g`` is undone by ``1 / g``),
            each under every symmetry and shift (3D: as above; unzoomed, unrotated); none by default.
        shears: 2D only: shear factors tried along each axis about the centre (row ``i`` moved by ``k * i`` along
            the other axis), each under every symmetry, unshifted; none by default. CT slices sheared by 0.15 sat
            0.029-0.080 from their sources (threshold 0.018) and all passed the whole default gate; with shears of
            +-0.1 and +-0.2, 0.003-0.011, and no holdout image came closer than before.
        stretches: magnifications of one axis tried along each axis about the centre (a copy whose central 80% of
            one axis was resized back to the whole is undone by 0.8), each under every symmetry (3D: unflipped),
            unshifted; none by default. MRI slices stretched so sat 0.061-0.064 from their sources, new patients' from
            0.040, and all passed the whole default gate; with 0.8, 0.9, 1.1 and 1.25, 0.005-0.014. CT volumes whose
            central 70% of one axis was so stretched lie beyond the plane zooms (which magnify two axes) and passed the
            whole 3D gate 2 of 2.

    Zooms and rotations (and 3D's ``plane_zooms``) resample the image at twice the grid (``2 * grid`` per axis, or
    the volume's own size when smaller) and only then reduce it to the grid: resampled on the coarse grid itself,
    interpolation blurs a copy about as far from its source as two different patients' volumes are from each other.

    Cost: each query image is compared ``len(variant_ops)`` times (the product of the sizes of the requested
    groups plus the wrapped shifts, e.g. 2D 8 symmetries x 25 shifts x (7 zooms + 4 gammas + 1 median) x 2 signs +
    8 x 80 wrapped shifts x 2 signs + (8 shears + 8 stretches) x 8 symmetries x 2 signs = 6,336 for the guard's
    default, which leaves 2D rotations to the disc space); the index itself does not grow.
    """

    _VERSION = 8
    _DEFAULT_ZOOMS = (0.8, 0.9, 1.0, 1.1, 1.25)
    _DEFAULT_ROTATIONS = (-20.0, -10.0, 0.0, 10.0, 20.0)

    def __init__(
        self,
        grid: int = 32,
        spatial_dims: int = 2,
        invariances: Sequence[str] = (),
        max_shift: int = 2,
        zooms: Sequence[float] = _DEFAULT_ZOOMS,
        rotations: Sequence[float] = _DEFAULT_ROTATIONS,
        plane_zooms: Sequence[float] | None = None,
        gammas: Sequence[float] = (),
        wrap_shift: int | None = None,
        median: int = 0,
        shears: Sequence[float] = (),
        stretches: Sequence[float] = (),
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if int(grid) < 4:
            raise ValueError(f"grid must be at least 4 cells per axis, got {grid}")
        invariances = tuple(sorted({str(i) for i in invariances}))
        unknown = set(invariances) - set(_INVARIANCES)
        if unknown:
            raise ValueError(f"unknown invariances {sorted(unknown)}; choose from {list(_INVARIANCES)}")
        if "shift" in invariances and not 1 <= int(max_shift) < int(grid) // 2:
            raise ValueError(f"max_shift must be in [1, grid/2), got {max_shift} for grid {grid}")
        if "shift" in invariances and wrap_shift is not None and not int(max_shift) <= int(wrap_shift) < int(grid) // 2:
            raise ValueError(f"wrap_shift must be in [max_shift, grid/2), got {wrap_shift} for grid {grid}")
        if "zoom" in invariances and not all(0.25 <= float(z) <= 4.0 for z in zooms):
            raise ValueError(f"zooms must lie in [0.25, 4], got {list(zooms)}")
        if "zoom" in invariances and plane_zooms is not None and not all(0.25 <= float(z) <= 4.0 for z in plane_zooms):
            raise ValueError(f"plane_zooms must lie in [0.25, 4], got {list(plane_zooms)}")
        if "rotate" in invariances and not all(-180.0 <= float(r) <= 180.0 for r in rotations):
            raise ValueError(f"rotations must be angles in degrees within [-180, 180], got {list(rotations)}")
        if int(median) and not (int(median) >= 3 and int(median) % 2 == 1):
            raise ValueError(f"median must be 0 (none) or an odd filter width of at least 3, got {median}")
        if not all(0.1 <= float(g) <= 10.0 for g in gammas):
            raise ValueError(f"gammas must be powers in [0.1, 10], got {list(gammas)}")
        if shears and (int(spatial_dims) != 2 or not all(-1.0 <= float(k) <= 1.0 for k in shears)):
            raise ValueError(f"shears are 2D shear factors in [-1, 1], got {list(shears)} for {spatial_dims}D images")
        if not all(0.5 <= float(z) <= 2.0 for z in stretches):
            raise ValueError(f"stretches are magnifications of one axis in [0.5, 2], got {list(stretches)}")
        self.name = "pixel"
        self.grid = int(grid)
        self.spatial_dims = int(spatial_dims)
        self.invariances = invariances
        self.max_shift = int(max_shift) if "shift" in invariances else 0
        self.zooms: tuple[float, ...] = (1.0,)
        if "zoom" in invariances:
            self.zooms = (1.0,) + tuple(sorted({round(float(z), 4) for z in zooms} - {1.0}))
        self.plane_zooms: tuple[float, ...] = ()
        if "zoom" in invariances and self.spatial_dims == 3:
            chosen = zooms if plane_zooms is None else plane_zooms
            self.plane_zooms = tuple(sorted({round(float(z), 4) for z in chosen} - {1.0}))
        self.rotations: tuple[float, ...] = (0.0,)
        if "rotate" in invariances:
            self.rotations = (0.0,) + tuple(sorted({round(float(r), 4) for r in rotations} - {0.0}))
        self.signs = (1, -1) if "invert" in invariances else (1,)
        self.gammas = tuple(sorted({round(float(g), 4) for g in gammas} - {1.0}))
        self.median = int(median)
        self.shears = tuple(sorted({round(float(k), 4) for k in shears} - {0.0}))
        self.stretches = tuple(sorted({round(float(z), 4) for z in stretches} - {1.0}))
        flip, transpose = "flip" in invariances, "transpose" in invariances
        # 2D: every symmetry combines with every shift, zoom and angle (8 symmetries). 3D: the 8 flips and 48 axis
        # permutations would multiply the shifted variants (and memory) by up to 48, so they are compared alone (with
        # inversion), which catches a mirrored, 90-degree-rotated or axis-swapped volume, not one also shifted (the
        # flips alone are also tried with the one-cell shifts); the memory this saves buys larger 3D shifts. The same holds for 3D rotations (about each of the three axes) and
        # zooms within one plane (a volume with a border added in-plane and resized back): compared alone.
        if self.spatial_dims == 2:
            self._symmetries, self._permuted = _symmetries(2, flip, transpose), []
            self._main_rotations = self.rotations
        else:
            self._symmetries = _symmetries(3, False, False)
            self._permuted = _symmetries(3, flip, transpose)[1:]
            self._main_rotations = (0.0,)
        shifts = [(0,) * self.spatial_dims]
        if "shift" in invariances:
            rng = range(-self.max_shift, self.max_shift + 1)
            shifts = sorted(itertools.product(rng, repeat=self.spatial_dims), key=lambda s: (sum(map(abs, s)), s))
        self._shifts = shifts
        # shifted with the vacated cells wrapped around as well as replicated from the edge: a copy moved on a
        # background canvas has background where its far side was cut off, which the wrap restores and the replicated
        # edge (anatomy, when the image has anatomy near that edge) does not
        self.wrap_shift = max(self.max_shift, int(wrap_shift or 0)) if "shift" in invariances else 0
        reach = range(-self.wrap_shift, self.wrap_shift + 1)
        wrapped = sorted(itertools.product(reach, repeat=self.spatial_dims), key=lambda s: (sum(map(abs, s)), s))
        self._wrap_shifts = wrapped[1:] if self.wrap_shift else []
        # 3D: the mirror flips also with every shift of one cell per axis (a mirrored copy moved a little; the larger
        # shifts stay with the unflipped query)
        self._flip_shifts: list[tuple[int, ...]] = []
        self._flips: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        if self.spatial_dims == 3 and flip and "shift" in invariances:
            self._flips = _symmetries(3, True, False)[1:]
            self._flip_shifts = [s for s in shifts[1:] if max(map(abs, s)) <= 1]
        self._alone: list[tuple[tuple, tuple, torch.Tensor]] = []  # (zoom, rotation) descriptions and the map
        if self.spatial_dims == 3:
            nd = self.spatial_dims
            # affine_grid orders its coordinates (x, y, z) = the spatial axes reversed
            self._alone += [
                ((1.0,), (axis, r), _plane_rotation(nd, nd - 1 - axis, r))
                for axis in range(nd)
                for r in self.rotations[1:]
            ]
            self._alone += [
                ((axis, z), (0.0,), _plane_zoom(nd, nd - 1 - axis, z)) for axis in range(nd) for z in self.plane_zooms
            ]
            self._alone += [(("all", z), (0.0,), torch.eye(nd) / z) for z in self.plane_zooms]
        # (sign, zoom, angle, symmetry, shift, padding) of every variant; identity first: variant 0 is what `embed`
        # returns. 3D rotations are (axis, angle) and zooms within a plane (axis normal to it, zoom).
        self.variant_ops: list[tuple] = [
            (sign, z, r, sym, s, "edge")
            for sign in self.signs
            for z in self.zooms
            for r in self._main_rotations
            for sym in self._symmetries
            for s in shifts
        ]
        self.variant_ops += [(sign, 1.0, 0.0, sym, shifts[0], "edge") for sign in self.signs for sym in self._permuted]
        self.variant_ops += [
            (sign, 1.0, 0.0, sym, s, "edge") for sign in self.signs for sym in self._flips for s in self._flip_shifts
        ]
        self.variant_ops += [
            (sign, 1.0, 0.0, sym, s, "wrap")
            for sign in self.signs
            for sym in self._symmetries
            for s in self._wrap_shifts
        ]
        self.variant_ops += [
            (sign, z, r, self._symmetries[0], shifts[0], "edge") for sign in self.signs for z, r, _ in self._alone
        ]
        # the powers' vacated cells are wrapped around (the copy's own background fill, as above): a PET slice with
        # gamma 0.7, mirrored and moved 4 px on its background, stayed 0.02-0.04 from its source with the edge replicated
        self.variant_ops += [
            (sign, 1.0, 0.0, sym, s, "wrap", ("gamma", gm))
            for gm in self.gammas
            for sign in self.signs
            for sym in self._symmetries
            for s in shifts
        ]
        # 3D: each power also under the mirror flips with their one-cell shifts (a mirrored copy with a gamma curve)
        self.variant_ops += [
            (sign, 1.0, 0.0, sym, s, "wrap", ("gamma", gm))
            for gm in self.gammas
            for sign in self.signs
            for sym in self._flips
            for s in self._flip_shifts
        ]
        if self.median:  # the query median-filtered at full resolution, under every symmetry and shift
            self.variant_ops += [
                (sign, 1.0, 0.0, sym, s, "edge", ("median", self.median))
                for sign in self.signs
                for sym in self._symmetries
                for s in shifts
            ]
        if self.shears or self.stretches:  # each shear and stretch along each axis, under every symmetry, unshifted
            self.variant_ops += [
                (sign, 1.0, 0.0, sym, shifts[0], "edge", op)
                for sign in self.signs
                for op in self._linear_ops()
                for sym in self._symmetries
            ]
        # every variant, then every negated variant (as embed_variants returns them): the search takes the halves as
        # one product (see monai_synth.privacy.search)
        self.variant_ops.sort(key=lambda op: op[0] < 0)

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
            "invariances": list(self.invariances),
            "max_shift": self.max_shift,
            "zooms": list(self.zooms),
            "rotations": list(self.rotations),
            "plane_zooms": list(self.plane_zooms),
        }
        if self.gammas:  # spaces without them keep their fingerprints
            cfg["gammas"] = list(self.gammas)
        if self.wrap_shift != self.max_shift:
            cfg["wrap_shift"] = self.wrap_shift
        if self.median:
            cfg["median"] = self.median
        if self.shears:
            cfg["shears"] = list(self.shears)
        if self.stretches:
            cfg["stretches"] = list(self.stretches)
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]

    def _grid(self, x: torch.Tensor, fine: bool = False):
        """:func:`scaled_batch` images on the grid; with ``fine``, also on the fine grid the 3D rotations and plane
        zooms resample."""
        g = F.interpolate(x, size=(self.grid,) * self.spatial_dims, mode="area")
        if not fine:
            return g
        size = tuple(min(2 * self.grid, n) for n in x.shape[2:])
        return g, F.interpolate(x, size=size, mode="area") if tuple(x.shape[2:]) != size else x

    def embed(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, C, *spatial)`` model-space images -> ``(B, C * grid**spatial_dims)`` unit vectors.

        Raises:
            NonFiniteImageError: for NaN/Inf images.
            DegenerateImageError: for constant images.
        """
        g = self._grid(self._prepared(images))
        return _standardise(g.reshape(g.shape[0], -1)).numpy().astype(np.float32, copy=False)

    def _prepared(self, images: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
        """:func:`scaled_batch` images at full resolution, what every variant is made from (a subclass may map their
        intensities first)."""
        return scaled_batch(images, self.spatial_dims)

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, V, d)`` vectors of every variant of every image (variant 0 = :meth:`embed`), in the order of
        :attr:`variant_ops`.

        All shifted windows are views of one padded grid (``unfold``), so the variants cost one copy and one
        standardisation of a ``(B, V, d)`` array.
        """
        affine = len(self.zooms) * len(self._main_rotations)
        x = self._prepared(images)
        needs_fine = self._alone or affine > 1 or self.shears or self.stretches
        g, fine = self._grid(x, fine=True) if needs_fine else (self._grid(x), None)
        n, g0 = g.shape[0], g  # g0 (n, C, *grid): unshifted, unzoomed, unrotated
        if affine > 1:
            # zoomed and rotated on the fine grid, then reduced to the grid; the identity stays the grid itself
            g = F.interpolate(_affine_variants(fine, self.zooms, self._main_rotations), size=g0.shape[2:], mode="area")
            g[::affine] = g0
        groups = [self._moved(g, self._shifts, "replicate", self._symmetries, n)]
        if self._permuted:
            permuted = torch.cat(
                [_apply_symmetry(g0[:, None], perm, flips, 3) for perm, flips in self._permuted], dim=1
            )
            groups.append(self._signed(permuted, n))
        if self._flip_shifts:
            groups.append(self._moved(g0, self._flip_shifts, "replicate", self._flips, n))
        if self._wrap_shifts:
            groups.append(self._moved(g0, self._wrap_shifts, "circular", self._symmetries, n))
        if self._alone:
            # resampled on the fine grid, then reduced to the grid, one map at a time (memory: one fine copy per image)
            size = (self.grid,) * self.spatial_dims
            alone = torch.stack(
                [F.interpolate(_linear_variants(fine, [m]), size=size, mode="area") for _, _, m in self._alone], dim=1
            )
            groups.append(self._signed(alone, n))
        unit = self._unit_range(x) if self.gammas else None
        powered = [F.interpolate(unit**gm, size=g0.shape[2:], mode="area") for gm in self.gammas]
        # each power at full resolution, then on the grid
        groups += [self._moved(g_gamma, self._shifts, "circular", self._symmetries, n) for g_gamma in powered]
        if self._flip_shifts:
            groups += [self._moved(g_gamma, self._flip_shifts, "circular", self._flips, n) for g_gamma in powered]
        if self.median:
            # filtered at up to four times the grid: a 128^3 volume's filter costs 1.1 CPU-s at full size, 0.14 at 64^3
            size = tuple(min(4 * self.grid, n) for n in x.shape[2:])
            reduced = F.interpolate(x, size=size, mode="area") if size != tuple(x.shape[2:]) else x
            g_median = F.interpolate(_median_filtered(reduced, self.median), size=g0.shape[2:], mode="area")
            groups.append(self._moved(g_median, self._shifts, "replicate", self._symmetries, n))
        if self.shears or self.stretches:
            # resampled on the fine grid, then reduced to the grid, like the zooms
            maps = [
                _shear_map(axis, k) if kind == "shear" else _stretch_map(axis, k, self.spatial_dims)
                for kind, axis, k in self._linear_ops()
            ]
            mapped = F.interpolate(_linear_variants(fine, maps), size=g0.shape[2:], mode="area")
            groups.append(self._moved(mapped, self._shifts[:1], "replicate", self._symmetries, n))
        v = torch.cat(groups, dim=1)
        return (torch.cat([v, -v], dim=1) if len(self.signs) == 2 else v).numpy().astype(np.float32, copy=False)

    def orbit_layout(self, nv: int, d: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The variants of :meth:`embed_variants` (``nv`` per image, ``d`` values each) that are one variant under the
        flips (:mod:`monai_synth.privacy.orbits`; 2D: every shift and zoom under every symmetry), screened once by the
        search. None where their number is not that of :attr:`variant_ops`."""
        cells = self.grid**self.spatial_dims
        ops = sorted(self.variant_ops, key=lambda op: op[0] < 0)  # as embed_variants returns them: then negated
        if nv != len(ops) or d % cells or self.spatial_dims != 2:  # volumes: see TileSpace.orbit_layout
            return None
        return grid_flips((self.grid,) * self.spatial_dims, d // cells), layout_of_ops(ops, 3)

    def _linear_ops(self) -> list[tuple[str, int, float]]:
        """``("shear", axis the rows move along, factor)`` of every shear variant, then ``("stretch", axis,
        magnification)`` of every stretch variant."""
        shears = [("shear", axis, k) for axis in range(self.spatial_dims) for k in self.shears]
        return shears + [("stretch", axis, z) for axis in range(self.spatial_dims) for z in self.stretches]

    def _unit_range(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`scaled_batch` images at full resolution on their own [0, 1] range (per image), where the gammas
        apply."""
        flat = x.reshape(x.shape[0], -1)
        lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
        return ((flat - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))).clamp(0.0, 1.0).reshape(x.shape)

    def _windows(self, g: torch.Tensor, shifts: Sequence[tuple[int, ...]], mode: str) -> torch.Tensor:
        """``(M, C, *grid)`` -> ``(M, S, C, *grid)``: each grid moved by each of ``shifts`` (cells), the vacated cells
        filled by ``mode`` (``"replicate"``: the edge; ``"circular"``: what left on the other side)."""
        m, c, nd = g.shape[0], g.shape[1], self.spatial_dims
        s = max((max(map(abs, shift)) for shift in shifts), default=0)
        if not s:
            return g[:, None]
        w = F.pad(g, (s,) * (2 * nd), mode=mode)
        for axis in range(nd):
            w = w.unfold(2 + axis, self.grid, 1)  # offsets replace the axis, the window goes last
        w = w.movedim(1, 1 + nd)  # channels after the offsets: (M, *offsets, C, *grid)
        w = w.reshape(m, (2 * s + 1) ** nd, c, *([self.grid] * nd))
        # offsets come in row-major order; reorder them like `shifts`
        return w[:, torch.as_tensor([self._offset_index(shift, s) for shift in shifts])]

    def _moved(
        self, g: torch.Tensor, shifts: Sequence[tuple[int, ...]], mode: str, symmetries: Sequence[tuple], n: int
    ) -> torch.Tensor:
        """``(n * A, C, *grid)`` grids -> ``(n, A * S * symmetries, d)``: each moved by each of ``shifts`` (``mode`` as
        :meth:`_windows`), under each symmetry, standardised."""
        w = self._windows(g, shifts, mode)
        return self._signed(torch.cat([_apply_symmetry(w, perm, flips, 3) for perm, flips in symmetries], dim=1), n)

    def _signed(self, w: torch.Tensor, n: int) -> torch.Tensor:
        """``(n * A, V, C, *grid)`` variants (A affine variants per image) -> ``(n, A * V, d)`` standardised vectors
        (:meth:`embed_variants` appends the negated copies of all of them)."""
        per_image = w.shape[0] * w.shape[1] // n
        return _standardise(w.reshape(n * per_image, -1)).reshape(n, per_image, -1)

    def _offset_index(self, shift: tuple[int, ...], reach: int) -> int:
        """Position of a shift in the offsets unfolded from a grid padded by ``reach`` cells (row-major over axes,
        offset d at window start reach + d)."""
        side, idx = 2 * reach + 1, 0
        for d in shift:
            idx = idx * side + (d + reach)
        return idx

    def __repr__(self) -> str:
        return (
            f"PixelSpace(grid={self.grid}, spatial_dims={self.spatial_dims}, invariances={self.invariances}, "
            f"max_shift={self.max_shift}, zooms={self.zooms}, rotations={self.rotations}, plane_zooms={self.plane_zooms}, "
            f"gammas={self.gammas})"
        )


def embed_variants(space: PrivacySpace, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    """``(B, V, d)`` query vectors of ``space``: its variants if it has any, else ``embed`` with V = 1."""
    fn = getattr(space, "embed_variants", None)
    if callable(fn):
        vec = np.asarray(fn(images), dtype=np.float32)
    else:
        vec = np.asarray(space.embed(images), dtype=np.float32)[:, None, :]
    if vec.ndim != 3:
        raise ValueError(f"space {space.name!r} returned vectors of shape {vec.shape}; expected (B, d)")
    if not np.isfinite(vec).all():
        raise NonFiniteImageError(f"space {space.name!r} produced NaN/Inf vectors")
    return vec


QUERY_FLOATS = 2**25
"""Query vectors (float32 values) one space embeds and searches at once: 128 MiB. A 3D pixel-space query holds 17.8
million (4,354 variants of 4,096 values), a 2D one 1.6 million, so a batch of 64 would hold 4.6 GB per space (and the
embedding's intermediates several times that); batches are cut to this budget instead (the 3D ``halves`` space's
104.6 million, 1,688 variants of 61,952 values, go one volume at a time)."""

_PER_IMAGE: dict[tuple, int] = {}


def images_per_batch(
    space: PrivacySpace, image: torch.Tensor | np.ndarray, batch_size: int, budget: int | None = None
) -> int:
    """How many images like ``image`` (``(C, *spatial)``) to embed and search at once: at most ``batch_size``, and no
    more than fit ``budget`` query floats (default :data:`QUERY_FLOATS`; at least one).

    One, until :func:`note_query_size` has recorded the size of such an image's query vectors in this space (the
    caller embeds a first image alone and records what it got, so nothing is embedded twice).
    """
    per_image = _PER_IMAGE.get(_query_key(space, image))
    if per_image is None:
        return 1
    budget = QUERY_FLOATS if budget is None else int(budget)
    return max(1, min(int(batch_size), budget // max(per_image, 1)))


def note_query_size(space: PrivacySpace, image: torch.Tensor | np.ndarray, vectors: np.ndarray) -> None:
    """Record the query size of images like ``image`` from their ``(B, V, d)`` ``vectors`` (see
    :func:`images_per_batch`)."""
    _PER_IMAGE[_query_key(space, image)] = int(np.prod(np.asarray(vectors).shape[1:]))


def _query_key(space: PrivacySpace, image: torch.Tensor | np.ndarray) -> tuple:
    return (space.name, space.fingerprint(), tuple(np.shape(image)))


def distance_floor(space: PrivacySpace) -> float:
    """The least distance any candidate can reach from a training image in ``space`` (0 unless it says otherwise).

    A space that compares one slot of R at a time (:class:`~monai_synth.privacy.partial.PartSpace`) scores an exact
    match ``1 - 1 / sqrt(R)``, not 0: ratios of its distances must be taken above that floor to mean what they mean
    for the other spaces (see :func:`~monai_synth.privacy.calibration.log_distance_ratio`).
    """
    floor = float(getattr(space, "distance_floor", 0.0))
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"space {space.name!r} has a distance floor of {floor}; expected a value in [0, 1)")
    return floor


def space_distance(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pairwise distance ``1 - <u_i, v_j>`` between rows of two sets of unit vectors, clipped to [0, 2].

    A plain numpy reference (no FAISS) for tests and audits.
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    return np.clip(1.0 - u @ v.T, 0.0, 2.0)
