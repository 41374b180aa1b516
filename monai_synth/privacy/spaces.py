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
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PrivacySpace",
    "PixelSpace",
    "NonFiniteImageError",
    "DegenerateImageError",
    "as_image_batch",
    "check_finite",
    "embed_variants",
    "space_distance",
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


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-norm per row, so the dot product of two rows is their Pearson correlation."""
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    flat = norm.flatten() <= 1e-6 * x.shape[1] ** 0.5
    if bool(flat.any()):
        raise DegenerateImageError(
            f"images {flat.nonzero().flatten().tolist()} of the batch are constant; correlation is undefined"
        )
    return x / norm


class PixelSpace:
    """Images on a fixed grid, intensity-standardised: distance = 1 - Pearson correlation.

    Cheap, needs no training and is exact, so it is the default privacy space. Pearson correlation ignores
    a global intensity offset and gain, so a near-copy with its contrast rescaled or with added noise is still
    close. It is not invariant to geometry: pass ``invariances`` to also catch flipped and/or shifted copies
    (the query is compared in every flip/shift in the set and the minimum distance counts); a learned
    :class:`~monai_synth.privacy.embedding.EmbeddingSpace` covers the rest (crops, deformations).

    Args:
        grid: side of the grid images are resampled to (area interpolation), so images of any size compare
            and the vector has ``grid ** spatial_dims`` entries.
        spatial_dims: 2 or 3.
        invariances: any of ``"flip"`` (every combination of axis flips) and ``"shift"`` (every integer shift
            of up to ``max_shift`` grid cells per axis, edges replicated).
        max_shift: largest shift in grid cells when ``"shift"`` is requested.

    Cost: each query image is compared ``len(variant_ops)`` times (2D: 4 flips x 25 shifts = 100 with the
    defaults), the index itself does not grow.
    """

    _VERSION = 1

    def __init__(
        self, grid: int = 32, spatial_dims: int = 2, invariances: Sequence[str] = (), max_shift: int = 2
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if int(grid) < 4:
            raise ValueError(f"grid must be at least 4 cells per axis, got {grid}")
        invariances = tuple(sorted({str(i) for i in invariances}))
        unknown = set(invariances) - {"flip", "shift"}
        if unknown:
            raise ValueError(f"unknown invariances {sorted(unknown)}; choose from 'flip', 'shift'")
        if "shift" in invariances and not 1 <= int(max_shift) < int(grid) // 2:
            raise ValueError(f"max_shift must be in [1, grid/2), got {max_shift} for grid {grid}")
        self.name = "pixel"
        self.grid = int(grid)
        self.spatial_dims = int(spatial_dims)
        self.invariances = invariances
        self.max_shift = int(max_shift) if "shift" in invariances else 0
        flips = [()]
        if "flip" in invariances:
            axes = range(self.spatial_dims)
            flips = [c for r in range(self.spatial_dims + 1) for c in itertools.combinations(axes, r)]
        shifts = [(0,) * self.spatial_dims]
        if "shift" in invariances:
            rng = range(-self.max_shift, self.max_shift + 1)
            shifts = sorted(itertools.product(rng, repeat=self.spatial_dims), key=lambda s: (sum(map(abs, s)), s))
        # identity first: variant 0 is what `embed` returns.
        self.variant_ops: list[tuple[tuple[int, ...], tuple[int, ...]]] = [(f, s) for f in flips for s in shifts]

    @property
    def dim(self) -> int:
        """Length of the vectors (per channel count 1)."""
        return self.grid**self.spatial_dims

    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors."""
        cfg = {
            "space": "pixel",
            "version": self._VERSION,
            "grid": self.grid,
            "spatial_dims": self.spatial_dims,
            "invariances": list(self.invariances),
            "max_shift": self.max_shift,
        }
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]

    def _grid(self, images: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
        x = as_image_batch(images, self.spatial_dims)
        check_finite(x)
        return F.interpolate(x, size=(self.grid,) * self.spatial_dims, mode="area")

    def embed(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, C, *spatial)`` model-space images -> ``(B, C * grid**spatial_dims)`` unit vectors.

        Raises:
            NonFiniteImageError: for NaN/Inf images.
            DegenerateImageError: for constant images.
        """
        g = self._grid(images)
        return _standardise(g.reshape(g.shape[0], -1)).numpy().astype(np.float32, copy=False)

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, V, d)`` vectors of every flip/shift variant of every image (variant 0 = :meth:`embed`)."""
        g = self._grid(images)
        n, s = g.shape[0], self.max_shift
        dims = tuple(range(2, 2 + self.spatial_dims))
        padded = F.pad(g, (s,) * (2 * self.spatial_dims), mode="replicate") if s else g
        out = []
        for flip_axes, shift in self.variant_ops:
            v = padded
            if s:
                # a window of the replicate-padded grid = the image moved by `shift` cells, edges repeated.
                sl = [slice(None), slice(None)] + [slice(s + d, s + d + self.grid) for d in shift]
                v = padded[tuple(sl)]
            if flip_axes:
                v = torch.flip(v, dims=[dims[a] for a in flip_axes])
            out.append(_standardise(v.reshape(n, -1)))
        return torch.stack(out, dim=1).numpy().astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return (
            f"PixelSpace(grid={self.grid}, spatial_dims={self.spatial_dims}, invariances={self.invariances}, "
            f"max_shift={self.max_shift})"
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


def space_distance(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pairwise distance ``1 - <u_i, v_j>`` between rows of two sets of unit vectors, clipped to [0, 2].

    A plain numpy reference (no FAISS) for tests and audits.
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    return np.clip(1.0 - u @ v.T, 0.0, 2.0)
