"""Exact nearest-neighbour index over every training image, with the patient behind every row.

The safeguard's guarantee ("farther than the threshold from *every* training image") is only as good as
the search behind it, so the index is exact by default: FAISS ``IndexFlatIP`` over L2-normalised vectors,
distance = ``1 - inner product`` (see :mod:`monai_synth.privacy.spaces`).

Scale (about 1e6 training images):
    * Memory is ``4 * d`` bytes per image: 512 MB for 1e6 images of a 128-d embedding, 4 GB for the
      1024-d pixel space (32 x 32 grid). ``build(..., shard_size=250_000)`` splits the rows into shards that
      are searched one after the other and merged, so no single array has to be allocated at once, and
      ``load(..., mmap=True)`` maps the saved shards (``faiss.IO_FLAG_MMAP``) and the patient table
      (``numpy`` memmap) instead of reading them: a process starts instantly and the OS pages in only what the
      scans touch, shared between processes guarding in parallel.
    * Exact search costs ``N * d`` multiply-adds per query; FAISS batches queries into one BLAS matrix
      product: about 60 ms of CPU per image against 1e6 rows of 128-d on the 2-core development machine
      (``docs/benchmarks.md``, from ``benchmarks/safeguard_scaling.py``), small next to sampling the image.
      Approximate indexes (IVF, HNSW) are faster but miss some true nearest neighbours (IVF missed 14-21% of
      near-copies at 1e5-1e6 rows), which would let a near-copy through, so the safeguard stays exact.
    * The safeguard asks only for the nearest row over all of a query's variants (:meth:`TrainingIndex.nearest`):
      :mod:`monai_synth.privacy.search` answers that exactly with fewer products (a variant and its negation from one
      product, a slot variant multiplied with its own columns only).

The index is private: it holds vectors of training images and their patient ids. It never goes into a
release; only its fingerprint does.

Trust in a saved index:
    * :meth:`TrainingIndex.load` needs the fingerprint the caller expects (of the current datalist and space), so an
      index of another datalist is never served by accident.
    * :meth:`TrainingIndex.save` records the sha256 of every shard file, of the patient table and of the patient id
      list in ``meta.json``; :meth:`TrainingIndex.load` recomputes them and refuses an index whose contents changed
      (a shard copied from another index, a truncated or edited file). The fingerprint alone only says which
      datalist the index *claims* to hold. Hashing reads every file once (about 1 s per GB on the development
      machine), which also warms the page cache for the memory-mapped case. The hashes guard against mix-ups and corruption, not against someone
      who can rewrite ``meta.json`` as well; the index folder must stay as private as the training data.

Degenerate vectors: a vector of zero norm, of non-finite values, or of only subnormal values (a space that
underflowed or overflowed) has no direction, and L2-normalising it would silently give a vector at distance 1 from
everything, so an exact copy would look unrelated. :class:`DegenerateVectorError` is raised instead, naming the
rows; the safeguard turns that into a rejection of the image. Each vector is divided by its largest entry before it
is normalised, so a finite vector of any magnitude keeps its direction instead of over- or underflowing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np
import torch

from monai_synth.privacy.search import nearest_rows, rows_at
from monai_synth.privacy.spaces import PrivacySpace, embed_variants

__all__ = ["TrainingIndex", "StaleIndexError", "DegenerateVectorError", "index_fingerprint"]

# 2: meta.json records the sha256 of every file and of the patient ids, verified on load.
_FORMAT_VERSION = 2
_META = "meta.json"
_PATIENTS = "patient_codes.npy"
_HASH_CHUNK = 1 << 22
# A vector with no entry of at least the smallest normal float32 holds only subnormal values (or zeros): its
# direction has lost most of its precision (underflow), so it is as meaningless as a zero vector.
_MIN_NORM = float(np.finfo(np.float32).tiny)


class StaleIndexError(ValueError):
    """The index was built from other data or another space than the one it is asked to serve, or its files changed."""


class DegenerateVectorError(ValueError):
    """Vectors with no direction (zero, subnormal-only or non-finite): they cannot be given a distance.

    Attributes:
        rows: positions of the offending vectors (query rows for a search, training image numbers for a build).
    """

    def __init__(self, message: str, rows: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.rows = [int(r) for r in rows]


def index_fingerprint(datalist_fingerprint: str, space_fingerprint: str) -> str:
    """The index fingerprint: changes when the training data or the space changes."""
    return hashlib.sha256(f"{datalist_fingerprint}:{space_fingerprint}".encode()).hexdigest()[:24]


def _iter_batches(images: torch.Tensor | np.ndarray | Iterable, batch_size: int) -> Iterable:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
    else:
        for batch in images:
            if isinstance(batch, dict):
                batch = batch["image"]
            if isinstance(batch, (torch.Tensor, np.ndarray)) and batch.shape[0] > batch_size:
                yield from _iter_batches(batch, batch_size)
            else:
                yield batch


_CACHE_BLOCK = 1 << 22  # bytes of query rows normalised at once


def _unit_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm float32 copies of ``(n, d)`` vectors, and the mask of rows that have no direction.

    Each row is divided by its largest absolute entry before its norm is taken, so no finite vector over- or
    underflows (float32 normalisation turns a vector scaled by 1e20 or 1e-25 into a zero vector). A row is degenerate
    if it holds NaN/Inf or has no entry of normal float32 magnitude (zero, or only subnormal values whose direction
    has lost its precision); degenerate rows are left as they are in the returned array.
    """
    x = np.asarray(vectors)
    if x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous and _already_unit(x):
        return x, np.zeros(len(x), dtype=bool)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    y, ok = np.empty(x.shape, dtype=x.dtype), np.empty(len(x), dtype=bool)
    block = max(1, _CACHE_BLOCK // max(1, x.shape[1] * x.itemsize))  # rows that stay in cache between the passes
    for start in range(0, len(x), block):
        xb, yb = x[start : start + block], y[start : start + block]
        scale = np.maximum(xb.max(axis=1, initial=-np.inf), -xb.min(axis=1, initial=np.inf))  # NaN/Inf if not finite
        okb = ok[start : start + block] = np.isfinite(scale) & (scale >= _MIN_NORM)
        np.divide(xb, np.where(okb, scale, 1)[:, None], out=yb)
        norm = np.sqrt(np.add.reduce(np.square(yb), axis=1))  # np.linalg.norm's sum, without its copies
        yb /= np.where(okb, norm, 1)[:, None]
    return np.ascontiguousarray(y, dtype=np.float32), ~ok


def _already_unit(x: np.ndarray) -> bool:
    """Whether every row of a float32 array is finite with a norm within float32 rounding of 1 (what every space
    returns): then :func:`_unit_rows` can return the rows as they are, without its four passes and its copy (about 5%
    of the default safeguard's time per candidate). Such a row has an entry of at least ``1 / sqrt(d)``: no row of no
    direction passes."""
    block = max(1, _CACHE_BLOCK // max(1, x.shape[1] * x.itemsize))
    for start in range(0, len(x), block):
        xb = x[start : start + block]
        norm2 = np.einsum("ij,ij->i", xb, xb, dtype=np.float64)
        if not (np.abs(norm2 - 1.0) <= _UNIT_TOLERANCE).all():  # NaN fails too
            return False
    return True


_UNIT_TOLERANCE = 1e-5  # |norm^2 - 1| of a float32 vector normalised in float32 is about d * 2**-24 at most (2.4e-4
# for d = 4096, far less in practice: the spaces' vectors of 4,096 values come within 1e-6)


def _kth_bound(sims: Sequence[np.ndarray], q: int, v: int, k: int) -> np.ndarray:
    """Per query, a similarity that its k-th best distinct row reaches: the best over variants of a variant's k-th
    best (each variant's list holds k distinct rows, each at least that similar). Shards that hold fewer than k rows
    give no bound."""
    bound = np.full(q, -np.inf)
    for s in sims:
        per_variant = s.reshape(q, v, -1)
        if per_variant.shape[2] == k:
            bound = np.maximum(bound, per_variant[:, :, k - 1].max(axis=1))
    return bound


def _distinct_best(sim: np.ndarray, row: np.ndarray, bound: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar distinct rows per query, from every variant's neighbours. Only entries at or above the
    query's ``bound`` can be among them, so only those are sorted (variants far from the training set are most of a
    query's entries); the order is what a stable sort of all entries gives."""
    out_s, out_r = np.empty((len(sim), k)), np.empty((len(sim), k), dtype=np.int64)
    for i in range(len(sim)):
        pos = np.flatnonzero(sim[i] >= bound[i])
        s_i, r_i = sim[i, pos], row[i, pos]
        order = np.argsort(-s_i, kind="stable")
        s_i, r_i = s_i[order], r_i[order]
        _, first = np.unique(r_i, return_index=True)
        keep = np.sort(first)[:k]
        out_s[i], out_r[i] = s_i[keep], r_i[keep]
    return out_s, out_r


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_patients(patients: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in patients]).encode()).hexdigest()


class TrainingIndex:
    """Exact (optionally sharded and memory-mapped) nearest-neighbour index of training images.

    Use :meth:`build` or :meth:`load`; the constructor takes already made parts.

    Args:
        shards: FAISS inner-product indexes, rows numbered consecutively across shards.
        patient_codes: ``(N,)`` int array, row -> position in ``patients``.
        patients: patient ids (strings).
        space_name: name of the space the vectors come from.
        space_fingerprint: fingerprint of that space at build time.
        datalist_fingerprint: fingerprint of the training datalist.
        space: the space object, needed to query with images (not needed for :meth:`search`).

    Attributes:
        fast_search: :meth:`nearest` uses :mod:`monai_synth.privacy.search`'s shortcuts (default); False compares
            every query variant with every row (the same answer, for tests and audits).
    """

    _TWO_PATIENT_BLOCK = 1 << 22  # similarities one block of nearest_two_patients holds (16 MiB)
    _ROWS16_BYTES = 1 << 28  # the largest bfloat16 copy of the rows kept for the screen (256 MiB: 1e5 rows of 1,280)

    def __init__(
        self,
        shards: Sequence[faiss.Index],
        patient_codes: np.ndarray,
        patients: Sequence[str],
        space_name: str,
        space_fingerprint: str,
        datalist_fingerprint: str,
        space: PrivacySpace | None = None,
    ) -> None:
        if not shards:
            raise ValueError("an index needs at least one shard")
        dims = {s.d for s in shards}
        if len(dims) != 1:
            raise ValueError(f"shards have different vector sizes {sorted(dims)}")
        self.shards = list(shards)
        self.offsets = np.cumsum([0] + [s.ntotal for s in self.shards])
        if len(patient_codes) != self.ntotal:
            raise ValueError(f"{len(patient_codes)} patient codes for {self.ntotal} index rows")
        self.patient_codes = patient_codes
        self.patients = [str(p) for p in patients]
        self.space_name = str(space_name)
        self.space_fingerprint = str(space_fingerprint)
        self.datalist_fingerprint = str(datalist_fingerprint)
        self.space = space
        self.fast_search = True
        self._rows16_kept: dict[int, torch.Tensor] = {}  # shard -> its rows in bfloat16, see _rows16
        if space is not None:
            self.check_space(space)

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        """Number of indexed training images."""
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        """Vector size."""
        return int(self.shards[0].d)

    @property
    def fingerprint(self) -> str:
        """Hash of the datalist and space fingerprints recorded at build time."""
        return index_fingerprint(self.datalist_fingerprint, self.space_fingerprint)

    @property
    def patient_set(self) -> set[str]:
        """Every training patient id in the index."""
        return set(self.patients)

    def check_space(self, space: PrivacySpace | None = None) -> None:
        """Raise :class:`StaleIndexError` if ``space`` (default: the attached one) is not the one indexed."""
        space = self.space if space is None else space
        if space is None:
            raise StaleIndexError("no privacy space attached to the index; pass space= to load()")
        if space.name != self.space_name or space.fingerprint() != self.space_fingerprint:
            raise StaleIndexError(
                f"index was built with space {self.space_name!r} fingerprint {self.space_fingerprint}, but the space "
                f"given is {space.name!r} fingerprint {space.fingerprint()}: rebuild the index with this space"
            )

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        space: PrivacySpace,
        images: torch.Tensor | np.ndarray | Iterable,
        patient_ids: Sequence[str],
        datalist_fingerprint: str,
        batch_size: int = 64,
        shard_size: int | None = None,
    ) -> TrainingIndex:
        """Embed every training image and index it.

        Args:
            space: the privacy space.
            images: ``(N, C, *spatial)`` model-space images, or an iterable of such batches (or of dicts with
                an ``"image"`` key, e.g. a MONAI ``DataLoader``), so the training set never has to be in memory.
            patient_ids: one patient id per image, in order.
            datalist_fingerprint: fingerprint of the training datalist
                (:func:`monai_synth.data.datalist.datalist_fingerprint`).
            batch_size: images embedded at once.
            shard_size: rows per shard (default: one shard).

        Raises:
            ValueError: if the number of images and patient ids differ or there are no images.
            DegenerateVectorError: a training image whose vector has no direction, named with its patient; indexing
                it would make its copies look unrelated to it.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shard_size is not None and shard_size < 1:
            raise ValueError(f"shard_size must be >= 1 or None, got {shard_size}")
        patient_ids = [str(p) for p in patient_ids]
        shards: list[faiss.Index] = []
        n = 0
        degenerate: list[int] = []
        for batch in _iter_batches(images, batch_size):
            try:
                vec = np.asarray(space.embed(batch))
            except ValueError as err:
                raise ValueError(f"cannot index training images {n}..{n + len(batch) - 1}: {err}") from err
            if vec.ndim != 2:
                raise ValueError(f"space {space.name!r} returned vectors of shape {vec.shape}; expected (B, d)")
            vec, bad = _unit_rows(vec)
            if bad.any() or degenerate:  # go on embedding, to name every bad image at once
                degenerate.extend((n + np.flatnonzero(bad)).tolist())
                n += len(vec)
                continue
            while len(vec):
                if not shards or (shard_size is not None and shards[-1].ntotal >= shard_size):
                    shards.append(faiss.IndexFlatIP(vec.shape[1]))
                room = len(vec) if shard_size is None else shard_size - shards[-1].ntotal
                shards[-1].add(vec[:room])
                n += len(vec[:room])
                vec = vec[room:]
        if degenerate:
            named = [f"{r} ({patient_ids[r]})" if r < len(patient_ids) else str(r) for r in degenerate[:20]]
            raise DegenerateVectorError(
                f"cannot index training images {', '.join(named)}{' ...' if len(degenerate) > 20 else ''}: their "
                f"{space.name!r} vectors have no direction (zero, subnormal-only or non-finite), so a copy of them "
                "could not be recognised; fix or drop those images, or fix the space (under- or overflow?)",
                degenerate,
            )
        if n == 0:
            raise ValueError("no training images to index")
        if n != len(patient_ids):
            raise ValueError(f"{n} training images but {len(patient_ids)} patient ids; give one id per image")
        patients, codes = np.unique(np.asarray(patient_ids, dtype=object).astype(str), return_inverse=True)
        return cls(
            shards,
            codes.astype(np.int32),
            list(patients),
            space.name,
            space.fingerprint(),
            datalist_fingerprint,
            space=space,
        )

    # ------------------------------------------------------------------ search
    def search(self, vectors: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest training rows of query vectors.

        Args:
            vectors: ``(Q, d)`` query vectors, or ``(Q, V, d)``: V variants per query (e.g. flips), the
                distance of a query to a row being its smallest over the variants.
            k: neighbours per query (distinct rows).

        Returns:
            ``distances (Q, k)`` float64 (``1 - cosine``, ascending), ``rows (Q, k)`` int64 global row numbers,
            ``patient_ids (Q, k)`` object array of the rows' patients.

        Raises:
            DegenerateVectorError: naming the query rows with a variant of zero, subnormal-only or non-finite norm;
                such a vector has no direction, and a distance for it would be meaningless (normalising a zero
                vector would put an exact copy at distance 1 from everything).
        """
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be in [1, {self.ntotal}], got {k}")
        flat, (q, v, d) = self._unit_queries(vectors)
        refine = getattr(self.space, "refine", None)
        if callable(refine) and k < self.ntotal and k < self.space.candidates:
            # a space that refines its nearest rows (registration) judges its first few rows: find them all, then cut
            dist, row, pids = self.search(vectors, k=min(self.ntotal, self.space.candidates))
            return dist[:, :k], row[:, :k], pids[:, :k]
        kk = min(k, self.ntotal)
        sims, rows = [], []
        for shard, offset in zip(self.shards, self.offsets[:-1]):
            ks = min(kk, shard.ntotal)
            s, r = shard.search(flat, ks)
            sims.append(s.reshape(q, v * ks))
            rows.append((r + offset).reshape(q, v * ks))
        sim = np.concatenate(sims, axis=1).astype(np.float64)
        row = np.concatenate(rows, axis=1)
        if v == 1 or k == 1:
            order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            sim, row = np.take_along_axis(sim, order, axis=1), np.take_along_axis(row, order, axis=1)
        else:  # variants may find the same row twice: keep each row once
            sim, row = _distinct_best(sim, row, _kth_bound(sims, q, v, k), k)
        dist = np.clip(1.0 - sim, 0.0, 2.0)
        if callable(refine):
            groups = np.asarray(self.patient_codes)[row]  # the fit's finalists: one per patient first
            dist = refine(flat.reshape(q, v, d), dist, row, self.row_vectors, groups)
            order = np.argsort(dist, axis=1, kind="stable")
            dist, row = np.take_along_axis(dist, order, axis=1), np.take_along_axis(row, order, axis=1)
        codes = np.asarray(self.patient_codes)[row]
        pids = np.asarray(self.patients, dtype=object)[codes]
        return dist, row.astype(np.int64), pids

    def nearest(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The nearest training row of each query over all its variants: what :meth:`search` with ``k=1`` finds, with
        fewer products (:mod:`monai_synth.privacy.search`).

        The similarity of the nearest pair is recomputed in float64, so the fast and the dense path
        (:attr:`fast_search` False) return the same rows and distances, bit for bit; they differ from :meth:`search`'s
        float32 distances by float32 rounding (about 1e-7).

        Returns:
            ``distances (Q, 1)``, ``rows (Q, 1)``, ``patient_ids (Q, 1)``, as :meth:`search` with ``k=1``.

        Raises:
            DegenerateVectorError: as :meth:`search`.
        """
        if callable(getattr(self.space, "refine", None)):
            return self.search(vectors, k=1)  # the registered distance of the first few rows decides (see search)
        flat, (q, v, d) = self._unit_queries(vectors)
        shards = [self._shard_rows(i) for i in range(len(self.shards))]
        layout = getattr(self.space, "orbit_layout", None)
        sim, row = nearest_rows(
            flat.reshape(q, v, d),
            shards,
            self.offsets[:-1].tolist(),
            fast=self.fast_search,
            rows16=self._rows16,
            orbits=layout(v, d) if callable(layout) else None,
        )
        dist = np.clip(1.0 - sim, 0.0, 2.0)[:, None]
        pids = np.asarray(self.patients, dtype=object)[np.asarray(self.patient_codes)[row]]
        return dist, row[:, None], pids[:, None]

    def nearest_two_patients(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query vector: its nearest row, the distance to it, and the distance to the nearest row of a patient
        other than that row's (inf where no other patient's row exists).

        One exact float32 pass over the rows (as :meth:`search`), keeping per query the best row and the best row of
        another patient: the specificity test's bound asks this for one vector per image, where a FAISS search of a
        few queries takes its slow non-BLAS path (0.45 s for 11 queries of 2,880 values at 1e5 rows).

        Returns:
            ``rows (Q,)`` int64, ``distances (Q,)`` and ``other (Q,)`` float64.
        """
        flat, (q, v, d) = self._unit_queries(vectors)
        if v != 1:
            raise ValueError("nearest_two_patients takes one vector per query, (Q, d)")
        query = torch.from_numpy(flat)
        codes = np.asarray(self.patient_codes)
        best, row = np.full(q, -np.inf), np.zeros(q, dtype=np.int64)
        code, other = np.full(q, -1, dtype=np.int64), np.full(q, -np.inf)
        step = max(1, self._TWO_PATIENT_BLOCK // max(q, 1))
        for i, offset in enumerate(self.offsets[:-1].tolist()):
            rows = torch.from_numpy(self._shard_rows(i))
            for s in range(0, rows.shape[0], step):
                sims = rows[s : s + step] @ query.T  # (b, Q)
                block_codes = torch.from_numpy(codes[offset + s : offset + s + sims.shape[0]].astype(np.int64))
                top, at = sims.max(dim=0)
                top_code = block_codes[at]
                second = sims.masked_fill(block_codes[:, None] == top_code[None, :], -np.inf).amax(dim=0)
                top, at, top_code, second = (t.numpy().astype(dtype) for t, dtype in (
                    (top, np.float64), (at, np.int64), (top_code, np.int64), (second, np.float64)))  # fmt: skip
                new = top > best
                same = top_code == code
                # the block's best takes over: the old best is another patient's unless it was the same patient
                other = np.where(new, np.maximum(second, np.where(same, other, best)), other)
                # the old best stays: the block's best (or, same patient, its second) may be the nearest other
                other = np.where(new, other, np.maximum(other, np.where(same, second, top)))
                best, row, code = (
                    np.where(new, top, best),
                    np.where(new, at + offset + s, row),
                    np.where(new, top_code, code),
                )
        distance = np.clip(1.0 - best, 0.0, 2.0)
        other_distance = np.where(np.isfinite(other), np.clip(1.0 - other, 0.0, 2.0), np.inf)
        return row, distance, other_distance

    def _unit_queries(self, vectors: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """``(Q, d)`` or ``(Q, V, d)`` query vectors -> ``(Q * V, d)`` unit rows and ``(Q, V, d)``; a query with a
        variant of no direction is refused (:class:`DegenerateVectorError`), never given a distance."""
        vectors = np.asarray(vectors)
        if vectors.ndim == 2:
            vectors = vectors[:, None, :]
        if vectors.ndim != 3 or vectors.shape[2] != self.dim:
            raise ValueError(f"query vectors must be (Q, d) or (Q, V, d) with d={self.dim}, got {vectors.shape}")
        q, v, d = vectors.shape
        flat, bad = _unit_rows(vectors.reshape(q * v, d))
        bad_rows = np.flatnonzero(bad.reshape(q, v).any(axis=1))
        if len(bad_rows):
            raise DegenerateVectorError(
                f"query rows {bad_rows[:20].tolist()}{' ...' if len(bad_rows) > 20 else ''} have a vector with no "
                "direction (zero, subnormal-only or non-finite), so their distance to the training images is "
                "undefined; the privacy space under- or overflowed on those images: they must not be released",
                bad_rows.tolist(),
            )
        return flat, (q, v, d)

    def row_vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(len(rows), d)`` float32 unit vectors of the training rows numbered ``rows`` (global numbers)."""
        shards = [self._shard_rows(i) for i in range(len(self.shards))]
        return rows_at(shards, self.offsets[:-1].tolist(), rows)

    def _rows16(self, i: int) -> torch.Tensor | None:
        """A bfloat16 copy of shard ``i``'s rows for the search's screen, made once and kept; None (converted block by
        block) when all shards' copies would exceed :attr:`_ROWS16_BYTES`. Converting the rows per judged batch took
        about 4% of the default safeguard's time at 1e5 rows."""
        if self.ntotal * self.dim * 2 > self._ROWS16_BYTES:
            return None
        if i not in self._rows16_kept:
            self._rows16_kept[i] = torch.from_numpy(self._shard_rows(i)).to(torch.bfloat16)
        return self._rows16_kept[i]

    def _shard_rows(self, i: int) -> np.ndarray:
        """``(n, d)`` float32 view of the rows of shard ``i`` (no copy: memory-mapped shards stay mapped)."""
        shard = self.shards[i]
        return faiss.rev_swig_ptr(shard.get_xb(), shard.ntotal * shard.d).reshape(shard.ntotal, shard.d)

    def query(
        self, images: torch.Tensor | np.ndarray | Sequence, k: int = 1, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Embed model-space images with the attached space (with its invariance variants) and :meth:`search`.

        Raises:
            StaleIndexError: if the attached space no longer has the fingerprint the index was built with.
        """
        self.check_space()
        out = [self.search(embed_variants(self.space, b), k=k) for b in _iter_batches(images, batch_size)]
        if not out:
            raise ValueError("no images to query")
        return tuple(np.concatenate(parts, axis=0) for parts in zip(*out))  # type: ignore[return-value]

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to ``directory`` atomically (shards, patient table, JSON meta with content hashes).

        The files are written to a sibling temporary folder which then replaces ``directory``, so a crash
        never leaves a half-written index that would load. ``meta.json`` records the sha256 of every file and of
        the patient id list, so :meth:`load` can tell that the contents are the ones saved, not just the metadata.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = []
            for i, shard in enumerate(self.shards):
                files.append(f"shard_{i:03d}.faiss")
                faiss.write_index(shard, str(tmp / files[-1]))
            np.save(tmp / _PATIENTS, np.asarray(self.patient_codes, dtype=np.int32))
            sha256 = {name: _sha256_file(tmp / name) for name in [*files, _PATIENTS]}
            meta = {
                "format_version": _FORMAT_VERSION,
                "fingerprint": self.fingerprint,
                "datalist_fingerprint": self.datalist_fingerprint,
                "space_name": self.space_name,
                "space_fingerprint": self.space_fingerprint,
                "dim": self.dim,
                "ntotal": self.ntotal,
                "metric": "1 - inner product of L2-normalised vectors",
                "shards": files,
                "shard_sizes": [int(s.ntotal) for s in self.shards],
                "patients": self.patients,
                "sha256": sha256,
                "patients_sha256": _sha256_patients(self.patients),
            }
            (tmp / _META).write_text(json.dumps(meta, indent=1))
            old = None
            if directory.exists():
                old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
                directory.rename(old)
            tmp.rename(directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        space: PrivacySpace | None = None,
        expected_fingerprint: str | None = None,
        mmap: bool = False,
    ) -> TrainingIndex:
        """Load a saved index, refusing a stale or altered one.

        Args:
            directory: folder written by :meth:`save`.
            space: the privacy space to attach (its fingerprint must match the indexed one).
            expected_fingerprint: required. The fingerprint the caller expects, e.g.
                ``index_fingerprint(datalist_fingerprint(records), space.fingerprint())`` for the current
                datalist, or the one a calibration was made on (``Calibration.index_fingerprint``); a different
                saved fingerprint means the training data or the space changed. It has no default because an index
                loaded without it could belong to any datalist.
            mmap: memory-map shards and patient table instead of reading them.

        Raises:
            TypeError: if ``expected_fingerprint`` is not given.
            FileNotFoundError: if there is no index in ``directory``.
            StaleIndexError: if the fingerprint or space does not match, the index has an old format, or a file's
                contents differ from the sha256 recorded when it was saved.
        """
        if expected_fingerprint is None:
            raise TypeError(
                "TrainingIndex.load() needs expected_fingerprint=: the fingerprint of the index for the current training "
                "datalist and space, e.g. index_fingerprint(datalist_fingerprint(records), space.fingerprint()), or the "
                "index_fingerprint of the calibration it will serve; without it an index of another datalist would be "
                "loaded silently"
            )
        if not isinstance(expected_fingerprint, str) or not expected_fingerprint:
            raise TypeError(f"expected_fingerprint must be a non-empty string, got {expected_fingerprint!r}")
        directory = Path(directory)
        if not (directory / _META).is_file():
            raise FileNotFoundError(f"no training index in {directory} (missing {_META}); build one first")
        meta = json.loads((directory / _META).read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise StaleIndexError(
                f"index in {directory} has format {meta.get('format_version')}, this version reads format "
                f"{_FORMAT_VERSION} (which records content hashes); rebuild it"
            )
        recorded = index_fingerprint(meta["datalist_fingerprint"], meta["space_fingerprint"])
        if meta["fingerprint"] != recorded:
            raise StaleIndexError(
                f"index in {directory} has inconsistent metadata: fingerprint {meta['fingerprint']} is not that of its "
                f"datalist and space fingerprints ({recorded}); meta.json was edited or corrupted: rebuild it"
            )
        if recorded != expected_fingerprint:
            raise StaleIndexError(
                f"index in {directory} has fingerprint {recorded} but {expected_fingerprint} was expected: "
                "the training datalist or the privacy space changed since it was built; rebuild it"
            )
        cls._verify_contents(directory, meta)
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        shards = [faiss.read_index(str(directory / f), flags) for f in meta["shards"]]
        if [s.ntotal for s in shards] != meta["shard_sizes"] or any(s.d != meta["dim"] for s in shards):
            raise StaleIndexError(f"index shards in {directory} do not match its meta.json; rebuild it")
        codes = np.load(directory / _PATIENTS, mmap_mode="r" if mmap else None)
        if len(codes) and not 0 <= int(codes.min()) <= int(codes.max()) < len(meta["patients"]):
            raise StaleIndexError(f"patient table in {directory} points outside its patient list; rebuild it")
        return cls(
            shards,
            codes,
            meta["patients"],
            meta["space_name"],
            meta["space_fingerprint"],
            meta["datalist_fingerprint"],
            space=space,
        )

    @staticmethod
    def _verify_contents(directory: Path, meta: dict) -> None:
        """Raise :class:`StaleIndexError` unless every file and the patient list hash to what :meth:`save` recorded."""
        recorded = meta.get("sha256")
        names = [*meta["shards"], _PATIENTS]
        if not isinstance(recorded, dict) or set(recorded) != set(names) or "patients_sha256" not in meta:
            raise StaleIndexError(
                f"index in {directory} does not record a sha256 for each of {names} and the patient list; rebuild it"
            )
        changed = []
        for name in names:
            path = directory / name
            if not path.is_file():
                changed.append(f"{name} (missing)")
            elif _sha256_file(path) != recorded[name]:
                changed.append(name)
        if _sha256_patients(meta["patients"]) != meta["patients_sha256"]:
            changed.append("patient list in meta.json")
        if changed:
            raise StaleIndexError(
                f"index in {directory}: contents of {', '.join(changed)} differ from the sha256 recorded when it was "
                "saved (a file was replaced, edited or corrupted); do not use it: rebuild the index"
            )

    def __repr__(self) -> str:
        return (
            f"TrainingIndex(space={self.space_name!r}, ntotal={self.ntotal}, dim={self.dim}, "
            f"shards={len(self.shards)}, patients={len(self.patients)}, fingerprint={self.fingerprint})"
        )
