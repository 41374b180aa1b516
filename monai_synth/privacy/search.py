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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

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
_SLOT_ROWS = 2048  # rows per block of a screened slot group at most: its bfloat16 copies of the block stay in cache
# (blocks of 37,000 rows of the crops space, 215 MiB per copy, made the copies cost 1.6x the products)
_SCREEN_MIN_PER_QUERY = 64  # fewer vectors per query (texture: 8, embedding: 14) are multiplied in float32 at once:
# the screen's bfloat16 copy of the rows and its one exact pass per query cost more than it saves (texture at 1e5 rows:
# 1.26 CPU-s per candidate screened, 0.97 not)
_DENSE_PAIRS = 0.25  # when more of a block's pairs survive the screen than this, its survivors are multiplied densely
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

    def add(self, sims: torch.Tensor, g: _Group, rows: np.ndarray) -> None:
        """Record the float32 similarities ``sims`` ``(m, len(rows))`` of group ``g``'s vectors with global ``rows``
        (vectors of owner -1 are padding and ignored).

        One min/max pass gives every vector's best (``|.|`` for the vectors asked with both signs); only the few
        vectors that reach their query's best are looked at again, for their pairs within :data:`REFINE` of it.
        """
        high, low = sims.amax(dim=1), sims.amin(dim=1)  # aminmax took 7x as long as both on a 16M block
        both = torch.from_numpy(g.both)
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
    real = g.owner >= 0  # slot groups are padded with vectors of owner -1, shadows where a query has no rider
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
    floor = np.where(real, best.value[np.maximum(g.owner, 0)] - REFINE - bound, np.inf)
    keep = np.flatnonzero(top >= floor)
    if not len(keep):
        return
    sub = screen[torch.from_numpy(keep)].float()
    cut = torch.from_numpy(floor[keep]).float()[:, None]
    if sub.numel() and (sub >= cut).float().mean() > _DENSE_PAIRS:
        dense = _dense(g.full, keep)
        part = _Group(None, dense, g.owner[keep], g.both[keep], dense.numpy())
        exact = scratch.get("survivors", (len(keep), len(x)), torch.float32)
        best.add(torch.mm(part.q, x.T, out=exact), part, rows)
        return
    vi, ri = torch.nonzero(sub >= cut, as_tuple=True)
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


def nearest_rows(
    queries: np.ndarray,
    shards: Sequence[np.ndarray],
    offsets: Sequence[int],
    fast: bool = True,
    rows16: Callable[[int], torch.Tensor | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Largest inner product of each query (over its variants) with any row, and that row.

    Args:
        queries: ``(Q, V, d)`` unit float32 query vectors (V variants per query).
        shards: ``(n_i, d)`` float32 training rows (e.g. views of FAISS shards), numbered from ``offsets[i]``.
        offsets: global number of the first row of each shard.
        fast: fold signs and duplicates and split slots; False: every variant with every row.
        rows16: shard number -> a bfloat16 copy of its rows kept by the caller (None: converted block by block), for
            the screen of dense vectors.

    Returns:
        ``(Q,)`` float64 similarities and ``(Q,)`` int64 global row numbers, identical for ``fast`` True and False.
    """
    nq, nv, d = queries.shape
    flat = np.ascontiguousarray(queries.reshape(nq * nv, d), dtype=np.float32)
    owner = np.repeat(np.arange(nq), nv)
    xs = [torch.from_numpy(np.asarray(x, dtype=np.float32)) for x in shards]
    best = _Best(nq)
    scratch = _Scratch()
    groups = _groups(flat, owner, fast, nv)
    if fast:  # an image's second intensity view rides on its first view's products (exact either way)
        groups = [_ride(g) for g in groups]
    for group, cols in _batched(groups):
        real = group.owner >= 0
        if fast and BF16_SCREEN and real.sum() >= _SCREEN_MIN_PER_QUERY * len(np.unique(group.owner[real])):
            _screen_group(group, cols, xs, offsets, best, scratch, rows16)
            continue
        for g in _chunks(group, _BLOCK_FLOATS // _MIN_ROWS) if cols is None else [group]:
            step = max(1, _BLOCK_FLOATS // max(len(g.full), 1))
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
                    best.add(sims, g, rows)
                    if g.shadow is not None:  # the float32 product screens the riders to within its rounding
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
