"""Exact nearest training row of each query, over all its variants, without comparing every variant with every row.

The safeguard asks one question per candidate and space: the largest inner product between any query variant
(flips, shifts, zooms, rotations, signs, windows, slots) and any training row. Computed as a dense product, that is
``V x N x d`` multiply-adds (the 2D pixel space: 14,384 variants x 256 values per row); three exact shortcuts
cut it without changing the answer:

* **Signs and duplicates.** A space invariant to intensity inversion queries ``v`` and ``-v``; their inner products
  with a row are exact negatives (IEEE rounding is symmetric), so one product gives both: ``|<v, x>|``. Identical
  variants (a constant window repeated) are computed once.
* **Slots.** A variant that is zero outside a block of columns (the ``parts`` and ``crops`` spaces hold one region in
  its slot, zeros elsewhere) is multiplied with those columns only: adding exact zeros changes no sum.
* **Bounds** (with a :func:`fit_projection` basis ``U``, ``d x k`` orthonormal, stored with the index). For unit
  vectors ``<q, x> = <U'q, U'x> + <r_q, r_x> <= <U'q, U'x> + |r_q| |r_x|`` (Cauchy-Schwarz on the residuals
  ``r = (I - UU') v``). One ``k + 1``-dimensional product gives that bound for every (variant, row) pair; a row is
  compared in full only if the bound of one of its pairs reaches the best similarity found so far (less a slack that
  covers float32 rounding). This holds for *any* orthonormal ``U``: the basis decides the speed (how much energy the
  training rows put in its span), never the result. Rows without structure (random unit vectors) put ``k / d`` of
  their energy there and nothing is pruned; the search then costs ``(k + 1) / d`` more than the dense product.

Exact ties and float32 rounding: every pair within :data:`REFINE` of the best float32 similarity is recomputed in
float64, and the largest (then the lowest row) is returned, so the dense and the fast path return the same row and
the same distance, bit for bit, whatever the order their float32 sums were taken in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["REFINE", "SLACK", "RowBlock", "fit_projection", "check_projection", "nearest_rows"]

REFINE = 1e-3
"""Pairs whose float32 similarity is within this of the best are recomputed in float64 (covers the float32 error of a
``d``-term dot product of unit vectors, at most ``d * 2**-24``, 2.4e-4 for d = 4096)."""

SLACK = 2e-3
"""A pair is pruned only if its bound is below the best similarity found less this: :data:`REFINE` plus the float32
error of the bound (a ``k + 1``-term product) and of a basis that is orthonormal only to :data:`ORTHO_TOL`."""

ORTHO_TOL = 1e-4
"""Largest ``|U'U - I|`` (spectral norm) a stored basis may have; a looser one is refused (see
:func:`check_projection`)."""

_BLOCK_FLOATS = 1 << 24  # similarities held at once: 64 MiB of float32
_DENSE_SHARE = 0.5  # a block whose surviving rows exceed this share is compared in full: pruning it would cost more


def fit_projection(rows: np.ndarray, k: int) -> np.ndarray:
    """``(d, k)`` float32 orthonormal basis of the ``k`` directions holding most of the rows' energy (uncentred PCA).

    Args:
        rows: ``(n, d)`` unit vectors (a sample of the training rows is enough: the basis only sets the speed).
        k: basis size, ``1 <= k < d``.
    """
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or not 1 <= int(k) < x.shape[1]:
        raise ValueError(f"need (n, d) rows and 1 <= k < d, got rows {x.shape} and k={k}")
    _, vecs = np.linalg.eigh(x.T @ x)
    top = vecs[:, ::-1][:, : int(k)]
    q, _ = np.linalg.qr(top)  # orthonormal to float64 precision before the float32 cast
    return np.ascontiguousarray(q, dtype=np.float32)


def check_projection(basis: np.ndarray, dim: int) -> np.ndarray:
    """The basis as a ``(dim, k)`` float32 array, or ValueError if it is not one whose bounds hold (wrong shape,
    non-finite, not orthonormal to :data:`ORTHO_TOL`)."""
    u = np.asarray(basis)
    if u.ndim != 2 or u.shape[0] != dim or not 1 <= u.shape[1] < dim:
        raise ValueError(f"projection basis must be (d={dim}, k) with 1 <= k < d, got {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError("projection basis holds NaN or Inf values")
    u64 = u.astype(np.float64)
    err = float(np.linalg.norm(u64.T @ u64 - np.eye(u.shape[1]), 2))
    if not err <= ORTHO_TOL:
        raise ValueError(f"projection basis is not orthonormal (|U'U - I| = {err:.2g} > {ORTHO_TOL:g})")
    return np.ascontiguousarray(u, dtype=np.float32)


@dataclass
class RowBlock:
    """Training rows ``x`` (``(n, d)`` unit float32, e.g. a view of a FAISS shard) numbered from ``offset``, and, with a
    basis, their bound coordinates ``[U'x, |r_x|]`` (``(n, k + 1)`` float32)."""

    x: torch.Tensor
    offset: int
    bound: torch.Tensor | None = None
    basis: np.ndarray | None = None

    @classmethod
    def of(cls, rows: np.ndarray, offset: int, basis: np.ndarray | None = None, chunk: int = 65536) -> RowBlock:
        x = torch.from_numpy(np.asarray(rows, dtype=np.float32))
        if basis is None:
            return cls(x, int(offset))
        u = np.asarray(basis, dtype=np.float64)
        out = np.empty((x.shape[0], u.shape[1] + 1), dtype=np.float32)
        for s in range(0, x.shape[0], chunk):
            xs = np.asarray(rows[s : s + chunk], dtype=np.float64)
            out[s : s + chunk, :-1], out[s : s + chunk, -1] = _bound_coords(xs, u)
        return cls(x, int(offset), torch.from_numpy(out), np.asarray(basis, dtype=np.float32))


def _bound_coords(v: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``U'v`` and ``|(I - UU') v|`` (the residual norm rounded up to float32)."""
    p = v @ u
    r = np.linalg.norm(v - p @ u.T, axis=1)
    return p, np.nextafter(r.astype(np.float32), np.float32(np.inf))


@dataclass
class _Group:
    """Distinct query vectors that share their non-zero columns: ``cols`` (None: all), ``q`` ``(m, c)``, the query each
    belongs to, whether its negation is asked as well (then ``|<q, x>|`` counts), and the full vectors ``full``."""

    cols: np.ndarray | None
    q: torch.Tensor
    owner: np.ndarray
    both: np.ndarray
    full: np.ndarray


def _groups(flat: np.ndarray, owner: np.ndarray, fast: bool) -> list[_Group]:
    """Query vectors ``(M, d)`` -> groups to compute; ``fast``: signs folded, duplicates dropped, slots split out."""
    d = flat.shape[1]
    if not fast:
        return [_Group(None, torch.from_numpy(flat), owner, np.zeros(len(flat), bool), flat)]
    first = (flat != 0).argmax(axis=1)
    sign = np.where(flat[np.arange(len(flat)), first] < 0, -1.0, 1.0).astype(np.float32)
    canon = flat * sign[:, None] + np.float32(0.0)  # + 0 turns -0.0 into 0.0, so equal vectors have equal bytes
    keyed = np.concatenate([owner.astype(np.float32)[:, None], canon], axis=1)
    keys = np.ascontiguousarray(keyed).view(np.dtype((np.void, keyed.shape[1] * 4))).ravel()
    _, first_of, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    pos = np.zeros(len(first_of), bool)
    neg = np.zeros(len(first_of), bool)
    pos[inverse[sign > 0]] = True
    neg[inverse[sign < 0]] = True
    vec = canon[first_of] * np.where(neg & ~pos, -1.0, 1.0).astype(np.float32)[:, None]
    own, both = owner[first_of], pos & neg
    support = vec != 0
    count = support.sum(axis=1)
    sparse = count <= d // 2
    groups = []
    if (~sparse).any():
        dense = np.flatnonzero(~sparse)
        groups.append(
            _Group(None, torch.from_numpy(np.ascontiguousarray(vec[dense])), own[dense], both[dense], vec[dense])
        )
    if sparse.any():
        idx = np.flatnonzero(sparse)
        packed = np.packbits(support[idx], axis=1)
        pkeys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
        _, ginv = np.unique(pkeys, return_inverse=True)
        for g in range(int(ginv.max()) + 1):
            members = idx[ginv.ravel() == g]
            cols = np.flatnonzero(support[members[0]])
            q = torch.from_numpy(np.ascontiguousarray(vec[members][:, cols]))
            groups.append(_Group(cols, q, own[members], both[members], vec[members]))
    return groups


class _Best:
    """Per query: best float32 similarity so far and the (vector, row) pairs within :data:`REFINE` of it."""

    def __init__(self, n: int) -> None:
        self.value = np.full(n, -np.inf)
        self.pairs: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(n)]

    def add(self, o: int, sims: torch.Tensor, vectors: np.ndarray, rows: np.ndarray) -> None:
        """Record exact float32 similarities ``sims`` ``(len(vectors), len(rows))`` of query ``o``'s ``vectors``
        (``(m, d)`` full vectors with their |.| flag) against global ``rows``."""
        if sims.numel() == 0:
            return
        top = float(sims.max())
        if top > self.value[o]:
            self.value[o] = top
        vi, ri = torch.nonzero(sims >= self.value[o] - REFINE, as_tuple=True)
        self.pairs[o].append((vi.numpy(), rows[ri.numpy()], vectors))

    def result(self, o: int, rows_of) -> tuple[float, int]:
        """float64 best similarity and its row (the lowest row among exact float64 ties)."""
        best_s, best_r = -np.inf, -1
        floor = self.value[o] - REFINE
        for vi, rows, (vectors, both) in self.pairs[o]:
            if not len(vi):
                continue
            q = vectors[vi].astype(np.float64)
            s = np.einsum("ij,ij->i", q, rows_of(rows).astype(np.float64))
            s = np.where(both[vi], np.abs(s), s)
            keep = s >= floor - REFINE  # float64 values of the band (the band is float32, the values near it)
            for value, row in zip(s[keep], rows[keep]):
                if value > best_s or (value == best_s and row < best_r):
                    best_s, best_r = float(value), int(row)
        return best_s, best_r


def _exact(q: torch.Tensor, x: torch.Tensor, both: np.ndarray) -> torch.Tensor:
    s = q @ x.T
    if both.any():
        b = torch.from_numpy(np.flatnonzero(both))
        s[b] = s[b].abs()
    return s


def nearest_rows(queries: np.ndarray, blocks: Sequence[RowBlock], fast: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Largest inner product of each query (over its variants) with any row, and that row.

    Args:
        queries: ``(Q, V, d)`` unit float32 query vectors (V variants per query).
        blocks: the training rows, in row order; with bound coordinates where a basis is used.
        fast: fold signs and duplicates, split slots, prune with bounds; False: every variant with every row.

    Returns:
        ``(Q,)`` float64 similarities and ``(Q,)`` int64 global row numbers (identical for ``fast`` True and False).
    """
    nq, nv, d = queries.shape
    flat = np.ascontiguousarray(queries.reshape(nq * nv, d), dtype=np.float32)
    owner = np.repeat(np.arange(nq), nv)
    best = _Best(nq)
    for g in _groups(flat, owner, fast):
        full = (g.full, g.both)
        owners = [(o, np.flatnonzero(g.owner == o)) for o in np.unique(g.owner)]
        bounded = fast and g.cols is None and all(b.bound is not None for b in blocks)
        if bounded:
            _bounded(g, owners, blocks, best, full)
            continue
        step = max(1, _BLOCK_FLOATS // max(len(g.q), 1))
        for block in blocks:
            xs = block.x if g.cols is None else block.x[:, torch.from_numpy(g.cols)]
            for s in range(0, xs.shape[0], step):
                sims = _exact(g.q, xs[s : s + step], g.both)
                rows = np.arange(block.offset + s, block.offset + s + sims.shape[1])
                for o, members in owners:
                    sub = sims[torch.from_numpy(members)] if len(owners) > 1 else sims
                    best.add(o, sub, _subset(full, members), rows)
    all_x = [b.x for b in blocks]
    starts = np.array([b.offset for b in blocks])

    def rows_of(rows: np.ndarray) -> np.ndarray:
        k = np.searchsorted(starts, rows, side="right") - 1
        out = np.empty((len(rows), d), dtype=np.float32)
        for j in np.unique(k):
            m = k == j
            out[m] = all_x[j][torch.from_numpy(rows[m] - starts[j])].numpy()
        return out

    sims, rows = np.empty(nq), np.empty(nq, dtype=np.int64)
    for o in range(nq):
        sims[o], rows[o] = best.result(o, rows_of)
    return sims, rows


def _subset(full: tuple[np.ndarray, np.ndarray], members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return full[0][members], full[1][members]


def _bounded(g: _Group, owners, blocks: Sequence[RowBlock], best: _Best, full) -> None:
    """Dense group with bounds: per row block, compare in full only the rows whose bound reaches the best so far."""
    k = blocks[0].bound.shape[1] - 1
    u = None
    for o, members in owners:
        q = g.q[torch.from_numpy(members)]
        both = g.both[members]
        if u is None:
            u = _basis_of(blocks, k, g.q.shape[1])
        p, r = _bound_coords(q.numpy().astype(np.float64), u)
        # bound coordinates [U'q, |r_q|]; a variant asked with both signs also as [-U'q, |r_q|]: the bound of |<q, x>|
        qb = np.concatenate([p, r.astype(np.float64)[:, None]], axis=1)
        neg = qb[both].copy()
        neg[:, :-1] *= -1
        qb = torch.from_numpy(np.concatenate([qb, neg]).astype(np.float32))
        fo = _subset(full, members)
        step = max(1, _BLOCK_FLOATS // max(len(qb), 1))
        for block in blocks:
            for s in range(0, block.x.shape[0], step):
                xb = block.x[s : s + step]
                bound = qb @ block.bound[s : s + step].T
                row_max = bound.amax(dim=0)  # (rows,)
                del bound
                rows = np.arange(block.offset + s, block.offset + s + xb.shape[0])
                # a few rows with the largest bounds first: they raise the best, so the test below prunes more
                seed = torch.topk(row_max, min(8, len(row_max))).indices
                best.add(o, _exact(q, xb[seed], both), fo, rows[seed.numpy()])
                keep = torch.nonzero(row_max >= best.value[o] - SLACK).flatten()
                if len(keep) > _DENSE_SHARE * len(row_max):
                    best.add(o, _exact(q, xb, both), fo, rows)
                elif len(keep):
                    best.add(o, _exact(q, xb[keep], both), fo, rows[keep.numpy()])


def _basis_of(blocks: Sequence[RowBlock], k: int, d: int) -> np.ndarray:
    basis = blocks[0].basis
    if basis is None or basis.shape != (d, k):
        raise ValueError(
            "row blocks carry bound coordinates but no basis; build them with RowBlock.of(rows, offset, basis)"
        )
    return np.asarray(basis, dtype=np.float64)
