"""Exact nearest training row of each query over all its variants, with fewer products than every variant x every row.

The safeguard asks one question per candidate and space: the largest inner product between any query variant
(flips, shifts, zooms, rotations, signs, windows, slots) and any training row. Computed as a dense product, that is
``V x N`` similarities of ``d`` multiply-adds each (the 2D crops space: 720 variants of 2,880 values). Exact
shortcuts cut it without changing the answer:

* **Signs and duplicates.** A space invariant to intensity inversion queries ``v`` and ``-v``; their inner products
  with a row are exact negatives (IEEE rounding is symmetric), so one product gives both: ``|<v, x>|``, taken from
  one min/max pass. Identical variants (a constant window repeated) are computed once.
* **Slots.** A variant that is zero outside some columns (the ``parts`` and ``crops`` spaces hold one region in its
  slot, zeros elsewhere) is multiplied with those columns only: adding exact zeros changes no sum.
* **A bfloat16 screen with a proven error bound.** The variants of spaces with many per query (pixel, tiles, disc,
  and the parts and crops slots on their columns) are first multiplied in bfloat16 (about 3x faster than float32 on
  a CPU with AVX-512 BF16, more with AMX; skipped on CPUs without native bfloat16, :data:`BF16_SCREEN`, and for a
  few variants per query). For unit vectors the screened value is within :data:`SCREEN` of the true similarity (see
  there), so a (variant, row) pair whose screened ``|similarity|`` plus :data:`SCREEN` is below the best exact
  similarity found so far cannot be the nearest pair; every other pair is computed in float32 (few: the pairs within
  a few hundredths of the best).
* **Orbits of flips.** A 2D space that tries every variant mirrored along each axis (``tiles``, ``disc``, the pixel
  space's family on its grid) states which variants are one vector flipped (its ``orbit_layout``); such an orbit of 4
  is screened once, by a bound on all its members' ``|similarity|`` from products of its parity components
  (:mod:`~monai_synth.privacy.orbits`): the products of ``d`` terms per member become ``d / 4`` per member, and the
  members are computed exactly only where the bound reaches the best (:func:`_screen_orbits`; from
  :data:`_ORBIT_MIN_ROWS` rows).
* **Riders.** A query whose variants each lie within a small gap of the previous query's (a release judges every
  image in two intensity views) is not multiplied: the previous query's products bound its similarities to within
  that gap, and only the pairs they cannot rule out are computed for it (:func:`_ride`).

Where the time goes once the products are few (measured in ``docs/benchmarks.md``, "Safeguard scaling"): fresh
output tensors (page faults), short blocks of rows, reductions in bfloat16, and sorting the variants to fold their
signs each cost as much as the products; the loop below reuses its buffers, keeps blocks of :data:`_MIN_ROWS` rows,
reduces as int16 and folds signs from the halves the spaces return.

Not used, measured in ``docs/benchmarks.md``: a two-stage search that bounds each similarity through a projection on
the rows' principal directions (Cauchy-Schwarz on the residuals) is exact too, but the per-pair bound test costs
about as much on a CPU as the 256-term product it would save, and on phantom rows it rules out too few whole rows.

Exact ties and float32 rounding: every pair within :data:`REFINE` of the best float32 similarity is recomputed in
float64, and the largest (then the lowest row) is returned, so the dense and the fast path return the same row and
the same distance, bit for bit, whatever the order their float32 sums were taken in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from monai_synth.privacy.orbits import FlipGroup

__all__ = ["REFINE", "SCREEN", "nearest_rows", "rows_at"]

REFINE = 1e-3
"""Pairs whose float32 similarity is within this of the best are recomputed in float64. It covers the float32 error
of a ``d``-term dot product of unit vectors, at most about ``d * 2**-24`` (2.4e-4 for d = 4096)."""

SCREEN = 0.02
"""Bound on ``|bf16 screen - true similarity|`` for unit vectors, with room to spare. Rounding each input to bfloat16
(8 significant bits, unit roundoff ``u = 2**-8``) changes ``sum q_i x_i`` by at most ``(2u + u**2) sum |q_i x_i| <=
0.0079`` (Cauchy-Schwarz: ``sum |q_i x_i| <= |q| |x| = 1``); the products of two bfloat16 values are exact in the
float32 accumulator, whose rounding adds at most ``d * 2**-24`` (2.4e-4 for d = 4096); rounding the result to
bfloat16 adds at most ``u * 1.01 <= 0.004``. Total <= 0.0122."""


def _bf16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX); without it the screen would be slower
    than the float32 product it replaces, so it is skipped (the answers are the same either way)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


BF16_SCREEN = _bf16_is_fast()
"""Screen dense variants in bfloat16 first (set at import from the CPU's instruction set; tests switch it)."""

_BLOCK_FLOATS = 1 << 24  # similarities held at once: 64 MiB of float32, 32 MiB of bfloat16
_MIN_ROWS = 1024  # rows per block at least: the vectors are cut into chunks instead (a batch of 16 candidates' disc
# variants once made blocks of 81 rows, whose per-block work cost more than their products)
_EXACT_FLOATS = 1 << 20  # float32 similarities held at once where there is no screen (a CPU without bfloat16): 4 MiB,
# so the product's output and the passes over it stay in cache (pixel space at 1e5 rows: 0.93-1.02 CPU-s per candidate
# against 1.34-1.46 with blocks of 64 MiB; a product of 32 values per pair is bound by writing its output)
_EXACT_ROWS = 256  # rows per such block at least: chunks of 4,096 vectors
_SLOT_ROWS = 2048  # rows per block of a screened slot group at most: its bfloat16 copies of the block stay in cache
# (blocks of 37,000 rows of the crops space, 215 MiB per copy, made the copies cost 1.6x the products)
_SCREEN_MIN_PER_QUERY = 64  # fewer vectors per query (texture: 8, embedding: 14) are multiplied in float32 at once:
# the screen's bfloat16 copy of the rows and its one exact pass per query cost more than it saves (texture at 1e5 rows:
# 1.26 CPU-s per candidate screened, 0.97 not)
_DENSE_PAIRS = 0.25  # when more of a block's pairs survive the screen than this, its survivors are multiplied densely
_DENSE_ORBIT_PAIRS = 0.02  # an orbit's survivors are computed densely above this share: a pair computed on its own
# gathers both vectors (each orbit's four members), many times the cost per pair of a product of whole blocks
_ORBIT_MIN_ROWS = 4096  # fewer rows: the products are cheap next to finding the orbits (a 3D tiles query of 18,538
# variants of 4,096 values against 200 rows: 0.9 s without orbits, 2.6 s with them)
_ORBIT_PART = 256  # orbits screened at once: their (F, 256, 1024) screen stays in cache (float32 without bfloat16:
# disc at 1e5 rows 1.49-1.99 CPU-s per candidate against 1.81-2.20 with 1,024; with AVX-512 BF16 1,024 orbits ran at
# 1.28 ns per orbit and row against 1.65 for 4,096, measured with 32 values per component)
_ORBIT_ROWS = 1024  # rows per block of the orbit screen
_ORBIT_SAMPLE = 8  # the orbits' first pass reads every 8th block of rows: enough for bests near their final values
_ORBIT_SEEDS = 4  # orbits per query computed exactly where their screen peaked, before the orbits' second pass
_RIDE_GAP = 0.15  # a query rides on the previous one's products when none of its variants lies farther from that
# query's same variant (the two intensity views of one image: 0.00-0.12 apart in every default 2D space)


class _SlotVectors:
    """Vectors that are zero outside their slot's columns, kept on those columns only: ``values`` ``(n, c)`` and the
    columns ``cols`` ``(slots, c)`` of each vector's slot ``slot`` ``(n,)``. Indexing returns dense ``(k, d)`` float32
    copies of the few vectors asked for (the survivors of the screen, the pairs recomputed in float64), so the slot
    spaces' ``(variants, d)`` queries are never copied in full: with the 3D ``halves`` space's corner windows (1,688
    variants of 61,952 values per volume, mostly zeros) the dense copies took 0.67 GiB more per batch of 2 volumes."""

    def __init__(self, values: np.ndarray, cols: np.ndarray, slot: np.ndarray, d: int) -> None:
        self.values, self.cols, self.slot, self.shape = values, cols, slot, (len(values), d)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, at) -> np.ndarray:
        at = np.arange(len(self))[at] if isinstance(at, slice) else np.asarray(at, dtype=np.int64).reshape(-1)
        out = np.zeros((len(at), self.shape[1]), dtype=np.float32)
        out[np.arange(len(at))[:, None], self.cols[self.slot[at]]] = self.values[at]
        return out


def _dense(full: np.ndarray | _SlotVectors, at) -> torch.Tensor:
    """Float32 ``(k, d)`` tensor of the full vectors ``at`` (positions) of a group."""
    if isinstance(at, torch.Tensor):
        at = at.numpy()
    return torch.from_numpy(np.ascontiguousarray(full[np.asarray(at, dtype=np.int64)]))


@dataclass
class _Group:
    """Distinct query vectors that share their non-zero columns ``cols`` (None: all): ``q`` ``(m, c)`` on those
    columns, the query each belongs to, whether its negation is asked as well (then ``|<q, x>|`` counts), and the full
    ``(m, d)`` vectors for the float64 recomputation (a slot group's as :class:`_SlotVectors`). ``shadow``: the
    vectors of the queries that ride on this group's products (:func:`_ride`), one per vector (owner -1: none), each
    within ``slack`` of its vector."""

    cols: np.ndarray | None
    q: torch.Tensor
    owner: np.ndarray
    both: np.ndarray
    full: np.ndarray | _SlotVectors
    shadow: _Group | None = None
    slack: np.ndarray | None = None
    _members: list[tuple[int, np.ndarray]] | None = None

    def members(self) -> list[tuple[int, np.ndarray]]:
        """``(query, positions of its vectors)`` per query present (computed once: it is asked once per block)."""
        if self._members is None:
            order = np.argsort(self.owner, kind="stable")
            cuts = np.flatnonzero(np.diff(self.owner[order])) + 1
            self._members = [(int(self.owner[m[0]]), m) for m in np.split(order, cuts) if len(m)]
        return self._members


def _groups(flat: np.ndarray, owner: np.ndarray, fast: bool, nv: int = 1) -> list[_Group]:
    """Query vectors ``(M, d)`` (``nv`` variants per query, query after query) -> groups to multiply; ``fast``: signs
    folded, duplicates dropped, slots split out."""
    d = flat.shape[1]
    if not fast:
        return [_Group(None, torch.from_numpy(flat), owner, np.zeros(len(flat), bool), flat)]
    vec, own, both = _folded(flat, owner, nv)
    sparse = np.count_nonzero(vec, axis=1) <= d // 2
    groups = []
    if not sparse.any():  # every vector dense (pixel, tiles, disc, texture): no copy
        vec = np.ascontiguousarray(vec)
        return [_Group(None, torch.from_numpy(vec), own, both, vec)]
    if (~sparse).any():
        dense = np.flatnonzero(~sparse)
        q = torch.from_numpy(np.ascontiguousarray(vec[dense]))
        groups.append(_Group(None, q, own[dense], both[dense], vec[dense]))
    if sparse.any():
        idx = np.flatnonzero(sparse)
        packed = np.ascontiguousarray(np.packbits(vec[idx] != 0, axis=1))
        _, group_of = np.unique(packed.view(np.dtype((np.void, packed.shape[1]))).ravel(), return_inverse=True)
        group_of = group_of.ravel()
        for g in range(int(group_of.max()) + 1):
            members = idx[group_of == g]
            cols = np.flatnonzero(vec[members[0]])
            values = vec[np.ix_(members, cols)]
            full = _SlotVectors(values, cols[None], np.zeros(len(members), dtype=np.int64), d)
            groups.append(_Group(cols, torch.from_numpy(values), own[members], both[members], full))
    return groups


def _ride(g: _Group) -> _Group:
    """Group ``g`` with each query that lies close to the query before it moved into the shadow of that query's
    vectors: one bfloat16 screen then serves both.

    The safeguard judges every image in two intensity views, one after the other, whose vectors lie 0.00-0.12 apart
    (unit vectors) in every default 2D space. A unit row's similarity to a rider's vector ``r`` differs from its
    similarity to the screened vector ``v`` by at most ``|r - v|``, so the screen's bound is widened by that gap for
    the rider, and only the pairs it cannot rule out are computed for it: the screen's products and its passes over
    their output are halved, and the answers stay exact. A query rides when it has as many vectors in the group as
    the query before it (paired in their order) and none lies farther than :data:`_RIDE_GAP` from its pair.
    """
    if g.cols is not None:
        return g  # a slot's similarities are tiny next to the gap: most pairs would survive
    members = dict(g.members())
    if len(g.owner) < _SCREEN_MIN_PER_QUERY * len(members):
        return g  # so are those of a few long vectors per query (texture, embedding)
    pairs, riders = [], set()
    for o in sorted(members):
        lead = members.get(o - 1)
        if o - 1 in riders or lead is None or len(lead) != len(members[o]):
            continue
        diff = g.full[_span(members[o])] - g.full[_span(lead)]
        gap = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
        if gap.max() <= _RIDE_GAP:
            pairs.append((o - 1, o, gap))
            riders.add(o)
    if not pairs:
        return g
    keep = np.flatnonzero(~np.isin(g.owner, list(riders)))
    at = np.full(len(g.owner), -1)
    at[keep] = np.arange(len(keep))  # where each kept vector lands
    full = g.full[keep]
    ride = np.zeros_like(full)
    owner, both, slack = np.full(len(keep), -1), np.zeros(len(keep), dtype=bool), np.zeros(len(keep))
    for lead, rider, gap in pairs:
        to = _span(at[members[lead]])
        ride[to], owner[to], both[to] = g.full[_span(members[rider])], rider, g.both[_span(members[rider])]
        slack[to] = gap + 1e-5  # float32 rounding of a difference of unit vectors and of its norm is far below 1e-5
    shadow = _Group(None, torch.from_numpy(ride), owner, both, ride)  # a dense group's q is its full vectors
    return _Group(None, torch.from_numpy(full), g.owner[keep], g.both[keep], full, shadow, slack)


def _span(positions: np.ndarray) -> slice | np.ndarray:
    """Ascending positions as a slice where they are consecutive (read as a view, not gathered into a copy)."""
    if len(positions) and positions[-1] - positions[0] == len(positions) - 1:
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def _folded(flat: np.ndarray, owner: np.ndarray, nv: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The vectors to multiply, the query of each and whether its negation is asked too.

    A space invariant to intensity inversion returns each query's variants and then their negations (``v`` in the
    first half, ``-v`` in the second): checked in one pass, the first half is kept, every vector asked with both signs.
    Otherwise signs are folded and duplicates dropped by :func:`_distinct` (sorting 200,000 variants of 256 values
    cost 0.3 s, the pixel space's whole bfloat16 screen of a candidate about as much).
    """
    half = nv // 2
    if nv % 2 == 0 and half and len(flat) % nv == 0:
        q3 = flat.reshape(-1, nv, flat.shape[1])
        if not (q3[:, half:] + q3[:, :half]).any():  # a + b is 0 exactly when b is -a
            vec = np.ascontiguousarray(q3[:, :half]).reshape(-1, flat.shape[1])
            return vec, owner.reshape(-1, nv)[:, :half].ravel(), np.ones(len(vec), dtype=bool)
    first = (flat != 0).argmax(axis=1)
    sign = np.where(flat[np.arange(len(flat)), first] < 0, -1.0, 1.0).astype(np.float32)
    canon = flat * sign[:, None] + np.float32(0.0)  # + 0 turns -0.0 into 0.0, so equal vectors have equal bytes
    first_of, inverse = _distinct(canon, owner)
    pos, neg = np.zeros(len(first_of), bool), np.zeros(len(first_of), bool)
    pos[inverse[sign > 0]] = True
    neg[inverse[sign < 0]] = True
    vec = canon[first_of] * np.where(neg & ~pos, -1.0, 1.0).astype(np.float32)[:, None]
    return vec, owner[first_of], pos & neg


def _distinct(rows: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows per owner: the index of each one's first occurrence and, per row, which one it is.

    Sorted by a hash (two fixed random projections, taken in the rows' own precision: no float64 copy of the queries)
    instead of by their bytes, which is many times faster for long rows. Rows with equal hashes are compared in full
    with their neighbour in that order, and only equal ones are merged: a collision between different rows (vectors
    a rounding apart can project to the same float32 values) leaves them apart, which costs one product more, never
    a wrong answer. (A fall-back to sorting every row by its bytes cost the disc space's query 1.4 s.)
    """
    h = rows @ np.random.default_rng(0).standard_normal((rows.shape[1], 2)).astype(rows.dtype)
    order = np.lexsort((np.arange(len(rows)), h[:, 1], h[:, 0], owner))
    same = (owner[order][1:] == owner[order][:-1]) & (h[order][1:] == h[order][:-1]).all(axis=1)
    pair = np.flatnonzero(same)
    same[pair] = (rows[order[pair + 1]] == rows[order[pair]]).all(axis=1)
    starts = np.concatenate([[True], ~same])
    label = np.cumsum(starts) - 1
    inverse = np.empty(len(rows), dtype=np.int64)
    inverse[order] = label
    return order[starts], inverse


class _Best:
    """Per query: the best float32 similarity so far and the (vector, row) pairs within :data:`REFINE` of it."""

    def __init__(self, n: int) -> None:
        self.value = np.full(n, -np.inf)
        self.pairs: list[list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(n)]

    def add(self, sims: torch.Tensor, g: _Group, rows: np.ndarray, absolute: bool = False) -> np.ndarray:
        """Record the float32 similarities ``sims`` ``(m, len(rows))`` of group ``g``'s vectors with global ``rows``
        (vectors of owner -1 are padding and ignored); ``absolute``: ``sims`` already holds ``|.|`` (every vector is
        asked with both signs). Returns each vector's best (float64).

        One min/max pass gives every vector's best (``|.|`` for the vectors asked with both signs; one max pass
        where ``absolute``); only the few vectors that reach their query's best are looked at again, for their pairs
        within :data:`REFINE` of it.
        """
        both = torch.from_numpy(g.both)
        if absolute:
            value = sims.amax(dim=1).numpy().astype(np.float64)
        else:
            high, low = sims.amax(dim=1), sims.amin(dim=1)  # aminmax took 7x as long as both on a 16M block
            value = torch.where(both, torch.maximum(high, -low), high).numpy().astype(np.float64)
        real = g.owner >= 0
        np.maximum.at(self.value, g.owner[real], value[real])
        near = np.flatnonzero(real & (value >= self.value[np.maximum(g.owner, 0)] - REFINE))
        sub = sims[torch.from_numpy(near)]
        sub = torch.where(both[torch.from_numpy(near)][:, None], sub.abs(), sub)
        floor = torch.from_numpy(self.value[g.owner[near]] - REFINE)
        vi, ri = torch.nonzero(sub >= floor[:, None], as_tuple=True)
        vi, ri = near[vi.numpy()], ri.numpy()
        for o in np.unique(g.owner[vi]):
            m = g.owner[vi] == o
            self.pairs[o].append((vi[m], rows[ri[m]], g.full, g.both))
        return value

    def add_pairs(self, o: int, sims: torch.Tensor, vi: np.ndarray, rows: np.ndarray, g: _Group) -> None:
        """Record float32 similarities ``sims`` of single pairs (``g.full[vi]``, global ``rows``) of query ``o``
        (``|.|`` already taken for the vectors asked with both signs)."""
        if not len(vi):
            return
        self.value[o] = max(self.value[o], float(sims.max()))
        keep = (sims >= self.value[o] - REFINE).numpy()
        self.pairs[o].append((vi[keep], rows[keep], g.full, g.both))

    def result(self, o: int, rows_of) -> tuple[float, int]:
        """float64 best similarity of query ``o`` and its row (the lowest row among exact float64 ties)."""
        values, at = [], []
        for vi, rows, full, both in self.pairs[o]:
            if len(vi):
                s = np.einsum("ij,ij->i", full[vi].astype(np.float64), rows_of(rows).astype(np.float64))
                values.append(np.where(both[vi], np.abs(s), s))
                at.append(rows)
        if not values:
            return -np.inf, -1
        s, rows = np.concatenate(values), np.concatenate(at)
        top = s.max()  # taken over arrays: a query tied with thousands of rows (a flat image) once cost seconds here
        return float(top), int(rows[s == top].min())


class _Scratch:
    """Output buffers reused from block to block. A fresh tensor of tens of MiB is new memory each time, and its page
    faults cost more than the product written into it (a 3,040 x 256 x 20,000 bfloat16 product ran at 176 GMAC/s into
    a new tensor, 665 into a reused one)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        n = int(np.prod(shape))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[key] = torch.empty(max(n, 1), dtype=dtype)
        return buf[:n].view(*shape)


def _chunks(g: _Group, most: int) -> list[_Group]:
    """A dense group cut into groups of at most ``most`` vectors (so a block of rows stays long)."""
    if len(g.owner) <= most:
        return [g]
    return [_part(g, slice(s, s + most)) for s in range(0, len(g.owner), most)]


def _part(g: _Group, at: slice) -> _Group:
    """The vectors ``at`` of dense group ``g`` (and of its shadow)."""
    shadow = None if g.shadow is None else _part(g.shadow, at)
    slack = None if g.slack is None else g.slack[at]
    return _Group(None, g.q[at], g.owner[at], g.both[at], g.full[at], shadow, slack)


def _batched(groups: list[_Group]) -> list[tuple[_Group, torch.Tensor | slice | None]]:
    """Slot groups with the same number of columns merged into one batched product (padded with vectors of owner -1):
    the ``crops`` space has 45 slots of 64 columns, one small product each would cost more in overhead than in work.

    Returns:
        ``(group, None)`` for a dense group (``q`` ``(m, d)``), ``(group, cols)`` for a batch (``q`` ``(G, m, c)``,
        ``cols`` the ``G * c`` columns, slot after slot). Slots are taken in the order of their columns, and where
        they lie side by side ``cols`` is a slice: the rows' columns are then read as a view, not gathered into a copy
        (the copy cost twice the product itself on the ``crops`` space).
    """
    out: list[tuple[_Group, torch.Tensor | slice | None]] = [(g, None) for g in groups if g.cols is None]
    by_size: dict[int, list[_Group]] = {}
    for g in groups:
        if g.cols is not None:
            by_size.setdefault(len(g.cols), []).append(g)
    for c, gs in by_size.items():
        gs = sorted(gs, key=lambda g: int(g.cols[0]))
        cols = np.concatenate([g.cols for g in gs])
        side_by_side = bool((np.diff(cols) == 1).all())
        cols = slice(int(cols[0]), int(cols[-1]) + 1) if side_by_side else torch.from_numpy(cols)
        m = max(len(g.owner) for g in gs)
        out.append((_stacked(gs, m, c), cols))
    return out


def _stacked(gs: list[_Group], m: int, c: int) -> _Group:
    """Slot groups of ``c`` columns as one ``(G, m, c)`` group, each padded to ``m`` vectors of owner -1."""
    q = torch.zeros(len(gs), m, c)
    d = gs[0].full.shape[1]
    owner, both = np.full(len(gs) * m, -1), np.zeros(len(gs) * m, bool)
    for i, g in enumerate(gs):
        n = len(g.owner)
        q[i, :n] = g.q
        owner[i * m : i * m + n], both[i * m : i * m + n] = g.owner, g.both
    slot = np.repeat(np.arange(len(gs)), m)
    full = _SlotVectors(q.numpy().reshape(len(gs) * m, c), np.stack([g.cols for g in gs]), slot, d)
    return _Group(None, q, owner, both, full)


def _screened(
    g: _Group, approx: torch.Tensor, x: torch.Tensor, best: _Best, rows: np.ndarray, scratch: _Scratch
) -> None:
    """One block of rows ``x`` for group ``g`` whose bfloat16 similarities ``approx`` ``(m, rows)`` are computed: the
    pairs the screen cannot rule out are computed in float32 (from the full vectors, so slot groups work alike), for
    the group's own queries and for the riders in its shadow."""
    # |.| bounds the similarity of either sign; clearing a bfloat16's sign bit is its absolute value, and non-negative
    # bfloat16 values order as their bits do, so the largest is taken as int16 (a bfloat16 reduction is 3x slower)
    top = approx.view(torch.int16).bitwise_and_(0x7FFF).amax(dim=1).view(torch.bfloat16).float().numpy()
    top = top.astype(np.float64)
    _survivors(g, approx, top, SCREEN, x, best, rows, scratch)
    if g.shadow is not None:
        _survivors(g.shadow, approx, top, SCREEN + g.slack, x, best, rows, scratch)


def _passing(
    owner: np.ndarray, top: np.ndarray, bound: np.ndarray | float, screen: torch.Tensor, best: _Best
) -> tuple[np.ndarray, torch.Tensor]:
    """The screen rows whose largest value reaches their query's best less :data:`REFINE` and ``bound`` (owner -1,
    none: slot groups are padded with such vectors, shadows where a query has no rider), and which of their pairs do (``(len(rows), columns)``): the pairs :func:`_survivors` and
    :func:`_orbit_survivors` compute."""
    floor = np.where(owner >= 0, best.value[np.maximum(owner, 0)] - REFINE - bound, np.inf)
    keep = np.flatnonzero(top >= floor)
    if not len(keep):
        return keep, screen[:0]
    cut = torch.from_numpy(floor[keep]).float()[:, None]
    return keep, screen[torch.from_numpy(keep)].float() >= cut


def _survivors(
    g: _Group,
    screen: torch.Tensor,
    top: np.ndarray,
    bound: np.ndarray | float,
    x: torch.Tensor,
    best: _Best,
    rows: np.ndarray,
    scratch: _Scratch,
) -> None:
    """The pairs of group ``g`` with the block of rows ``x`` that ``screen`` cannot rule out, computed in float32.

    ``screen`` ``(m, rows)`` bounds ``|similarity|`` of each of ``g``'s vectors with each row to within ``bound``
    (per vector; ``top``: its largest value per vector). For the screened vectors that is the screen's own error; a
    rider's vector ``r`` (:func:`_ride`) was not screened, but its screened partner ``v`` was, and
    ``|<r, x> - <v, x>| <= |r - v|`` for a unit row ``x``: the bound widens by that gap."""
    both = torch.from_numpy(g.both)
    reach = top + bound  # the largest |similarity| each vector can have with a row of this block
    # seed each query's best with the exact similarity of its most promising pair (none where even that cannot reach
    # the query's best so far)
    seeds = [(o, int(m[np.argmax(reach[m])])) for o, m in g.members() if o >= 0]
    seeds = [(o, v) for o, v in seeds if reach[v] >= best.value[o]]
    if seeds:
        at = screen[torch.tensor([v for _, v in seeds])].float().argmax(dim=1)
        sims = torch.einsum("ij,ij->i", _dense(g.full, [v for _, v in seeds]), x[at])
        for (o, v), r, s in zip(seeds, at.tolist(), sims):
            best.add_pairs(o, (s.abs() if g.both[v] else s)[None], np.array([v]), rows[[r]], g)
    keep, hit = _passing(g.owner, top, bound, screen, best)
    if not len(keep):
        return
    if hit.numel() and hit.float().mean() > _DENSE_PAIRS:
        dense = _dense(g.full, keep)
        part = _Group(None, dense, g.owner[keep], g.both[keep], dense.numpy())
        exact = scratch.get("survivors", (len(keep), len(x)), torch.float32)
        best.add(torch.mm(part.q, x.T, out=exact), part, rows)
        return
    vi, ri = torch.nonzero(hit, as_tuple=True)
    vi = torch.from_numpy(keep)[vi]
    sims = torch.einsum("ij,ij->i", _dense(g.full, vi), x[ri])
    sims = torch.where(both[vi], sims.abs(), sims)
    vi, ri = vi.numpy(), ri.numpy()
    for o in np.unique(g.owner[vi]):
        m = g.owner[vi] == o
        best.add_pairs(int(o), sims[torch.from_numpy(m)], vi[m], rows[ri[m]], g)


def _slot_columns(block: torch.Tensor, cols: torch.Tensor | slice, shape: Sequence[int]) -> torch.Tensor:
    """``(slots, rows, c)`` view of a block's slot columns, for ``(slots, vectors, c)`` slot vectors (each row's slot
    columns side by side: copied in this layout, 3x cheaper than as ``(slots, c, rows)``)."""
    return block[:, cols].reshape(len(block), shape[0], shape[2]).permute(1, 0, 2)


def _screen_group(
    group: _Group,
    cols,
    xs: Sequence[torch.Tensor],
    offsets: Sequence[int],
    best: _Best,
    scratch: _Scratch,
    rows16: Callable[[int], torch.Tensor | None] | None = None,
) -> None:
    """A group screened in bfloat16, block of rows by block: each block is converted once (or read from ``rows16``,
    a kept bfloat16 copy of a shard's rows), then multiplied with every chunk of vectors (dense) or with every slot's
    vectors (one batched product)."""
    if cols is None:
        chunks = _chunks(group, _BLOCK_FLOATS // _MIN_ROWS)
        step = _MIN_ROWS
    else:
        chunks, step = [group], max(1, min(_SLOT_ROWS, _BLOCK_FLOATS // max(len(group.full), 1)))
    q16s = [g.q.to(torch.bfloat16) for g in chunks]
    for i, (x, offset) in enumerate(zip(xs, offsets)):
        kept = rows16(i) if rows16 is not None and cols is None else None
        for s in range(0, x.shape[0], step):
            block = x[s : s + step]
            rows = np.arange(offset + s, offset + s + len(block))
            if kept is not None:
                x16 = kept[s : s + step]
            elif cols is None:
                x16 = scratch.get("rows16", tuple(block.shape), torch.bfloat16)
                x16.copy_(block)
            else:
                # converted as the rows lie first, then laid out by slot from the small bfloat16 copy: gathering
                # the slots straight from the float32 rows, 256 bytes here and there, cost 4x as much
                flat16 = scratch.get("flat16", tuple(block.shape), torch.bfloat16)
                columns = _slot_columns(flat16.copy_(block), cols, group.q.shape)
                x16 = scratch.get("rows16", tuple(columns.shape), torch.bfloat16)
                x16 = x16.copy_(columns).transpose(1, 2)
            for g, q16 in zip(chunks, q16s):
                approx = scratch.get("screen", (len(g.owner), len(block)), torch.bfloat16)
                if cols is None:
                    torch.mm(q16, x16.T, out=approx)
                else:
                    torch.bmm(q16, x16, out=approx.view(*q16.shape[:2], -1))
                _screened(g, approx, block, best, rows, scratch)


def orbit_bound(size: int, d: int, dtype: torch.dtype) -> float:
    """Bound on ``|screened S - true S|`` of an orbit screen (:mod:`monai_synth.privacy.orbits`) in ``dtype``, for
    unit vectors of ``d`` values under ``size`` flips.

    With ``u`` the unit roundoff of ``dtype`` (``2**-8`` for bfloat16, ``2**-24`` for float32): rounding both
    inputs' parity components changes the products by at most ``(2u + u**2) sum_chi sum_i |q_i x_i| <= 2u + u**2``
    (Cauchy-Schwarz over all components at once: they are an orthonormal basis); the float32 accumulators add at most
    ``d * 2**-24``; rounding each product to ``dtype`` adds ``u |<q_chi, x_chi>|``, at most ``u S <= u`` over the
    components (``S <= sum_chi |q_chi| |x_chi| <= 1``); the pairwise sum of the ``size`` absolute values rounds once
    per level, ``log2(size) u S``; the float32 parity transform itself (sums of ``size`` terms) is below ``1e-5``.
    """
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    return (3 + math.log2(size)) * u + u * u + d * 2.0**-24 + 1e-5


@dataclass
class _Orbits:
    """Orbits of query vectors under a group of flips, screened by their base vector's parity components.

    ``q`` ``(F, m, width)``: the components of each base (on the screen's dtype); ``members`` ``(m, F)``: the
    positions in ``full`` of the orbit's vectors (member ``j`` lies within ``slack`` of base flipped by element ``j``);
    ``owner``: each orbit's query (-1: none, a shadow's empty place); ``both``: per vector of ``full``, whether its
    negation is asked too. ``shadow``: per base, the orbit of the next query that rides on it (:func:`_orbit_ride`),
    its ``slack`` widened by its base's distance to this one."""

    group: FlipGroup
    q: torch.Tensor
    owner: np.ndarray
    members: np.ndarray
    slack: np.ndarray
    full: np.ndarray
    both: np.ndarray
    shadow: _Orbits | None = None
    _by_owner: list[tuple[int, np.ndarray]] | None = None

    def by_owner(self) -> list[tuple[int, np.ndarray]]:
        """``(query, positions of its orbits)`` per query present (computed once: it is asked once per block)."""
        if self._by_owner is None:
            order = np.argsort(self.owner, kind="stable")
            cuts = np.flatnonzero(np.diff(self.owner[order])) + 1
            self._by_owner = [
                (int(self.owner[m[0]]), m) for m in np.split(order, cuts) if len(m) and self.owner[m[0]] >= 0
            ]
        return self._by_owner

    def part(self, at: slice) -> _Orbits:
        shadow = None if self.shadow is None else self.shadow.part(at)
        return _Orbits(
            self.group, self.q[:, at], self.owner[at], self.members[at], self.slack[at], self.full, self.both, shadow
        )

    def record(self) -> _Group:
        """The vectors as a group to record pairs of (:meth:`_Best.add_pairs`)."""
        owner = np.full(len(self.full), -1)
        return _Group(None, torch.empty(0), owner, self.both, self.full)


def _orbit_split(
    flat: np.ndarray, owner: np.ndarray, nv: int, orbits: tuple[np.ndarray, np.ndarray], dtype: torch.dtype
) -> tuple[_Orbits | None, np.ndarray]:
    """The stated orbits of every query (``orbits``: flip generators and the ``(orbits, F)`` variant numbers of each,
    see :func:`~monai_synth.privacy.orbits.layout`) and the positions in ``flat`` of the other vectors (every query's
    the same, so the rest keeps its per-query layout).

    A space that asks every variant negated too (its second half, see :func:`_folded`) has orbits in the first half
    only, each asked with both signs. Orbits repeated within a query (a window repeated to pad) are screened once.
    """
    gens, layout = orbits
    nq, d = len(flat) // nv, flat.shape[1]
    group = FlipGroup(gens)
    layout = np.asarray(layout, dtype=np.int64)
    if group.d != d or layout.ndim != 2 or layout.shape[1] != group.size or not len(layout) or layout.max() >= nv:
        return None, np.arange(len(flat))
    half = nv // 2
    q3 = flat.reshape(nq, nv, d)
    halves = bool(nv % 2 == 0 and layout.max() < half and not (q3[:, half:] + q3[:, :half]).any())
    per = len(layout)
    members = (np.arange(nq)[:, None, None] * nv + layout[None]).reshape(nq * per, group.size)
    base = flat[members[:, 0]]
    everyone, based = torch.from_numpy(flat), torch.from_numpy(base)
    slack = torch.zeros(len(members))
    for j in range(1, group.size):  # gathered in torch: numpy's gather of permuted columns took 4x as long
        flipped = torch.index_select(based, 1, torch.from_numpy(group.perms[j]))
        slack = torch.maximum(slack, torch.linalg.vector_norm(everyone[members[:, j]] - flipped, dim=1))
    slack = slack.double().numpy() * (1 + 1e-3) + 1e-6  # float32 rounding of the differences and their norms
    own = owner[members[:, 0]]
    # an orbit equal to an earlier one of its query, member for member, adds nothing
    first_of, inverse = _distinct(base, own)
    first = first_of[inverse]
    dup = np.flatnonzero(first != np.arange(len(base)))
    same = (flat[members[dup]] == flat[members[first[dup]]]).all(axis=(1, 2))
    keep = np.ones(len(base), bool)
    keep[dup[same]] = False
    rest_local = np.setdiff1d(np.arange(half if halves else nv), layout.ravel())
    if halves:
        rest_local = np.concatenate([rest_local, rest_local + half])
    rest = (np.arange(nq)[:, None] * nv + rest_local[None]).ravel()
    both = np.full(len(flat), halves)
    m = np.flatnonzero(keep)
    q = group.parity(torch.from_numpy(base[m])).transpose(0, 1).contiguous().to(dtype)
    orbit = _Orbits(group, q, own[m], members[m], slack[m], flat, both)
    return _orbit_ride(orbit, base[m], (members[m, 0] % nv)), rest


def _orbit_ride(o: _Orbits, base: np.ndarray, where: np.ndarray) -> _Orbits:
    """Orbits of a query whose base lies within :data:`_RIDE_GAP` of the same orbit's base of the query before it (the
    image's other intensity view) ride on that orbit's screen (as :func:`_ride`, orbit by orbit): its bound widens by
    the gap. An orbit rides only on one that is screened itself. (Up to 0.02, 0.05, 0.1 or 0.15 apart cost the same
    within this machine's spread: 0.56-0.67 CPU-s per candidate for disc and tiles at 1e5 rows.)"""
    lead_at: dict[tuple[int, int], int] = {}
    rides_on = np.full(len(o.owner), -1)
    gap = np.zeros(len(o.owner))
    for i, (q, w) in enumerate(zip(o.owner.tolist(), where.tolist())):
        lead = lead_at.get((q - 1, w))
        if lead is not None:
            diff = base[i].astype(np.float64) - base[lead]
            g = float(np.sqrt(diff @ diff))
            if g <= _RIDE_GAP:
                rides_on[i], gap[i] = lead, g
                continue
        lead_at[(q, w)] = i
    riders = np.flatnonzero(rides_on >= 0)
    if not len(riders):
        return o
    leads = np.flatnonzero(rides_on < 0)
    at = np.full(len(o.owner), -1)
    at[leads] = np.arange(len(leads))
    owner = np.full(len(leads), -1)
    members = np.zeros((len(leads), o.members.shape[1]), dtype=np.int64)
    slack = np.zeros(len(leads))
    to = at[rides_on[riders]]
    owner[to], members[to] = o.owner[riders], o.members[riders]
    slack[to] = o.slack[riders] + gap[riders] + 1e-5  # float32 rounding of the gap's difference and norm
    shadow = _Orbits(o.group, o.q[:, :0], owner, members, slack, o.full, o.both)
    return _Orbits(o.group, o.q[:, leads], o.owner[leads], o.members[leads], o.slack[leads], o.full, o.both, shadow)


def _screen_orbits(o: _Orbits, xs: Sequence[torch.Tensor], offsets: Sequence[int], best: _Best) -> None:
    """Every orbit screened by ``S`` (:mod:`monai_synth.privacy.orbits`); the pairs it cannot rule out are computed in
    float32 (for the orbits' own vectors and for their riders').

    Two passes over the rows. The first (every :data:`_ORBIT_SAMPLE`-th block) only finds each orbit's largest ``S``
    and its row, and the few most promising orbits of each query are computed exactly there: each query's best starts
    near its final value. Screened in one pass, the first blocks' bests are low, and where the bounds are wide (members
    that are not exact flips) most pairs passed them: 7.0 million against 0.49 million with the first pass."""
    size = o.group.size
    bound = orbit_bound(size, o.group.d, o.q.dtype)
    most = max(1, min(_ORBIT_PART, _BLOCK_FLOATS // (size * _ORBIT_ROWS)))
    starts = list(range(0, len(o.owner), most))
    parts = [o.part(slice(s, s + most)) for s in starts]
    record = o.record()
    top, where = np.full(len(o.owner), -np.inf), np.zeros(len(o.owner), dtype=np.int64)
    for k, screen, _, rows in _orbit_screens(parts, xs, offsets, every=_ORBIT_SAMPLE):
        at = slice(starts[k], starts[k] + len(parts[k].owner))
        value, row = (screen.view(torch.int16) if screen.dtype == torch.bfloat16 else screen).max(dim=1)
        if screen.dtype == torch.bfloat16:
            value = value.view(torch.bfloat16)
        value = value.float().numpy().astype(np.float64)
        better = value > top[at]
        top[at] = np.where(better, value, top[at])
        where[at] = np.where(better, rows[row.numpy()], where[at])
    shards = [x.numpy() for x in xs]
    for orbits, slack in ((o, o.slack), (o.shadow, None if o.shadow is None else o.shadow.slack)):
        if orbits is None:
            continue
        for q, at in orbits.by_owner():
            first = at[np.argsort(-(top[at] + slack[at]), kind="stable")[:_ORBIT_SEEDS]]
            vi = orbits.members[first].ravel()
            r = np.repeat(where[first], size)
            sims = torch.einsum("ij,ij->i", _dense(o.full, vi), torch.from_numpy(rows_at(shards, offsets, r)))
            best.add_pairs(q, torch.where(torch.from_numpy(o.both[vi]), sims.abs(), sims), vi, r, record)
    for k, screen, block, rows in _orbit_screens(parts, xs, offsets):
        p = parts[k]
        if screen.dtype == torch.bfloat16:  # non-negative bfloat16 values order as their bits do
            high = screen.view(torch.int16).amax(dim=1).view(torch.bfloat16).float()
        else:
            high = screen.amax(dim=1)
        high = high.numpy().astype(np.float64)
        _orbit_survivors(p, screen, high, bound + p.slack, block, best, rows, record)
        if p.shadow is not None:
            _orbit_survivors(p.shadow, screen, high, bound + p.shadow.slack, block, best, rows, record)


def _orbit_screens(parts: Sequence[_Orbits], xs: Sequence[torch.Tensor], offsets: Sequence[int], every: int = 1):
    """``(part number, S (orbits, rows), block of rows, their global numbers)`` for every part and every ``every``-th
    block of rows; S is written into one buffer, valid until the next step."""
    group, dtype = parts[0].group, parts[0].q.dtype
    size = group.size
    buf: torch.Tensor | None = None
    for x, offset in zip(xs, offsets):
        for s in range(0, x.shape[0], _ORBIT_ROWS * every):
            block = x[s : s + _ORBIT_ROWS]
            rows = np.arange(offset + s, offset + s + len(block))
            xp = group.parity(block).transpose(0, 1).contiguous().to(dtype).transpose(1, 2)  # (F, width, n)
            for k, p in enumerate(parts):
                need = size * len(p.owner) * len(block)
                if buf is None or buf.numel() < need:
                    buf = torch.empty(need, dtype=dtype)
                out = buf[:need].view(size, len(p.owner), len(block))
                torch.bmm(p.q, xp, out=out)
                if dtype == torch.bfloat16:  # clearing the sign bit is the absolute value
                    out.view(torch.int16).bitwise_and_(0x7FFF)
                else:
                    out.abs_()
                h = size
                while h > 1:  # pairwise: one rounding per level
                    h //= 2
                    out[:h] += out[h : 2 * h]
                yield k, out[0], block, rows


def _orbit_survivors(
    o: _Orbits,
    screen: torch.Tensor,
    top: np.ndarray,
    bound: np.ndarray,
    x: torch.Tensor,
    best: _Best,
    rows: np.ndarray,
    record: _Group,
) -> None:
    """The pairs of ``o``'s orbits with the block of rows ``x`` that ``screen`` (``S`` per orbit and row, within
    ``bound`` of a bound on every member's ``|similarity|``) cannot rule out, computed in float32 for every member
    (as :func:`_survivors` for single vectors)."""
    size = o.members.shape[1]
    reach = top + bound
    seeds = [(q, int(i[np.argmax(reach[i])])) for q, i in o.by_owner()]
    seeds = [(q, i) for q, i in seeds if reach[i] >= best.value[q]]
    if seeds:
        at = screen[torch.tensor([i for _, i in seeds])].float().argmax(dim=1).numpy()
        for (q, i), r in zip(seeds, at.tolist()):
            vi = o.members[i]
            sims = torch.from_numpy(o.full[vi]) @ x[r]
            sims = torch.where(torch.from_numpy(o.both[vi]), sims.abs(), sims)
            best.add_pairs(q, sims, vi, np.full(size, rows[r]), record)
    keep, hit = _passing(o.owner, top, bound, screen, best)
    if not len(keep):
        return
    if hit.float().mean() > _DENSE_ORBIT_PAIRS:
        vi = o.members[keep].ravel()
        dense = _dense(o.full, vi)
        part = _Group(None, dense, np.repeat(o.owner[keep], size), o.both[vi], dense.numpy())
        best.add(torch.mm(dense, x.T), part, rows)
        return
    bi, ri = torch.nonzero(hit, as_tuple=True)
    bi, ri = keep[bi.numpy()], ri.numpy()
    vi = o.members[bi].ravel()
    ri = np.repeat(ri, size)
    sims = torch.einsum("ij,ij->i", _dense(o.full, vi), x[torch.from_numpy(ri)])
    sims = torch.where(torch.from_numpy(o.both[vi]), sims.abs(), sims)
    owners = np.repeat(o.owner[bi], size)
    for q in np.unique(owners):
        m = owners == q
        best.add_pairs(int(q), sims[torch.from_numpy(m)], vi[m], rows[ri[m]], record)


def nearest_rows(
    queries: np.ndarray,
    shards: Sequence[np.ndarray],
    offsets: Sequence[int],
    fast: bool = True,
    rows16: Callable[[int], torch.Tensor | None] | None = None,
    orbits: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Largest inner product of each query (over its variants) with any row, and that row.

    Args:
        queries: ``(Q, V, d)`` unit float32 query vectors (V variants per query).
        shards: ``(n_i, d)`` float32 training rows (e.g. views of FAISS shards), numbered from ``offsets[i]``.
        offsets: global number of the first row of each shard.
        fast: fold signs and duplicates and split slots; False: every variant with every row.
        rows16: shard number -> a bfloat16 copy of its rows kept by the caller (None: converted block by block), for
            the screen of dense vectors.
        orbits: ``(flip generators (k, d), (orbits, 2**k) variant numbers)``: the variants that are one vector under
            those flips (:mod:`monai_synth.privacy.orbits`; a space's ``orbit_layout``), screened together. Only a
            hint for speed: the answers are the same with or without it.

    Returns:
        ``(Q,)`` float64 similarities and ``(Q,)`` int64 global row numbers, identical for ``fast`` True and False.
    """
    nq, nv, d = queries.shape
    flat = np.ascontiguousarray(queries.reshape(nq * nv, d), dtype=np.float32)
    owner = np.repeat(np.arange(nq), nv)
    xs = [torch.from_numpy(np.asarray(x, dtype=np.float32)) for x in shards]
    best = _Best(nq)
    scratch = _Scratch()
    orbit = None
    if fast and orbits is not None and sum(len(x) for x in xs) >= _ORBIT_MIN_ROWS:
        orbit, rest = _orbit_split(flat, owner, nv, orbits, torch.bfloat16 if BF16_SCREEN else torch.float32)
        if orbit is not None:
            per = len(rest) // nq
            flat, owner, nv = flat[rest], owner[rest], per
    groups = _groups(flat, owner, fast, nv) if nv else []
    if fast:  # an image's second intensity view rides on its first view's products (exact either way)
        groups = [_ride(g) for g in groups]
    if orbit is not None:
        _screen_orbits(orbit, xs, offsets, best)
    for group, cols in _batched(groups):
        real = group.owner >= 0
        if fast and BF16_SCREEN and real.sum() >= _SCREEN_MIN_PER_QUERY * len(np.unique(group.owner[real])):
            _screen_group(group, cols, xs, offsets, best, scratch, rows16)
            continue
        for g in _chunks(group, _EXACT_FLOATS // _EXACT_ROWS) if cols is None else [group]:
            absolute = bool(g.both[g.owner >= 0].all())
            step = max(1, (_EXACT_FLOATS if cols is None else _BLOCK_FLOATS) // max(len(g.full), 1))
            for x, offset in zip(xs, offsets):
                for s in range(0, x.shape[0], step):
                    block = x[s : s + step]
                    rows = np.arange(offset + s, offset + s + len(block))
                    sims = scratch.get("exact", (len(g.full), len(block)), torch.float32)
                    if cols is None:
                        torch.mm(g.q, block.T, out=sims)
                    else:  # slots of one size side by side: (slots, vectors, c) @ (slots, c, rows)
                        columns = _slot_columns(block, cols, g.q.shape).transpose(1, 2)
                        torch.bmm(g.q, columns, out=sims.view(*g.q.shape[:2], -1))
                    if absolute:  # one pass: |.| serves the group's best and its riders' screen alike
                        sims.abs_()
                    top = best.add(sims, g, rows, absolute)
                    if g.shadow is not None:  # the float32 product screens the riders to within its rounding
                        if not absolute:
                            top = sims.abs_().amax(dim=1).numpy().astype(np.float64)
                        _survivors(g.shadow, sims, top, REFINE + g.slack, block, best, rows, scratch)
    sims, rows = np.empty(nq), np.empty(nq, dtype=np.int64)
    for o in range(nq):
        sims[o], rows[o] = best.result(o, lambda r: rows_at(shards, offsets, r))
    return sims, rows


def rows_at(shards: Sequence[np.ndarray], offsets: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """``(len(rows), d)`` float32 copies of the rows numbered ``rows`` (global numbers) of ``shards``, whose first rows
    are numbered ``offsets``."""
    starts = np.asarray(offsets)
    rows = np.asarray(rows, dtype=np.int64)
    which = np.searchsorted(starts, rows, side="right") - 1
    out = np.empty((len(rows), np.asarray(shards[0]).shape[1]), dtype=np.float32)
    for j in np.unique(which):
        m = which == j
        out[m] = np.asarray(shards[j])[rows[m] - starts[j]]
    return out
