"""Where a picture was pasted into an image (2D or 3D): its straight seams, and the windows they bound.

The ``tiles`` space slides its windows in steps of an eighth of their side. A training image shrunk to 70% and pasted
between two steps is misregistered by up to a sixteenth of the window, and on phantoms whose patients share their
anatomy at the same place (PET slices: a pixel off is as far as another patient) no step is fine enough: windows slid
by a sixteenth caught a copy 3 px off a step and let one pass that sat 1 px off the new steps. A pasted picture leaves
a trace wherever its border crosses content: a straight line along which the image jumps, or along which its texture
changes (a picture resampled into a speckled image is smoother than its surroundings). Windows cut at those lines
are registered to the pixel, whatever the picture's position and, where both of its edges show, its size.

Two detectors, each a score per boundary between two adjacent lines (rows or columns) of the image:

* **runs**: the longest run of consecutive pixels along the boundary whose jump across it is a local maximum across
  the lines and above 2% of the image's range. A seam is straight and long; an organ's outline is curved, so its
  jumps line up over a few pixels only.
* **texture**: how much the mean and the roughness (absolute difference to the next pixel along the line) of the
  lines on either side differ, summed along the boundary, and the median factor by which the roughness changes
  along it. Under speckle, jumps are everywhere and runs break; a resampled picture is smoother than what it was
  pasted into, its background too.

An edge that shows only weakly (the image's own anatomy outranks it along its axis) is still counted in 2D: windows of
the seam sides at every position are also ranked by the strength of their four edges together, where an edge over
background adds nothing and the others rank the window. Where no edge shows (a picture pasted over background on
every side, as PET slices often are), no window is cut there; the regular windows remain.

Volumes alike: a boundary is a plane between two adjacent slices along an axis, read as one line row after row. A
volume shrunk to 70% and pasted one voxel from where a cube of the 3D ``tiles`` starts sat 2-4x farther from its source
than new patients' volumes from theirs (CT phantoms, 32^3); a cube cut at its seams registers it to the voxel. A
volume's faces often rank among the strongest planes along one axis only (the phantom's own anatomy outranks them on
the others), and three axes' seams combine into many more windows than two: a volume's windows are also **anchored**
on its strongest span between two seams, which gives the pasted volume's side, at every start of the other axes
where two planes that far apart score highest together.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

__all__ = ["seam_windows", "seams"]

JUMP_SHARE = 0.02
"""The least jump across a boundary, as a share of the image's range, that the ``runs`` detector counts."""

BAND = 3
"""Lines on each side of a boundary whose mean and roughness the ``texture`` detector compares."""


SAME_SIDE = 1.05
"""Windows whose sides agree within this factor (a picture shrunk alike along every axis) come before the others that
agree within 15% (one stretched along an axis); each group strongest seams first (least sum of the seams' ranks)."""

ANCHORS = 2
"""Spans between two seams (strongest first) that a volume's windows are anchored on: the strongest is not always the
pasted volume's (a CT phantom's body ends in planes too)."""

PAIRED_SHARE = 0.43
"""Share of a 2D image's seam windows that are ranked by all four of their edges together (:func:`_paired_windows`),
ahead of those combined from each axis's strongest seams (the ``tiles`` space's 224: 96 and up to 128). A picture's
edge that is weak along its axis (the image's own anatomy outranks it) still shows next to its other edges: on
phantoms at 64^2, 40 copies each, a training image shrunk to 65% and pasted at 0.37 of the margin had its exact window
among the windows for PET 29, MRI 33, CT 24 and US 40 copies, against 13, 9, 21 and 39 among 128 windows of the
strongest seams alone (``python benchmarks/seam_windows.py``; docs/benchmarks.md, thirty-third round)."""

MIN_ANCHOR = 0.5
"""Least side of an anchor (a span between two seams that a volume's windows are cut at, see :func:`seam_windows`), as
a share of its axis."""

LEVELS = 256
"""Intensity levels the image is put on, between its own 1st and 99th percentiles, before seams are looked for: the
release judges each image in two intensity views (its modality's range and its own robust range), and the windows of
both must be the same for the second view's search to ride on the first's (``search._ride``). On levels of the image's
own range, both views are the same array but for pixels clipped in one of them."""


def _levelled(image: torch.Tensor) -> torch.Tensor:
    """``(*spatial)``: the image's channels summed and put on :data:`LEVELS` levels between its own 1st and 99th
    percentiles (a flat image as it is)."""
    img = image.sum(dim=0).double()
    flat = img.flatten()
    lo = flat.kthvalue(max(1, int(0.01 * flat.numel()))).values
    hi = flat.kthvalue(max(1, int(0.99 * flat.numel()))).values
    if float(hi) > float(lo):
        img = torch.round((img.clamp(lo, hi) - lo) / (hi - lo) * (LEVELS - 1))
    return img


def _strongest(score: torch.Tensor, k: int, gap: int) -> list[int]:
    """Positions of the ``k`` highest positive scores at least ``gap`` apart, strongest first (none in a flat image)."""
    out: list[int] = []
    values = score.tolist()
    for i in torch.argsort(score, descending=True, stable=True).tolist():
        if not values[i] > 0:
            break
        if all(abs(i - j) >= gap for j in out):
            out.append(i)
            if len(out) == k:
                break
    return out


def _runs_score(lines: torch.Tensor) -> torch.Tensor:
    """Per boundary ``b`` (between lines ``b - 1`` and ``b``, index ``b - 1``): the longest run of jumps that are local
    maxima across the lines and above :data:`JUMP_SHARE` of the range, ties broken by their share of all jumps."""
    jump = (lines[1:] - lines[:-1]).abs()
    padded = F.pad(jump[None, None], (0, 0, 1, 1))[0, 0]
    floor = JUMP_SHARE * float(lines.max() - lines.min())
    on = (jump > padded[:-2]) & (jump >= padded[2:]) & (jump > floor)
    count = torch.cumsum(on.to(torch.int64), dim=1)
    last_off = torch.cummax(torch.where(on, torch.zeros_like(count), count), dim=1).values
    longest = (count - last_off).max(dim=1).values.to(torch.float64)
    return longest + 1e-3 * (jump * on).sum(dim=1).double() / (float(jump.sum()) + 1e-12)


def _texture_score(lines: torch.Tensor) -> torch.Tensor:
    """Per boundary: the change of the lines' mean and roughness from the :data:`BAND` lines before it to those after,
    summed along it, and the median change of the log roughness along it (a smooth picture over noisy background
    changes the roughness by a similar factor all along its edge, where an organ's outline changes it at a few
    pixels), each relative to its mean over all boundaries; the factor weighs as much as both changes."""
    n = lines.shape[0]
    b = torch.arange(1, n)
    lo, hi = (b - BAND).clamp_min(0), (b + BAND).clamp_max(n)

    def sides(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = F.pad(torch.cumsum(values.double(), dim=0), (0, 0, 1, 0))
        return (c[b] - c[lo]) / (b - lo)[:, None], (c[hi] - c[b]) / (hi - b)[:, None]

    def relative(score: torch.Tensor) -> torch.Tensor:
        return score / (score.mean() + 1e-12)

    rough = (lines[:, 1:] - lines[:, :-1]).abs()
    mean_before, mean_after = sides(lines)
    rough_before, rough_after = sides(rough)
    eps = 1e-3 * float(rough.mean()) + 1e-12
    ratio = (torch.log(rough_before + eps) - torch.log(rough_after + eps)).abs().median(dim=1).values
    change = relative((mean_before - mean_after).abs().sum(dim=1)) + relative(
        (rough_before - rough_after).abs().sum(dim=1)
    )
    return relative(change) + relative(ratio)  # as much weight to the factor as to both changes


def seams(image: torch.Tensor, axis: int, per_detector: int = 2) -> list[int]:
    """Boundaries (``b``: between lines ``b - 1`` and ``b``) along spatial ``axis`` (2D: 0 rows, 1 columns) of a
    ``(C, *spatial)`` image where a pasted picture's edge may lie: the ``per_detector`` strongest of each detector,
    interleaved, strongest first. In a volume a "line" is a plane, read row after row."""
    return _seams(_levelled(image), axis, per_detector)


def _scores(levelled: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both detectors' scores of every boundary along ``axis`` (index ``b - 1`` for boundary ``b``)."""
    lines = levelled.movedim(axis, 0).reshape(levelled.shape[axis], -1)
    return _runs_score(lines), _texture_score(lines)


def _seams(levelled: torch.Tensor, axis: int, per_detector: int, scores: tuple | None = None) -> list[int]:
    """See :func:`seams`; ``scores``: the axis's :func:`_scores`, when already computed."""
    if min(levelled.shape) < 4:
        return []
    runs_score, texture_score = scores or _scores(levelled, axis)
    runs = _strongest(runs_score, per_detector, 1)
    texture = _strongest(texture_score, per_detector, 2)
    ranked = [p for pair in zip(runs, texture) for p in pair] + runs[len(texture) :] + texture[len(runs) :]
    return list(dict.fromkeys(p + 1 for p in ranked))


def _strength(scores: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``(n + 1,)``: how strongly each boundary ``b`` of an axis looks like a seam, both detectors each relative to its
    strongest boundary (an image's borders, 0 and ``n``, score 0). ``scores``: the axis's :func:`_scores`."""
    return sum(F.pad(score / score.max().clamp_min(1e-12), (1, 1)) for score in scores)


def _pair_scores(strength: torch.Tensor, length: int) -> torch.Tensor:
    """Per start ``s`` of a window of ``length``: the strength of its two boundaries ``s`` and ``s + length``."""
    n = len(strength) - 1
    return strength[: n - length + 1] + strength[length:]


def _paired_starts(scores: tuple[torch.Tensor, torch.Tensor], length: int) -> list[int]:
    """Every start ``s`` along ``axis`` of a window of ``length``, those whose boundaries ``s`` and ``s + length``
    together score highest first (both detectors, each relative to its strongest boundary; an image's border scores
    0): the picture's place along an axis whose seams are too weak to rank among the image's strongest alone, once
    another axis has shown its side. ``scores``: the axis's :func:`_scores`."""
    n = len(scores[0]) + 1
    if length >= n:
        return [0] if length == n else []
    return torch.argsort(_pair_scores(_strength(scores), length), descending=True, stable=True).tolist()


def _paired_windows(scores: list[tuple], shape: tuple[int, ...], sides: list[int], limit: int) -> list[tuple]:
    """Up to ``limit`` square windows ``((start, side), (start, side))`` of a 2D image, of every side in ``sides`` at
    every position, those whose four edges together are strongest first (:func:`_strength`; ties: larger sides, then
    earlier starts; none whose edges all score 0). A pasted picture's edge over background scores 0 and its other edges
    still rank it; an edge that shows only weakly is counted instead of being left out with the axis's fifth-strongest
    seam."""
    strength = [_strength(s) for s in scores]
    ranked: list[tuple[float, int, int, int]] = []
    for rank, side in enumerate(sides):
        if side > min(shape):
            continue
        rows, cols = (_pair_scores(f, side) for f in strength)
        total = (rows[:, None] + cols[None, :]).flatten()
        keep = torch.argsort(total, descending=True, stable=True)[:limit]
        for i, value in zip(keep.tolist(), total[keep].tolist()):
            if value > 0:
                ranked.append((-value, rank, i // len(cols), i % len(cols)))
    ranked.sort()
    return [((r, sides[k]), (c, sides[k])) for _, k, r, c in ranked[:limit]]


def _anchored(scores: list[tuple], anchors: list[tuple[int, int, int, int]]) -> list[tuple]:
    """Windows ``((start, length), ...)`` of anchors ``(rank, axis, start, length)`` (spans between two seams: the
    picture's side): the span on its axis and, on every other axis, the same length at every start; the best paired
    starts (:func:`_paired_starts`) first (least sum of their places), the anchors taken in turn at each sum."""
    out = []
    for k, (_, axis, start, length) in enumerate(anchors):
        per_axis = [
            [(0, start)] if a == axis else list(enumerate(_paired_starts(scores[a], length)))
            for a in range(len(scores))
        ]
        out += [(sum(p for p, _ in w), k, tuple((s, length) for _, s in w)) for w in itertools.product(*per_axis)]
    return [w for _, _, w in sorted(out)]


def seam_windows(
    image: torch.Tensor, scales: tuple[float, ...], limit: int, per_detector: int = 2
) -> list[tuple[slice, ...]]:
    """At most ``limit`` windows of a ``(C, *spatial)`` image (2D or 3D) bounded by its seams, those of the strongest
    seams first.

    Along each axis a window spans two seams (between 0.3 and 0.9 of the axis apart) or starts or ends at one with a
    side of ``scales`` times the image's shortest side; a window combines such spans of every axis whose lengths agree
    within 15% (a pasted picture keeps its proportions), those within :data:`SAME_SIDE` first. 2D images: a share
    :data:`PAIRED_SHARE` of the windows, of the ``scales`` sides at every position ranked by their four edges together
    (:func:`_paired_windows`), ahead of the others. Volumes: up to half of
    the windows are anchored on the :data:`ANCHORS` strongest spans between two seams of at least :data:`MIN_ANCHOR`
    of their axis (:func:`_anchored`), ahead of the others. CT phantoms shrunk to 70% and pasted 2 voxels off the
    cubes' steps: the exact cube was among 192 windows for 19 of 20 copies with two anchors, 13 with one, and among
    128 windows without anchors for 9.
    """
    shape = image.shape[1:]
    levelled = _levelled(image)
    spans: list[list[tuple[int, int, int]]] = []  # per axis: (rank, start, length)
    between: list[tuple[int, int, int, int]] = []  # spans between two seams: (rank, axis, start, length)
    if min(shape) < 4:
        return []
    scores = [_scores(levelled, axis) for axis in range(len(shape))]
    sides = sorted({max(2, int(round(scale * min(shape)))) for scale in scales}, reverse=True)
    for axis, n in enumerate(shape):
        found = _seams(levelled, axis, per_detector, scores[axis])
        out: dict[tuple[int, int], int] = {}
        for rank, b in enumerate(found):
            for side in sides:
                for start in (b, b - side):
                    if 0 <= start <= n - side:
                        out.setdefault((start, side), rank)
            for rank2, b2 in enumerate(found):
                if 0.3 * n <= b2 - b <= 0.9 * n:
                    out.setdefault((b, b2 - b), max(rank, rank2))
                    if b2 - b >= MIN_ANCHOR * n:
                        between.append((max(rank, rank2), axis, b, b2 - b))
        spans.append(sorted((r, s, m) for (s, m), r in out.items()))
    if len(shape) > 2:
        first = _anchored(scores, sorted(between)[:ANCHORS])[: limit // 2]
    else:
        first = _paired_windows(scores, shape, sides, int(PAIRED_SHARE * limit))
    combined = [(0, ())]  # (rank, spans so far), axis by axis; spans that cannot agree are dropped as they come
    for axis_spans in spans:
        combined = [
            (r + rank, (*chosen, (start, length)))
            for r, chosen in combined
            for rank, start, length in axis_spans
            if all(0.85 <= m / length <= 1 / 0.85 for _, m in chosen)
        ]

    def order(c: tuple[int, tuple]) -> tuple[bool, int]:
        lengths = [m for _, m in c[1]]
        return max(lengths) > SAME_SIDE * min(lengths), c[0]

    combined.sort(key=order)
    kept = first + [chosen for _, chosen in combined]
    kept = list(dict.fromkeys(kept))[:limit]  # as (start, length) pairs: slices hash from Python 3.12 only
    return [tuple(slice(a, a + m) for a, m in chosen) for chosen in kept]
