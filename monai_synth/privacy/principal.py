"""A privacy space's vectors on the leading principal directions of the training images' vectors.

Patients differ from each other in a few directions of a space (body outline, organs, lesions: the anatomy that the
training population spans); pixel noise spreads over all of them. Compared on the leading ``k`` directions, a noised
copy keeps its source's vector while the noise's share falls by about ``k / d``: PET slices with Gaussian noise of
5-10% of the range sat at 1.3-2.1x new patients' 1% quantile of the pixel space from their sources (no pixel variant
removes noise) and at 0.4-0.7x on 32 of its 256 directions, and most other copies came closer too (a rotation of 45
degrees 30x -> 12x, an overlay 22x -> 3x; ``docs/benchmarks.md``). The search is on ``k`` values instead of ``d``:
the pixel space's products, a fifth of the default gate's cost at 1e5 training images, shrink ``d / k``-fold.

The projection is linear, so a query's inverted variants stay exact negatives of the others (the search's sign
folding holds). A vector with almost nothing on the directions (less than :data:`MIN_SHARE` of its norm) has no
direction there: it is returned as zeros, which the index refuses (a training image named at build, a candidate not
released), never judged on rounding noise.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import numpy as np
import torch

from monai_synth.privacy.spaces import PrivacySpace, embed_variants

__all__ = ["FIT_IMAGES", "MIN_SHARE", "PrincipalSpace", "fit_principal"]

logger = logging.getLogger(__name__)

MIN_SHARE = 1e-4
"""The least norm a unit vector keeps on the directions to be judged there (see the module's docstring)."""

FIT_IMAGES = 4096
"""The most training images whose vectors the directions are fitted on (the first ones of the training set): the
anatomy a population spans is reached long before, and fitting stays cheap at 1e5 training images."""


class PrincipalSpace:
    """``space``'s unit vectors projected on the orthonormal rows of ``basis`` ``(k, d)``, renormalised.

    Same name as ``space`` (its thresholds and certificates read the same); its fingerprint adds the basis's hash, so
    an index is refused for a space fitted on other training images.

    Args:
        space: the space whose vectors are projected (its ``embed`` and, if it has them, ``embed_variants``).
        basis: ``(k, d)`` orthonormal rows, e.g. from :func:`fit_principal`.
    """

    def __init__(self, space: PrivacySpace, basis: np.ndarray) -> None:
        basis = np.ascontiguousarray(basis, dtype=np.float32)
        if basis.ndim != 2 or not 1 <= basis.shape[0] <= basis.shape[1]:
            raise ValueError(f"basis must be (k, d) with 1 <= k <= d, got shape {basis.shape}")
        if not np.isfinite(basis).all():
            raise ValueError("basis holds NaN or Inf values")
        gram = basis.astype(np.float64) @ basis.T.astype(np.float64)
        if not np.allclose(gram, np.eye(len(basis)), atol=1e-4):
            raise ValueError("basis rows must be orthonormal (e.g. the right singular vectors of the training rows)")
        self.space = space
        self.name = space.name
        self.basis = basis
        self._basis_t = torch.from_numpy(basis)

    @property
    def k(self) -> int:
        """Number of principal directions."""
        return int(self.basis.shape[0])

    def fingerprint(self) -> str:
        """The space's fingerprint with the basis's hash."""
        h = hashlib.sha256(self.basis.tobytes())
        h.update(repr(self.basis.shape).encode())
        return f"{self.space.fingerprint()}+principal{self.k}:{h.hexdigest()[:16]}"

    def _projected(self, vectors: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        shape = v.shape
        flat = v.reshape(-1, shape[-1])
        if flat.shape[1] != self.basis.shape[1]:
            raise ValueError(
                f"space {self.name!r} returned vectors of {flat.shape[1]} values, but its principal directions have "
                f"{self.basis.shape[1]}: fit them on this space"
            )
        on = flat @ self._basis_t.T
        norm = on.norm(dim=1, keepdim=True)
        kept = norm > MIN_SHARE * flat.norm(dim=1, keepdim=True)  # False for NaN: refused downstream, as in space
        out = torch.where(kept, on / torch.where(kept, norm, torch.ones_like(norm)), torch.zeros_like(on))
        return out.reshape(*shape[:-1], self.k).numpy()

    def embed(self, images) -> np.ndarray:
        """``(B, k)`` unit vectors of ``space.embed``'s, projected."""
        return self._projected(np.asarray(self.space.embed(images)))

    def embed_variants(self, images) -> np.ndarray:
        """``(B, V, k)``: every query variant of ``space``, projected (linear: a sign pair stays a sign pair)."""
        return self._projected(embed_variants(self.space, images))

    def __repr__(self) -> str:
        return f"PrincipalSpace({self.space!r}, k={self.k})"


def fit_principal(
    space: PrivacySpace,
    train_images: torch.Tensor | Iterable[torch.Tensor],
    k: int,
    max_images: int = FIT_IMAGES,
) -> PrincipalSpace | PrivacySpace:
    """``space`` on the ``k`` leading right singular vectors of its vectors of (up to ``max_images`` of) the training
    images, or ``space`` itself where fewer than ``4 k`` images are given (too few to tell the population's
    directions from the images' own; a warning says so).

    Args:
        space: the privacy space.
        train_images: model-space training images, one batch or an iterable of batches (read until ``max_images``).
        k: number of directions.
        max_images: the most images the directions are fitted on.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    batches = [train_images] if torch.is_tensor(train_images) or isinstance(train_images, np.ndarray) else train_images
    rows, n = [], 0
    for batch in batches:
        batch = batch["image"] if isinstance(batch, dict) else batch
        take = batch[: max_images - n]
        if len(take):
            rows.append(np.asarray(space.embed(take), dtype=np.float64))
            n += len(take)
        if n >= max_images:
            break
    if n < 4 * k:
        logger.warning(
            f"privacy space {space.name!r} compared on all its values: {n} training images are too few to fit its "
            f"{k} principal directions (at least {4 * k})"
        )
        return space
    x = np.concatenate(rows)
    if k >= x.shape[1]:
        return space
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return PrincipalSpace(space, vt[:k])
