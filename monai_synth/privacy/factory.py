"""Privacy spaces by name: what ``--spaces`` / ``privacy_spaces`` mean, and the default set a candidate must pass.

One place that turns a command-line or config name (``pixel``, ``pixel:flip,shift``, ``ranks``, ``parts``, ``crops``,
``tiles``, ``inset``, ``halves``, ``texture``, ``deblur``, ``disc``, ``ball``, ``coarse``, ``aligned``, ``embedding``)
into a configured space, shared by ``monai-synth guard`` and the bundle's release, so both judge with the same spaces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from monai_synth.privacy.aligned import AlignedSpace
from monai_synth.privacy.ball import BallSpace
from monai_synth.privacy.deblur import DeblurSpace
from monai_synth.privacy.disc import DiscSpace
from monai_synth.privacy.partial import PartSpace, TileSpace
from monai_synth.privacy.principal import fit_principal
from monai_synth.privacy.ranks import LocalRankSpace, RankSpace
from monai_synth.privacy.spaces import PixelSpace, PrivacySpace
from monai_synth.privacy.texture import TextureSpace

__all__ = [
    "DEFAULT_SPACES",
    "PRINCIPAL_DIRECTIONS",
    "THREE_D_ONLY",
    "TWO_D_ONLY",
    "build_spaces",
    "make_space",
    "space_name",
]

logger = logging.getLogger(__name__)


def space_name(spec: str) -> str:
    """The kind of privacy space a command-line spec names (``"pixel:flip,shift"`` -> ``"pixel"``)."""
    return spec.partition(":")[0].strip().lower()


DEFAULT_SPACES = (
    "pixel", "ranks", "localranks", "parts", "crops", "tiles", "inset", "halves", "texture", "deblur", "disc", "ball",
    "coarse", "aligned", "embedding",
)  # fmt: skip
"""What a candidate must pass by default: whole-image pixel correlation under the geometric and intensity changes a
person would still call the same image, the same on each image's intensity ranks (a copy under any monotone intensity
curve, such as histogram equalisation), the same on each pixel's rank among its neighbours (a copy under a curve that
differs from part to part: each part equalised on its own, a gain field, a faint overlay), aligned parts, crops of
training images, windows at every scale (those of 0.8 of the side in 2D with their own threshold, ``inset``), the halves
of training images (a half, quadrant or, in 3D, octant of an image blown up to the whole), the fine texture of the image
(a copy under strong noise such as speckle), the image sharpened (a blurred or pixelated copy, whose detail the
sharpening brings back), the central disc of a 2D image under fine rotations and zooms (a copy rotated by up to 30
degrees, also cropped and noised; left out for volumes, see :data:`TWO_D_ONLY`), its 3D counterpart the inscribed
``ball`` of a volume under fine rotations and moves about each axis and the ``coarse`` sharpened volume on an 8-cell
grid (a volume pixelated to an eighth of its side; both left out for 2D images, see :data:`THREE_D_ONLY`), the
``aligned`` image, each nearest training image registered onto the candidate by an affine fit (a copy moved, turned,
zoomed or mirrored by amounts between the other spaces' fixed steps; 2D), and the learned copy-detection /
re-identification ``embedding``, trained on the training images themselves when no weights are given (minutes on a CPU
for a few hundred images; pass ``--embedding-weights`` to reuse them). A space that collapsed in training is refused at
calibration, never certified."""

PRINCIPAL_DIRECTIONS = {("pixel", 2): 32}
"""Spaces (name, dimensionality) that :func:`build_spaces` compares on this many leading principal directions of the
training images' vectors (:mod:`monai_synth.privacy.principal`): the 2D pixel space on 32 of its 256 values. PET
slices noised by 5-10% of the range came from 1.3-2.1x new patients' 1% quantile of the space to 0.4-0.7x, most other
copies closer too, and the search is 8x shorter (``docs/benchmarks.md``)."""

TWO_D_ONLY = frozenset({"disc", "aligned", "inset"})
"""Spaces that judge 2D images only. :func:`build_spaces` leaves them out for volumes (and says so), so one list of
spaces serves a bundle in 2D and 3D; the ``ball`` space rotates volumes about each axis instead. Asked for by
:func:`make_space` with ``spatial_dims=3``, they raise."""

THREE_D_ONLY = frozenset({"ball", "coarse"})
"""Spaces that judge volumes only. :func:`build_spaces` leaves them out for 2D images (and says so); asked for by
:func:`make_space` with ``spatial_dims=2``, they raise."""

_PIXEL_DEFAULTS = {
    2: {"invariances": ("flip", "transpose", "shift", "zoom", "invert"), "max_shift": 2, "wrap_shift": 4,
        "zooms": (0.7, 0.8, 0.9, 1.1, 1.25, 1.4), "gammas": (0.5, 0.7, 1.4, 2.0), "median": 3,
        "shears": (-0.2, -0.1, 0.1, 0.2), "stretches": (0.8, 0.9, 1.1, 1.25)},
    3: {"invariances": ("flip", "transpose", "shift", "zoom", "rotate", "invert"), "max_shift": 2,
        "zooms": (0.8, 1.25), "rotations": (-25.0, -20.0, -15.0, -10.0, -5.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "plane_zooms": (0.8, 0.85, 0.9, 0.95, 1.05, 1.1, 1.15, 1.2, 1.25), "gammas": (0.5, 0.7, 1.4, 2.0),
        "median": 3, "stretches": (0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 1.1, 1.2, 1.3, 1.4)},
}  # fmt: skip


_SLABS = (0.6, 0.7, 0.8)
"""Fractions of one axis the 2D ``halves`` space also holds (see :class:`~monai_synth.privacy.partial.PartSpace`).

PET slices tell new patients apart only narrowly on the slot grid: a slab of 0.8 alone held copies cut to 0.75-0.82
of the axis and missed those cut to 0.7 or 0.85. So the candidate is also stretched by :data:`_SLAB_STRETCHES` about
each slab's anchor: copies cut to 0.58-0.88 of an axis (centre or either end) then sat at 0.06-0.58 of the nearest
new patient's distance above the floor (20 training and 20 new PET slices at 64^2). No slab of 0.9: on the slot grid
it is nearly the whole slice, where PET patients look alike, and with it 6 of 60 new patients' slices fell below the
holdout's 1% quantile of this space (1 of 60 without it). A copy cut by a tenth is left to the pixel space's
stretches, which take it along an axis whose ends are background but only 2 of 4 along the PET cranio-caudal axis."""

_MOVED_SLABS = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
"""Fractions of one axis of the 3D ``halves`` space's slabs. At either end, against the candidate's slab at the other
end: a volume moved by 0.1-0.4 of its side along one axis (CT and PET volumes moved by a quarter of the side passed
the whole 3D gate). Centred, against the whole candidate stretched by :data:`_CENTRE_SLAB_STRETCHES`: a volume whose
central 0.6-0.9 of one axis was stretched back to the whole (CT volumes cut to 0.7 of their first axis, whose ends hold
the anatomy that dominates their correlation, passed the whole 3D gate 2 of 2; the pixel space's stretches cannot bring
the cut part back). On CT 32^3 phantoms copies cut to 0.6-0.9 then sit at 0.0-0.3 of the nearest new patient's
distance above the floor at the slabs' fractions, and at 0.5-1.2 between them (0.72, 0.78, 0.88)."""

_TILE_SCALES = (0.7, 0.6, 0.5, 1.0 / 3.0)
"""Window sides of the 2D ``tiles`` space, as fractions of the candidate's side: a picture in a picture (0.7, 0.6),
a mosaic tile or one of a pair (0.5), a canvas's third. A training image shrunk to 70% and pasted into the centre of an
unseen image passed the whole PET gate 3 of 3; in windows of 0.7 such copies sit at 0.06-0.16 of the new patients'
1% quantile of this space (1.1-2.0 without them; 20 training and 60 new patients' slices at 64^2, ultrasound, CT,
MRI, PET), and that quantile moved by 1-20% (PET 0.114 -> 0.079). 0.6 left the quantile as it was (ultrasound 0.152 ->
0.134, CT, MRI and PET within 2%). Windows of 0.8 are the ``inset`` space's (:data:`_INSET_SCALES`): here they would
lower the quantile for every window. Position matters as much as size: a copy shrunk to 60% and pasted 5 px from the
corner, between two window positions a quarter of the side apart, sat at 0.4-1.8x that quantile; windows of 0.6 and 0.7
slid by an eighth of their side (:data:`_TILE_FINE_SCALES`, 252 windows instead of 168) hold it at 0.08-0.21, the
quantile moved by 0-12%."""

_TILE_FINE_SCALES = (0.7, 0.6)
"""The tile scales slid by an eighth of their side instead of a quarter, in 2D and 3D (:data:`_TILE_SCALES_3D`). Cheap
in 2D, where windows are few; in 3D they take the cubes from 350 to 889 per volume."""

_TILE_SEAM_WINDOWS = 224
"""Windows per 2D image that the ``tiles`` space also cuts at the image's straight seams
(:mod:`monai_synth.privacy.seams`), at the sides of :data:`_TILE_SEAM_SCALES` or between two seams. A training image
shrunk to 70% and pasted 3 px off the window steps (``pip70_off``) passed the whole gate 10 of 10 in PET and CT and 8 of
10 in MRI (US: ``tiles`` alone 10 of 10): no step is fine enough where a pixel off is as far as another patient. With
128 windows of each axis's strongest seams ``tiles`` alone released it 1, 0, 1 and 3 of 10 (PET, US, CT, MRI), where
the picture's seams show (twenty-ninth round). 96 of the 224 are ranked by their four edges together
(:data:`~monai_synth.privacy.seams.PAIRED_SHARE`), which finds a picture whose edges are weak along their axes: with
them ``tiles`` alone released a training image shrunk to 65% and pasted at 0.37 of the margin (``pip65_odd``) in PET
2 of 20 (11 before) and ``pip70_off`` in MRI 0 of 20 (6); the rest keep every window the 128 held (docs/benchmarks.md,
thirty-third round)."""

_TILE_SEAM_SCALES = (0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
"""Sides of the seam windows that start or end at one seam (the other edge hidden, e.g. over background), every 0.05: a
picture shrunk to 65% is 5% off a window of 0.7 or 0.6, as far as a pixel off its position."""

_TILE_SCALES_3D = (0.8, 0.7, 0.6, 0.5)
"""Window sides of the 3D ``tiles`` space's cubes (or windows of the training volumes' shape), as fractions of the
candidate's side; 0.7 and 0.6 slid by an eighth of their side (:data:`_TILE_FINE_SCALES`), as in 2D: 889 cubes per
volume instead of 161. With cubes of 0.8 and 0.5 only, a volume shrunk to 70% and pasted into the centre of an unseen
patient's volume passed the whole 3D gate, CT and PET, in every round since the eighteenth (3.0-5.4x this space's
threshold), and one shrunk to 60% and pasted off-centre sat at 2.1-2.4x: the nearest cube was a tenth of its side
away. With these cubes the space alone released neither of 4 (CT 32^3 phantoms, 12 training patients), unseen volumes
24 of 24. A copy pasted a voxel from every cube's start in each axis is still misregistered (see docs/benchmarks.md,
twenty-eighth round): :data:`_TILE_SEAM_WINDOWS_3D`."""

_TILE_SEAM_WINDOWS_3D = 192
"""Cubes per volume that the 3D ``tiles`` space also cuts at the volume's seam planes
(:mod:`monai_synth.privacy.seams`), sides of :data:`_TILE_SEAM_SCALES` or between two seams, half of them anchored on a span between two seams. A CT volume
shrunk to 70% and pasted 2 voxels off the cubes' steps passed ``tiles`` alone 6 of 6 at 2.9-3.9x its threshold; these
cubes hold the copy's exact cube for 19 of 20 such CT copies (16 PET, 13 MRI) and cost 3,072 more variants per volume
(15,466 before; docs/benchmarks.md, thirtieth round)."""

_INSET_SCALES = (0.8,)
"""Window sides of the 2D ``inset`` space (slid by an eighth of their side): a training image shrunk to 80% inside
another. In such windows another patient's body outline comes close to a training slice (added to ``tiles``, they moved
its new patients' 1% quantile CT 0.122 -> 0.041, MRI 0.119 -> 0.044, PET 0.079 -> 0.052), but such a copy comes closer
still: 0.18-0.40 of that quantile in CT, MRI and PET, 0.96-1.37 of the ``tiles`` quantile without them. It passed the
whole gate (5 copies) in PET 3 times and in CT 4 times without these windows. In the ``tiles`` space they lowered its
threshold for every window, and a canvas of three exact CT slices squeezed to the model size then passed 2 of 5 (0
without them): hence a space of their own, with its own threshold."""

_CORNERS = (0.6, 0.7, 0.8, 0.9)
"""Fractions of every axis of the 3D ``halves`` space's corner windows (at each of the 8 corners), the candidate also
magnified by :data:`_CORNER_STRETCHES` about each corner: a volume cropped at a corner and resized back, which no other
3D slot holds (the crops are centred, the pixel space's zooms are about the centre, a slab cuts one axis); CT volumes
cropped to 85% at a corner passed the whole 3D gate 2 of 2. On CT 32^3 phantoms, copies cropped to 0.55-0.93 at
any corner then sit at 0.14-0.52 of the nearest new patient's distance above the floor (5-20x without the corners);
two corner fractions held only about +-0.015 of each."""

_CORNER_STRETCHES = (0.93, 0.97, 1.03, 1.07)
"""Magnifications of the unturned candidate about each corner, tried in that corner's slots."""

_CENTRE_SLAB_STRETCHES = (0.97, 1.03)
"""Magnifications of the whole candidate along a 3D centred slab's axis, tried in its slot (fewer than 2D's
:data:`_SLAB_STRETCHES`: each is a variant of a 61,952-value row per slab)."""

_SLAB_STRETCHES = (0.94, 0.97, 1.03, 1.06)
"""Magnifications of the unturned candidate along a slab's axis, about the slab's anchor, tried in its slot."""


def make_space(
    spec: str,
    spatial_dims: int,
    spatial_size: Sequence[int],
    embedding_weights: str | None = None,
    data_fingerprint: str | None = None,
) -> PrivacySpace:
    """A privacy space from its command-line name.

    ``pixel`` = :class:`PixelSpace` on a 16-cell grid, invariant (2D) to mirror flips, transposes / rot90, shifts
    of up to 2 cells (12%; on a background, wrapped around, 4 cells), zooms 0.7-1.4, intensity inversion, gammas
    0.5, 0.7, 1.4 and 2 and a 3-wide median filter with every shift (salt and pepper noise), shears of +-0.1 and
    +-0.2 and stretches of 0.8-1.25 along each axis, no rotations: the ``disc`` space rotates 2D copies, with fewer corners lost, at finer
    angles and for fewer query floats (3D: shifts
    of up to 2 cells, zooms 0.8-1.25 and inversion, the mirror flips with shifts of up to 1 cell, and on their own the
    90-degree rotations, axis swaps, rotations of 5-25 degrees about each axis and zooms of 0.8-1.25 in steps of 0.05
    within each plane and of the whole volume, stretches of 0.65-1.4 along each axis, gammas 0.5, 0.7, 1.4 and 2
    with every shift and with the mirror flips, and the median filter with every shift); ``pixel:none``,
    ``pixel:flip,shift`` etc. choose the invariances.
    ``ranks`` = :class:`~monai_synth.privacy.ranks.RankSpace` (the pixel space on each image's intensity ranks, on the
    16-cell grid, mirrored / transposed (2D) / inverted and moved by up to 2 cells, 1 in 3D: a copy under any monotone
    intensity curve, e.g. histogram-equalised PET slices, which sat 12x the pixel space's threshold from their sources).
    ``localranks`` = :class:`~monai_synth.privacy.ranks.LocalRankSpace` (the same on each pixel's rank among its 3 x 3
    (3 x 3 x 3) neighbours: a copy under a curve that differs from part to part, e.g. PET slices equalised per half of
    each axis, 19x the ``ranks`` space's new patients' 1% quantile from their sources and 0.5x here).
    ``parts`` = :class:`~monai_synth.privacy.partial.PartSpace` (aligned quadrants / octants and centre, and each of
    the candidate's quadrants / octants in every other one's place: a quarter of a training image pasted elsewhere),
    ``crops`` = the same class comparing crops of training images with the whole candidate (2D: and with the
    candidate's windows of the same size at the other corners, a copy moved along one axis or both; 3D: the candidate
    also turned back by 10 and 20 degrees either way and a quarter turn about each axis, a rotated copy cropped),
    ``tiles`` = :class:`~monai_synth.privacy.partial.TileSpace` (windows of the candidate at every position, 2D of
    0.7, 0.6, a half and a third of its side and the halves of each axis, see :data:`_TILE_SCALES`, and up to 224 cut
    at the image's straight seams, see :data:`_TILE_SEAM_WINDOWS`; in 3D of 0.8,
    0.7, 0.6 and 0.5 of the training volumes' shape, see :data:`_TILE_SCALES_3D`, spanning some axes whole and a
    half or a third of the others, and up to 192 cut at the volume's seam planes, see :data:`_TILE_SEAM_WINDOWS_3D`).
    ``inset`` = the same class with windows of 0.8 of the side only (2D; a training image shrunk to 80% inside
    another, see :data:`_INSET_SCALES`; the 3D ``tiles`` hold 0.8 already).
    ``halves`` = :class:`~monai_synth.privacy.partial.PartSpace` of kind ``"halves"`` (the half of each training image
    at either end of one axis, two or, in 3D, all three, compared with the whole candidate, mirrored / transposed (2D) /
    inverted: a half, a quadrant or an octant of an image resized to the whole; 2D: also the slab of 0.6-0.8 of one
    axis at its centre and either end, the candidate also stretched by up to 6% along that axis: a copy cut along one
    axis and stretched back, see :data:`_SLABS`; 3D: also the slab of 0.6-0.9 of one axis at either end against the
    candidate's slab at the other end, a volume moved along one axis, and the centred slab against the whole candidate,
    stretched by up to 3% along that axis, a volume cut along one axis and stretched back, see :data:`_MOVED_SLABS`;
    and the corner windows of 0.6-0.9 of every axis at each corner, the candidate also magnified by up to 7% about that
    corner, a volume cropped at a corner and resized back, see :data:`_CORNERS`).
    CT 32^3 phantoms: such quadrants and octants at r 0.998-0.999 with their source, new patients' volumes at most 0.979; ultrasound 64^2, a half of one
    axis stretched to the whole at r 0.999, new patients' images at most 0.83. Its specificity test refused new
    patients' 2D PET slices until the test measured a slot space's ratios above its floor (see
    :func:`~monai_synth.privacy.calibration.log_distance_ratio`).
    ``texture`` = :class:`~monai_synth.privacy.texture.TextureSpace` (the image minus its local mean on a 64-cell
    grid, 32 in 3D, mirrored / transposed / inverted); ``texture:box=3`` removes the mean of 3 cells instead of about
    a seventh of the grid, keeping each image's own noise grain rather than its anatomy's edges: PET slices of 64^2
    blended 70/30 with another sat at 0.58 of the new patients' 1% quantile with it, 1.33 without, but ultrasound
    copies blurred and noised at 1.03 instead of 0.83 (measured at 64^2 only; ``docs/benchmarks.md``).
    ``deblur`` = :class:`~monai_synth.privacy.deblur.DeblurSpace` (the query sharpened by an unsharp mask of 3 / 64
    of the side, amount 4, over all axes and along each axis alone, then on the 16-cell grid, mirrored / transposed /
    inverted and moved by one cell: a blurred, pixelated or motion-blurred copy; 3D: mirrored, not transposed, and
    also moved by half a voxel along every combination of axes: a copy blurred by a box of even width).
    ``disc`` = :class:`~monai_synth.privacy.disc.DiscSpace` (2D only: the central disc, radius 0.4 of the side, on a
    16-cell grid, the query rotated every 5 degrees to +-30, zoomed 0.8-1.25 in steps of 0.05, moved by up to 1.5 cells
    in half-cell steps at every angle, rotated by 35-45 degrees either way and moved by whole cells, mirrored /
    transposed / inverted: with the rot90 symmetries every angle is within 5 degrees of one it tries).
    ``aligned`` = :class:`~monai_synth.privacy.aligned.AlignedSpace` (2D only: images in their own canonical frame
    on a 32-cell grid, each principal axis scaled to its own spread, the query's frame also turned every 22.5 degrees,
    mirrored / transposed / inverted, and the 48 nearest training images fitted onto the candidate
    by an affine map, rotation to +-30 degrees, scale 0.67-1.5 per axis, shear to 0.25, move to a fifth of the side,
    coarsely, the best-fitting rows of 4 different patients at every level, compared where both fields of view
    reach: PET slices mirrored, rotated by 12 degrees, zoomed and moved, or stretched and sheared, sat at 0.2-0.6 of
    new patients' 1% quantile).
    ``ball`` = :class:`~monai_synth.privacy.ball.BallSpace` (3D only: the central ball, radius 0.4 of the side, on a
    16-cell grid, the query rotated about each axis every 5 degrees to +-30 and moved by up to 1.5 cells in
    half-cell steps within each rotation's plane, and by 35-45 degrees either way unmoved, mirrored / inverted).
    ``coarse`` = the ``deblur`` space on an 8-cell grid (3D only): a volume pixelated to an eighth of its side (8^3 of
    32^3: down 4x and up, or blocks of 4 voxels) lost the detail the 16-cell grid compares, and sharpening cannot bring
    it back; on the coarser grid the copy is whole again. CT 32^3 phantoms, 12 training patients: such copies at
    0.31-0.59 of the space's smallest distance to a new patient (1.9-3.9 in ``deblur``, beyond every other space); over
    200 holdout draws of the calibration benchmark, new patients' volumes refused 5.5% with it and without it.
    ``embedding`` = the learned :class:`~monai_synth.privacy.embedding.EmbeddingSpace` (needs its weights; with
    ``data_fingerprint``, weights trained on another training set are refused).

    The default pixel space compares every 2D query in 6,336 variants of 256 values (32 once :func:`build_spaces` puts
    it on the training images' principal directions, :data:`PRINCIPAL_DIRECTIONS`), the disc space in 12,928 of 124
    (3D pixel: 4,294 variants): fine for a gate over thousands of training images; see ``docs/benchmarks.md`` for its
    cost at larger indexes, where ``pixel:flip,shift`` plus ``embedding`` is the cheaper pair.
    """
    name, opts = space_name(spec), spec.partition(":")[2]
    _check_dimensionality(name, spatial_dims)
    grid = min(16, *spatial_size)
    if name == "pixel":
        kwargs = dict(_PIXEL_DEFAULTS[spatial_dims])
        if opts:
            kwargs["invariances"] = tuple(o for o in opts.split(",") if o and o != "none")
        if "shift" in kwargs["invariances"]:
            kwargs["max_shift"] = max(1, min(kwargs["max_shift"], grid // 2 - 1))
            kwargs["wrap_shift"] = max(kwargs["max_shift"], min(kwargs.get("wrap_shift") or 0, grid // 2 - 1))
        return PixelSpace(grid=grid, spatial_dims=spatial_dims, **kwargs)
    # in 3D the 48 axis permutations x flips would multiply the variants (and memory) by 6: flips only
    symmetry = ("flip", "transpose", "invert") if spatial_dims == 2 else ("flip", "invert")
    if name == "ranks":
        # shifts of up to 2 cells in 2D (a PET slice moved by 8 px), 1 in 3D
        shift = max(1, min(2 if spatial_dims == 2 else 1, grid // 2 - 1))
        return RankSpace(grid=grid, spatial_dims=spatial_dims, invariances=symmetry + ("shift",), max_shift=shift)
    if name == "localranks":
        shift = max(1, min(2 if spatial_dims == 2 else 1, grid // 2 - 1))
        return LocalRankSpace(grid=grid, spatial_dims=spatial_dims, invariances=symmetry + ("shift",), max_shift=shift)
    if name in ("parts", "crops"):
        kind = "regions" if name == "parts" else "crops"
        # 2D parts: a rotated copy's quadrants; 3D crops: a copy rotated, then cropped and resized back (every axis)
        rotated = (spatial_dims, kind) in ((2, "regions"), (3, "crops"))
        rotations = (-20.0, -10.0, 10.0, 20.0) if rotated else ()
        if (spatial_dims, kind) == (3, "crops"):
            # and a quarter turn about each axis (with the flips: every 90-degree rotation about one axis): CT volumes
            # turned so, then cropped to 80% and resized back, sat 5.8-6.2x the nearest new patient's distance from
            # their sources in the pixel space (which zooms a turned volume back with its lost faces replicated)
            rotations += (90.0,)
        return PartSpace(
            grid=grid - grid % 2,
            spatial_dims=spatial_dims,
            kind=kind,
            invariances=symmetry,
            rotations=rotations,
            moved=True,  # a quadrant (octant) pasted into another corner; 2D crops: a copy moved on a canvas
        )
    if name == "tiles":
        if spatial_dims == 2:
            return TileSpace(
                grid=grid,
                spatial_dims=2,
                scales=_TILE_SCALES,
                invariances=symmetry,
                fine_scales=_TILE_FINE_SCALES,
                seam_limit=_TILE_SEAM_WINDOWS,
                seam_scales=_TILE_SEAM_SCALES,
            )
        # 3D: windows of the training volumes' shape (a candidate larger than them, e.g. a canvas of whole volumes),
        # and windows spanning some axes whole and a half or third of the others (such a canvas squeezed to the model
        # size, or a mosaic)
        return TileSpace(
            grid=grid,
            spatial_dims=3,
            scales=_TILE_SCALES_3D,
            fine_scales=_TILE_FINE_SCALES,
            invariances=symmetry,
            reference=tuple(spatial_size),
            fractions=(0.5, 1.0 / 3.0),
            seam_limit=_TILE_SEAM_WINDOWS_3D,
            seam_scales=_TILE_SEAM_SCALES,
        )
    if name == "halves":
        # 2D: and the slabs of 0.6-0.8 of one axis (centre and either end), a copy cut along one axis and stretched
        # back; PET slices so cut along the cranio-caudal axis lose the brain or bladder that dominate their pixel
        # correlation, and 3 of 3 passed the whole gate without them
        if spatial_dims == 2:
            return PartSpace(
                grid=grid - grid % 2,
                spatial_dims=2,
                kind="halves",
                invariances=symmetry,
                slabs=_SLABS,
                slab_stretches=_SLAB_STRETCHES,
            )
        # volumes: the slabs at either end of each axis against the candidate's slab at the other end (a volume moved
        # along one axis; the 2D crops' corner windows catch a moved slice), the centred ones against the whole
        # candidate (a volume cut along one axis and stretched back)
        return PartSpace(
            grid=grid - grid % 2,
            spatial_dims=3,
            kind="halves",
            invariances=symmetry,
            slabs=_MOVED_SLABS,
            slab_stretches=_CENTRE_SLAB_STRETCHES,
            moved_slabs=True,
            corners=_CORNERS,
            corner_stretches=_CORNER_STRETCHES,
        )
    if name == "texture":
        fine = min(64 if spatial_dims == 2 else 32, *spatial_size)
        return TextureSpace(grid=fine, spatial_dims=spatial_dims, kernel=_texture_box(opts), invariances=symmetry)
    if name == "deblur":
        # volumes also moved by half a voxel: a box blur of even width moves a copy so (see DeblurSpace)
        return DeblurSpace(
            grid=grid,
            spatial_dims=spatial_dims,
            invariances=symmetry + ("shift",),
            max_shift=1,
            half_steps=spatial_dims == 3,
        )
    if name == "coarse":
        return DeblurSpace(
            grid=min(8, *spatial_size), spatial_dims=3, invariances=symmetry + ("shift",), max_shift=1, name="coarse"
        )
    if name == "inset":
        return TileSpace(
            grid=grid, spatial_dims=2, scales=_INSET_SCALES, invariances=symmetry, fine_scales=_INSET_SCALES,
            name="inset", halves=False,
        )  # fmt: skip
    if name == "aligned":
        # 32 cells, judged at a blur of half a cell: on 64 (judged unblurred) copies of PET, CT and MRI slices sat about
        # as far from their sources over new patients' 1% quantile, noised copies 2-3x farther, at 2.5x the cost
        return AlignedSpace(grid=min(32, *spatial_size), spatial_dims=spatial_dims, invariances=symmetry)
    if name == "disc":
        return DiscSpace(grid=grid)
    if name == "ball":
        return BallSpace(grid=grid)
    if name == "embedding":
        if not embedding_weights:
            raise ValueError(
                "the embedding space needs --embedding-weights (from `monai-synth train-embedding` on the same training "
                "datalist), or leave them out and the guard trains it on the training images"
            )
        from monai_synth.privacy.embedding import EmbeddingSpace

        return EmbeddingSpace.from_weights(embedding_weights, expected_data_fingerprint=data_fingerprint)
    raise ValueError(
        f"unknown privacy space {spec!r}; use pixel[:none|flip,shift,...], ranks, localranks, parts, crops, tiles, inset, "
        "halves, texture[:box=N], deblur, disc, ball, coarse, aligned and/or embedding"
    )


def _texture_box(opts: str) -> int | None:
    """The ``box=N`` option of a ``texture`` spec: the side, in grid cells, of the local mean the space removes (None:
    its default, about a seventh of the grid)."""
    box = None
    for opt in filter(None, (o.strip() for o in opts.split(","))):
        key, _, value = opt.partition("=")
        if key.strip() != "box" or not value.strip().isdigit():
            raise ValueError(
                f"the texture space takes one option, box=N (an odd number of grid cells, e.g. texture:box=3), "
                f"got {opt!r}"
            )
        box = int(value)
    return box


def _check_dimensionality(name: str, spatial_dims: int) -> None:
    """Refuse a space of :data:`TWO_D_ONLY` / :data:`THREE_D_ONLY` asked for images of the other dimensionality."""
    only = 2 if name in TWO_D_ONLY else 3 if name in THREE_D_ONLY else None
    if only is None or spatial_dims == only:
        return
    kind, other = ("2D images", "volumes") if only == 2 else ("volumes", "2D images")
    counterpart = {"disc": ", the ball space rotates them about each axis", "ball": ", the disc space rotates them"}
    raise ValueError(
        f"the {name} space judges {kind}, not {other} (spatial_dims={spatial_dims}); leave it out for {other} "
        f"(build_spaces does){counterpart.get(name, '')}"
    )


def build_spaces(
    specs: Sequence[str],
    spatial_dims: int,
    spatial_size: Sequence[int],
    train_images: torch.Tensor | Iterable[torch.Tensor],
    train_patient_ids: Sequence[str],
    data_fingerprint: str,
    embedding_weights: str | None = None,
    embedding_epochs: int | None = None,
    seed: int = 0,
    embedding_out: str | os.PathLike | None = None,
) -> list[PrivacySpace]:
    """The spaces ``specs`` name, as :func:`make_space` builds them; an ``embedding`` without weights is trained here.

    Trained on exactly these training images (model space, one batch or batches), so it knows every training patient,
    and saved to ``embedding_out`` if given. The one way ``monai-synth guard``, the bundle's release and the attack
    benchmark get their spaces. Spaces in :data:`TWO_D_ONLY` are left out for volumes, those in :data:`THREE_D_ONLY` for
    2D images.
    """
    built: list[PrivacySpace] = []
    for spec in specs:
        if spatial_dims != 2 and space_name(spec) in TWO_D_ONLY:
            logger.info(f"privacy space {spec!r} judges 2D images only: left out for these volumes")
            continue
        if spatial_dims != 3 and space_name(spec) in THREE_D_ONLY:
            logger.info(f"privacy space {spec!r} judges volumes only: left out for these 2D images")
            continue
        k = PRINCIPAL_DIRECTIONS.get((space_name(spec), spatial_dims))
        if k:
            space = make_space(spec, spatial_dims, spatial_size, embedding_weights, data_fingerprint)
            built.append(fit_principal(space, train_images, k))
            continue
        if space_name(spec) != "embedding" or embedding_weights:
            built.append(make_space(spec, spatial_dims, spatial_size, embedding_weights, data_fingerprint))
            continue
        from monai_synth.privacy.embedding import train_embedding

        images = train_images if torch.is_tensor(train_images) else torch.cat(list(train_images))
        logger.info(f"training the re-identification embedding on {len(train_patient_ids)} training images")
        kwargs = {} if embedding_epochs is None else {"epochs": int(embedding_epochs)}
        space = train_embedding(
            images,
            list(train_patient_ids),
            spatial_dims=spatial_dims,
            seed=int(seed),
            data_fingerprint=data_fingerprint,
            **kwargs,
        )
        if embedding_out:
            Path(embedding_out).parent.mkdir(parents=True, exist_ok=True)
            space.save(embedding_out)
        built.append(space)
    return built
