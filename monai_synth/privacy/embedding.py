"""The learned ``embedding`` privacy space: a copy-detection and patient re-identification embedding.

A generator that memorised a training image can hand it back altered: rotated, shifted, cropped and resized,
mirrored, inverted, with other contrast, noise or blur, with a masked border, joined with part of another image or
shrunk into a mosaic. A person would still call each of these the same image, so the safeguard must catch them.
This space learns an embedding in which such copies land next to their source, and unseen patients' images do not:

* **instance positives**: every training image is its own class, and its altered copies (:func:`copy_augmentations`)
  are positives of it, as in self-supervised copy detection (Pizzi et al., "A Self-Supervised Descriptor for Image
  Copy Detection", CVPR 2022, https://arxiv.org/abs/2202.10261). The index holds exactly these training images, so
  each gets a learned class centre (a cosine classifier, "normalized softmax", Zhai & Wu, BMVC 2019,
  https://arxiv.org/abs/1811.12649): every step compares a view with all training images, not just the batch,
  which is what lets a small CPU budget learn the task;
* **patient positives**: all images of one patient (repeat studies and their altered copies) pull together with a
  supervised contrastive loss (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020,
  https://arxiv.org/abs/2004.11362), so a new pose of a training patient lands near that patient too.

What can be had exactly is not left to learning: the network ranks each image's values first (any monotone contrast
change, gamma included, leaves the ranks unchanged), and the space compares the query's mirror images, quarter
turns, intensity inversion, a few coarse shifts and its mosaic tiles (:meth:`EmbeddingSpace.embed_variants`), keeping
the smallest distance. The network then spends its training on what has no closed form: rotations, shifts, crops,
noise, blur, masked borders and partial copies.

Vectors are L2-normalised, so the distance is ``1 - cosine`` like every privacy space (see
:mod:`monai_synth.privacy.spaces`), and the same index / calibration / safeguard code serves it. The weights are
saved with a fingerprint of the data they were trained on; loading them for another training set is refused,
because an embedding that never saw an image does not know its copies.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    Identity,
    OneOf,
    RandAdjustContrast,
    RandAffine,
    RandCoarseDropout,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandomizableTransform,
    RandRotate90,
    RandScaleCrop,
    Resize,
    ShiftIntensity,
)

from monai_synth.atomic import atomic_file
from monai_synth.data.samplers import PatientBatchSampler
from monai_synth.losses.contrastive import SupervisedContrastiveLoss
from monai_synth.networks.embedding import PatientEmbeddingNet
from monai_synth.privacy.spaces import _affine_variants, as_image_batch, check_finite
from monai_synth.threads import one_torch_thread
from monai_synth.transforms.presets import BACKGROUND

__all__ = [
    "EmbeddingSpace",
    "EmbeddingWeightsError",
    "RandInvertIntensity",
    "RandMosaic",
    "RandPartialComposite",
    "RandSpeckleNoise",
    "VARIANTS",
    "copy_augmentations",
    "train_embedding",
]

logger = logging.getLogger(__name__)

_FORMAT = "monai_synth.embedding"
#: version 2 added query variants and the network's normalisation and input ranking to the file (a version-1 reader
#: would fail on them); version-1 files (plain queries, group norm, no ranking) still load and keep their
#: fingerprints.
_VERSION = 2
_READABLE_VERSIONS = (1, 2)

#: names of the query variants of :class:`EmbeddingSpace` (see :meth:`EmbeddingSpace.embed_variants`).
VARIANTS = ("flip", "transpose", "invert", "shift", "tile")
#: what :func:`train_embedding` switches on: every variant.
DEFAULT_VARIANTS = VARIANTS
#: working size per axis of a trained network (2D, 3D): inputs are resampled to at most this. Copy detection needs
#: the layout of the image, not its finest texture, and a smaller input buys many more training steps per second.
_WORKING_SIZE = {2: 32, 3: 16}
#: default training epochs and peak learning rate. On phantom cohorts of 240 images, 20 epochs (900 steps) at 1e-2
#: left the network unable to tell PET patients apart (new patients' 1% quantile of 1 - cosine 0.006, 8 directions held
#: 97% of the vectors' energy, the loss still falling): copies rotated by 5 degrees and shifted sat 3.9x that quantile
#: from their sources, blended ones 7.8x, warped by 4 px 6.4x. 40 epochs at 3e-3: 0.88x, 1.75x, 2.16x; ultrasound
#: copies mostly closer too (``benchmarks/space_reach.py --space embedding``, docs/benchmarks.md).
DEFAULT_EPOCHS = 40
DEFAULT_LR = 3e-3
#: default augmentation strength and largest training shift (2D, 3D); see :func:`train_embedding`.
_STRENGTH = {2: 1.0, 3: 0.3}
_MAX_SHIFT = {2: 0.15, 3: 0.05}


class EmbeddingWeightsError(ValueError):
    """Embedding weights that must not be used: corrupt, not ours, modified, or trained on other data."""


class RandInvertIntensity(RandomizableTransform):
    """Negate the image about mid-grey (``x -> -x`` in model space), with probability ``prob``.

    MONAI has no intensity-inversion transform (``RandAdjustContrast(invert_image=True)`` inverts only around a
    gamma change and back). An inverted copy keeps every edge of its source, so it is still the same image.
    """

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize(None)
        return -img if self._do_transform else img


class RandSpeckleNoise(RandomizableTransform):
    """Multiplicative (speckle) noise about the background: ``b + (x - b) * (1 + s * n)``, ``n ~ N(0, 1)``, clipped
    to the image's own range.

    MONAI's noise transforms are additive (``RandGaussianNoise``) or Rician, a magnitude-image model that makes
    every value positive; ultrasound speckle scales with the echo strength, which is what this writes. ``s`` is
    drawn uniformly from ``[0, std]`` per call. The result is clipped to the range of the input, as a noised copy
    saved in the image's own format (8-bit grey levels) is: strong speckle then also flattens the bright echoes.

    Args:
        prob: probability of adding noise.
        std: largest relative noise level.
        background: model-space value that stays fixed (the dark background).
    """

    def __init__(self, prob: float = 0.1, std: float = 0.3, background: float = BACKGROUND) -> None:
        super().__init__(prob)
        self.std = float(std)
        self.background = float(background)
        self._scale = 0.0
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._scale = float(self.R.uniform(0.0, self.std))
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        if not self._do_transform or self._scale == 0.0:
            return img
        img = torch.as_tensor(img)
        noise = torch.randn(img.shape, generator=torch.Generator().manual_seed(self._seed), dtype=img.dtype)
        out = self.background + (img - self.background) * (1.0 + self._scale * noise)
        return out.clamp(float(img.min()), float(img.max()))


class _PoolComposite(RandomizableTransform):
    """Base of the transforms that join an image with other images of a pool (the training set)."""

    def __init__(self, pool: torch.Tensor | np.ndarray, prob: float) -> None:
        super().__init__(prob)
        self.pool = torch.as_tensor(np.asarray(pool) if not torch.is_tensor(pool) else pool).float()
        if self.pool.ndim < 3 or self.pool.shape[0] < 1:
            raise ValueError(f"pool must be a non-empty (N, C, *spatial) batch, got shape {tuple(self.pool.shape)}.")

    def _other(self, like: torch.Tensor) -> torch.Tensor | None:
        """Random pool images shaped like ``like``, or None when the shapes cannot match.

        ``like`` may stack several images as channels (a group augmented together); each gets its own pool image.
        """
        c = self.pool.shape[1]
        if like.shape[1:] != self.pool.shape[2:] or like.shape[0] % c:
            return None
        picks = self.R.randint(0, self.pool.shape[0], size=like.shape[0] // c)
        return self.pool[torch.as_tensor(picks)].reshape(like.shape).to(like.dtype)


class RandPartialComposite(_PoolComposite):
    """Keep one part of the image and take the rest from another pool image ("half joined with half of another").

    MONAI has no such transform (``CutMix`` pastes a box and mixes labels; this keeps a whole side). The cut is at a
    random axis and side, keeping a fraction of the field of view drawn from ``[min_keep, max_keep]``.

    Args:
        pool: ``(N, C, *spatial)`` images of the same size to take the other part from.
        prob: probability of compositing.
        min_keep: smallest kept fraction of the image along the cut axis.
        max_keep: largest kept fraction.
    """

    def __init__(
        self, pool: torch.Tensor | np.ndarray, prob: float = 0.1, min_keep: float = 0.45, max_keep: float = 0.75
    ) -> None:
        super().__init__(pool, prob)
        if not 0.0 < float(min_keep) <= float(max_keep) <= 1.0:
            raise ValueError(f"need 0 < min_keep <= max_keep <= 1, got {min_keep}, {max_keep}.")
        self.min_keep, self.max_keep = float(min_keep), float(max_keep)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        self.randomize(None)
        if not self._do_transform:
            return img
        img = torch.as_tensor(img)
        other = self._other(img)
        if other is None:
            return img
        axis = 1 + int(self.R.randint(0, img.ndim - 1))
        n = img.shape[axis]
        cut = int(round(n * self.R.uniform(self.min_keep, self.max_keep)))
        index: list[slice] = [slice(None)] * img.ndim
        index[axis] = slice(0, cut) if self.R.rand() < 0.5 else slice(n - cut, n)
        out = other.clone()
        out[tuple(index)] = img[tuple(index)]
        return out


class RandMosaic(_PoolComposite):
    """Shrink the image into one tile of a ``2 x 2`` (``2 x 2 x 2`` for volumes) mosaic of pool images.

    MONAI has no mosaic transform. The other tiles are randomly chosen pool images shrunk the same way (area
    averaging), so the image fills ``1 / 2**spatial_dims`` of the field of view at half its scale.

    Args:
        pool: ``(N, C, *spatial)`` images of the same size to fill the other tiles with.
        prob: probability of making a mosaic.
    """

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        self.randomize(None)
        if not self._do_transform:
            return img
        img = torch.as_tensor(img)
        tile = tuple(max(1, s // 2) for s in img.shape[1:])
        corners = list(itertools.product(*[(0, t) for t in tile]))
        own = int(self.R.randint(0, len(corners)))
        others = [self._other(img) for _ in range(len(corners) - 1)]
        if any(o is None for o in others):
            return img
        out = torch.full_like(img, BACKGROUND)
        for k, corner in enumerate(corners):
            src = img if k == own else others.pop()
            small = F.interpolate(src[None], size=tile, mode="area")[0]
            out[(slice(None), *[slice(c, c + t) for c, t in zip(corner, tile)])] = small
        return out


_SKIPPABLE = ("flip", "transpose", "invert")


def copy_augmentations(
    spatial_size: Sequence[int],
    strength: float = 1.0,
    max_shift: float = 0.15,
    pool: torch.Tensor | np.ndarray | None = None,
    skip: Sequence[str] = (),
) -> Compose:
    """MONAI random transforms that make the altered copies the safeguard must still catch.

    Each is a change after which a person would still call the result the same image: mirror flips and quarter
    turns (transposes), rotations, shifts and zooms (padding with the background or replicating the border),
    crop-and-resize, intensity inversion, gamma, speckle and Gaussian noise, blur, a masked border, and, when a
    ``pool`` of other images is given, partial composites (part of the image joined with another image,
    :class:`RandPartialComposite`) and mosaics (the image shrunk into one tile, :class:`RandMosaic`). Trained as
    positives of their source image, they put such copies next to it.

    Each transform fires with its own probability, so a view holds a few alterations at once and some views stay
    close to their source: the index holds the unaltered images, and matching those matters too.

    Args:
        spatial_size: size of the (channel-first) images the pipeline receives and returns.
        strength: scales every range but the shift (1.0: rotation up to 25 degrees, crops down to 50% of each
            side, zoom 0.8-1.1, Gaussian noise std up to 0.5 and speckle up to 0.7 in model space, gamma 0.5-2,
            blur sigma up to 1.5 px and masked borders up to 6 px per 64 px of field of view).
        max_shift: largest translation, as a fraction of the field of view per axis. Kept separate from
            ``strength`` because a CNN is least invariant to shifts, and a shifted copy is the cheapest copy.
        pool: ``(N, C, *spatial)`` images (the training set) for partial composites and mosaics; without it
            those two are left out.
        skip: alterations to leave out because the space undoes them exactly (its query variants, see
            :class:`EmbeddingSpace`): any of ``"flip"``, ``"transpose"`` (quarter turns), ``"invert"``. Learning
            an invariance costs training steps; one that is exact for free should not take them from the others.

    Returns:
        a :class:`~monai.transforms.Compose` mapping a ``(C, *spatial)`` tensor to one of the same shape.
    """
    size = tuple(int(s) for s in spatial_size)
    nd = len(size)
    if nd not in (2, 3):
        raise ValueError(f"spatial_size must have 2 or 3 entries, got {size}.")
    s = float(strength)
    if not s >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}.")
    if not 0 <= float(max_shift) < 0.5:
        raise ValueError(f"max_shift must be a fraction of the field of view in [0, 0.5), got {max_shift}.")
    skip = tuple(skip)
    if set(skip) - set(_SKIPPABLE):
        raise ValueError(f"skip takes any of {list(_SKIPPABLE)}, got {list(skip)}.")
    px = min(size) / 64.0  # pixel-sized ranges are given per 64 pixels of field of view
    interp = "bilinear" if nd == 2 else "trilinear"
    affine = {
        "prob": 0.8,
        "rotate_range": (math.radians(25.0) * s,) * (1 if nd == 2 else 3),
        "translate_range": tuple(float(max_shift) * n for n in size),
        "scale_range": [(-0.2 * s, 0.1 * s)] * nd,
        "mode": "bilinear",
    }
    crop_resize = Compose(
        [
            RandScaleCrop(roi_scale=max(0.2, 1.0 - 0.5 * s), max_roi_scale=1.0, random_center=True, random_size=True),
            Resize(spatial_size=size, mode=interp, anti_aliasing=False),
        ]
    )
    border = max(1, round(6 * px * s))
    sigma = (0.25 * px, max(0.25, 1.5 * s) * px)
    xforms: list = []
    if "flip" not in skip:
        xforms += [RandFlip(prob=0.5, spatial_axis=a) for a in range(nd)]
    if "transpose" not in skip:
        planes = [(0, 1)] if nd == 2 else [(0, 1), (0, 2), (1, 2)]
        xforms += [RandRotate90(prob=0.5, max_k=3, spatial_axes=axes) for axes in planes]
    xforms += [
        OneOf([crop_resize, Identity()], weights=[0.3, 0.7]),
        # the affine pads either with the background (zero once the background is moved to 0) or with the border
        ShiftIntensity(-BACKGROUND),
        OneOf([RandAffine(padding_mode="zeros", **affine), RandAffine(padding_mode="border", **affine)]),
        ShiftIntensity(BACKGROUND),
    ]
    if pool is not None:
        xforms += [RandPartialComposite(pool, prob=0.1), RandMosaic(pool, prob=0.1)]
    if "invert" not in skip:
        xforms.append(RandInvertIntensity(prob=0.25))
    smooth = {"sigma_x": sigma, "sigma_y": sigma, "sigma_z": sigma}
    xforms += [
        RandAdjustContrast(prob=0.25, gamma=(max(0.1, 1.0 - 0.5 * s), 1.0 + s)),
        RandGaussianSmooth(prob=0.2, **smooth),
        # speckle of sd 0.5 (relative) left 14 of 20 ultrasound copies as far from their source as new patients are
        RandSpeckleNoise(prob=0.25, std=0.7 * s),
        RandGaussianNoise(prob=0.25, std=0.5 * s),
        # border masking: keep one random box a few pixels smaller than the image, fill the rest with background
        RandCoarseDropout(
            holes=1,
            spatial_size=tuple(max(1, n - 2 * border) for n in size),
            max_spatial_size=tuple(max(1, n - 2) for n in size),
            dropout_holes=False,
            fill_value=BACKGROUND,
            prob=0.2,
        ),
    ]
    return Compose(xforms)


def _augment_batch(augment: Compose, images: torch.Tensor, indices: Sequence[int], group: int = 1) -> torch.Tensor:
    """Augmented copies of ``images[indices]`` as one plain tensor.

    ``group`` images at a time go through the pipeline stacked as channels, so they share one draw of the
    geometric parameters (each still gets its own noise and its own composite partners): MONAI's per-call
    overhead, not the arithmetic, dominates on small images, and groups cut it ``group``-fold. Groups take every
    ``len(indices) / group``-th index, so the members are views of different patients in a patient-major batch, and
    draws differ between groups and steps.

    Metadata tracking and intra-op threads are switched off meanwhile: the views are thrown away after one step,
    MetaTensor bookkeeping costs more than the transforms themselves on small images, and thread hand-offs for
    such tiny operations are slower than one core, several times so when the cores are shared.
    """
    previous = get_track_meta()
    set_track_meta(False)
    try:
        with one_torch_thread():
            n, c = len(indices), images.shape[1]
            n_groups = math.ceil(n / max(1, int(group)))
            out = torch.empty((n, *images.shape[1:]), dtype=images.dtype)
            for g in range(n_groups):
                members = list(range(g, n, n_groups))
                stacked = images[[indices[m] for m in members]].reshape(len(members) * c, *images.shape[2:])
                out[members] = torch.as_tensor(augment(stacked)).reshape(len(members), c, *images.shape[2:])
            return out
    finally:
        set_track_meta(previous)


def _hash_tensor_data(images: torch.Tensor, patient_ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(images.shape), [str(p) for p in patient_ids]]).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_zooms(zooms: Sequence[float]) -> tuple[float, ...]:
    """``(1.0, *others)``: the identity first (variant 0 is the plain query), duplicates dropped, others sorted."""
    values = [float(z) for z in zooms]
    if not all(0.25 <= z <= 4.0 for z in values):
        raise ValueError(f"zooms must lie in [0.25, 4], got {list(zooms)}.")
    return (1.0,) + tuple(sorted({round(z, 4) for z in values} - {1.0}))


def _check_variants(variants: Sequence[str], shift: float) -> tuple[tuple[str, ...], float]:
    """Variant names in the canonical order of :data:`VARIANTS`, and the shift fraction."""
    names = {str(v) for v in variants}
    if names - set(VARIANTS):
        raise ValueError(f"unknown query variants {sorted(names - set(VARIANTS))}; choose from {list(VARIANTS)}.")
    if "shift" in names and not 0.0 < float(shift) < 0.5:
        raise ValueError(f"variant_shift must be a fraction of the field of view in (0, 0.5), got {shift}.")
    return tuple(v for v in VARIANTS if v in names), float(shift)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, C, *spatial)`` resampled to ``size`` the one way the space does it, for training images and queries alike.

    MONAI's Resize is channel-wise, so the batch rides along as channels; anti-aliasing avoids aliasing when
    images are shrunk.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    b, c = x.shape[:2]
    mode = "bilinear" if len(size) == 2 else "trilinear"
    out = Resize(size, mode=mode, anti_aliasing=True)(x.reshape(b * c, *x.shape[2:]))
    return torch.as_tensor(out).reshape(b, c, *size)


class EmbeddingSpace:
    """A trained :class:`~monai_synth.networks.embedding.PatientEmbeddingNet` as a privacy space.

    Implements :class:`monai_synth.privacy.spaces.PrivacySpace`: ``embed`` maps ``(B, C, *spatial)`` model-space
    images to ``(B, d)`` float32 unit vectors (distance = 1 - cosine), resampling them to the network's working size
    first. The network is always run in evaluation mode without gradients, so a vector depends only on its
    image. Build one with :func:`train_embedding` or :meth:`from_weights`; the network is treated as frozen.

    :meth:`embed_variants` also embeds altered versions of each *query* and the index keeps the smallest distance
    over them, so the index stays one row per training image. Each variant undoes one kind of copy exactly (or
    nearly) where learning it would be slow or impossible; each is also one more chance for an unseen patient to
    come near a training image, which the holdout calibration (run with the same variants) prices in:

    * ``"flip"``: every combination of axis flips; ``"transpose"``: every axis permutation (with ``"flip"``, all
      quarter turns: 8 variants in 2D, 48 in 3D);
    * ``"invert"``: each of those negated (``x -> -x`` in model space), which undoes an intensity-inverted copy;
    * ``"shift"``: the query moved by ``variant_shift`` of the field of view along every axis and diagonal (8 in 2D,
      26 in 3D), edges replicated: the network tolerates shifts of a few pixels, these bring a larger shift back
      into that range;
    * ``"tile"``: each of the ``2 ** spatial_dims`` tiles of a 2-per-axis grid, enlarged to the full field of view,
      which undoes an image shrunk into one tile of a mosaic.

    Args:
        network: the trained encoder.
        spatial_size: the network's working size; inputs of other sizes are resampled to it.
        data_fingerprint: fingerprint of the training data the weights saw (e.g. the datalist fingerprint).
        config: keyword arguments that rebuild ``network`` (``spatial_dims``, ``in_channels``, ``channels``,
            ``out_dim``, ``num_res_units``, and for version-2 weights ``norm`` and ``input_norm``).
        training: facts about the training run kept with the weights (epochs, seed, loss history, ...).
        device: where to run the network (default CPU).
        batch_size: images per forward pass in :meth:`embed`.
        zooms: scale factors of further query variants (1.0, the plain query, always comes first). A factor
            ``z < 1`` shrinks the query about its centre (borders replicated), which undoes a copy cropped to ``z``
            of its side length and resized back. Use few factors, matched to the crops to be caught: a shrunk query
            also looks like a smaller patient.
        variants: any of :data:`VARIANTS` (see above); none by default, which is how version-1 weights behave.
        variant_shift: the ``"shift"`` variants' displacement, as a fraction of the field of view per axis.
    """

    name = "embedding"
    identity_space = True
    """Trained to put all images of one patient together, so a new patient who resembles a training patient lands
    near that patient's images: the holdout's duplicate screen leaves such images out of this space's threshold
    with a warning instead of refusing the holdout (see :func:`~monai_synth.privacy.calibration.calibrate_threshold`)."""
    _DEFAULT_ZOOMS = (1.0,)

    def __init__(
        self,
        network: PatientEmbeddingNet,
        spatial_size: Sequence[int],
        data_fingerprint: str,
        config: dict[str, Any],
        training: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        zooms: Sequence[float] = _DEFAULT_ZOOMS,
        variants: Sequence[str] = (),
        variant_shift: float = 0.1,
    ) -> None:
        self.spatial_size = tuple(int(s) for s in spatial_size)
        if len(self.spatial_size) != network.spatial_dims:
            raise ValueError(
                f"spatial_size {self.spatial_size} does not match the network's spatial_dims={network.spatial_dims}."
            )
        if not data_fingerprint:
            raise ValueError("data_fingerprint must be a non-empty string identifying the training data.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.network = network.to(self.device).eval()
        self.data_fingerprint = str(data_fingerprint)
        self.config = dict(config)
        self.training = dict(training or {})
        self.batch_size = int(batch_size)
        self.zooms = _check_zooms(zooms)
        self.variants, self.variant_shift = _check_variants(variants, variant_shift)
        self._format_version = _VERSION

    @property
    def spatial_dims(self) -> int:
        return self.network.spatial_dims

    @property
    def dim(self) -> int:
        """Length of the vectors."""
        return self.network.out_dim

    @property
    def n_variants(self) -> int:
        """Vectors per query in :meth:`embed_variants` (the plain query included)."""
        return 1 + len(self.zooms) - 1 + len(self._symmetries()) + len(self._shifts()) + len(self._tiles())

    def fingerprint(self) -> str:
        """sha256 of the weights, the data fingerprint, the network config, the input size and the query variants.

        Changes whenever the mapping from images to vectors could change, so an index built with other
        weights (or weights trained on other data) is refused. Query zooms and variants other than the default are
        included: they change the distances, and so the thresholds calibrated with them.
        """
        h = hashlib.sha256()
        meta: dict[str, Any] = {
            "format": _FORMAT,
            "version": self._format_version,
            "config": self.config,
            "spatial_size": list(self.spatial_size),
            "data_fingerprint": self.data_fingerprint,
        }
        if self.zooms != self._DEFAULT_ZOOMS:  # left out by default, so fingerprints of earlier weights still hold
            meta["zooms"] = list(self.zooms)
        if self.variants:
            meta["variants"] = list(self.variants)
            if "shift" in self.variants:
                meta["variant_shift"] = self.variant_shift
        h.update(json.dumps(meta, sort_keys=True).encode())
        for key, value in sorted(self.network.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(x, self.spatial_size)

    def embed(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, C, *spatial)`` model-space images -> ``(B, d)`` float32 L2-normalised vectors.

        Raises:
            ValueError: for a wrong shape or channel count; :class:`~monai_synth.privacy.spaces.NonFiniteImageError`
                (a ValueError) for NaN/Inf values, so that the safeguard refuses those images.
        """
        x = as_image_batch(images, self.spatial_dims)
        if x.shape[1] != self.network.in_channels:
            raise ValueError(
                f"expected {self.network.in_channels} channel(s) per image, got images of shape {tuple(x.shape)}."
            )
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        check_finite(x)
        self.network.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                chunk = self._resample(x[start : start + self.batch_size])
                out.append(self.network(chunk.to(self.device)).float().cpu())
        vec = torch.cat(out).numpy().astype(np.float32, copy=False)
        if not np.isfinite(vec).all():
            raise ValueError("the embedding network produced NaN/Inf vectors; the weights are unusable.")
        return vec

    def _symmetries(self) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
        """(axis permutation, flipped axes, sign) of every symmetry variant but the identity."""
        nd = self.spatial_dims
        perms = list(itertools.permutations(range(nd))) if "transpose" in self.variants else [tuple(range(nd))]
        subsets = [c for r in range(nd + 1) for c in itertools.combinations(range(nd), r)]
        flips = subsets if "flip" in self.variants else [()]
        signs = (1, -1) if "invert" in self.variants else (1,)
        ops = list(itertools.product(perms, flips, signs))
        return ops[1:]  # the first is the identity: permutation (0, 1, ...), no flip, sign +1

    def _shifts(self) -> list[tuple[int, ...]]:
        """Pixel offsets of the shift variants: every non-zero combination of ``(-s, 0, s)`` over the axes."""
        if "shift" not in self.variants:
            return []
        steps = [max(1, round(self.variant_shift * n)) for n in self.spatial_size]
        combos = itertools.product(*[(-s, 0, s) for s in steps])
        return [c for c in combos if any(c)]

    def _tiles(self) -> list[tuple[int, ...]]:
        """Corners of the tiles of a 2-per-axis grid (the tile variants)."""
        if "tile" not in self.variants:
            return []
        return list(itertools.product(*[(0, n // 2) for n in self.spatial_size]))

    def _zoomed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every image scaled about its centre by every zoom but the identity (the pixel space's affine variants)."""
        if len(self.zooms) == 1:
            return []
        v = _affine_variants(x, self.zooms, (0.0,)).reshape(x.shape[0], len(self.zooms), *x.shape[1:])
        return [v[:, k] for k in range(1, len(self.zooms))]

    def _variants(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, V - 1, C, *spatial)``: every variant but the plain query of every (resampled) image, in a fixed order:
        zooms, symmetries, shifts, tiles."""
        nd, size = self.spatial_dims, self.spatial_size
        first = 2  # spatial axes of x start here
        out = self._zoomed(x)
        for perm, flips, sign in self._symmetries():
            v = x.permute(0, 1, *[first + a for a in perm]) if perm != tuple(range(nd)) else x
            v = torch.flip(v, dims=[first + a for a in flips]) if flips else v
            out.append(-v if sign < 0 else v)
        shifts = self._shifts()
        if shifts:
            pad = [max(abs(o[a]) for o in shifts) for a in range(nd)]
            padded = F.pad(x, [p for a in reversed(range(nd)) for p in (pad[a], pad[a])], mode="replicate")
            for offset in shifts:
                # content moves by +offset: the window starts offset before the original one
                window = [slice(None), slice(None)] + [
                    slice(pad[a] - offset[a], pad[a] - offset[a] + size[a]) for a in range(nd)
                ]
                out.append(padded[tuple(window)])
        interp = "bilinear" if nd == 2 else "trilinear"
        for corner in self._tiles():
            tile = (slice(None), slice(None), *[slice(c, c + n // 2) for c, n in zip(corner, size)])
            out.append(F.interpolate(x[tile], size=size, mode=interp, align_corners=False))
        return torch.stack(out, dim=1)

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, V, d)`` vectors of every query variant of every image, ``V = n_variants``; variant 0 = :meth:`embed`.

        The index, calibration and safeguard take the smallest distance over the variants
        (:func:`monai_synth.privacy.spaces.embed_variants`). Variant 0 is computed by :meth:`embed` itself, so
        it is bit-identical to it whatever the batch composition; the others are computed in batches of whole
        images, so a vector never depends on another image either.
        """
        plain = self.embed(images)
        n_var = self.n_variants - 1
        if n_var == 0:
            return plain[:, None, :]
        x = as_image_batch(images, self.spatial_dims)
        per_pass = max(1, self.batch_size // n_var)
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], per_pass):
                chunk = self._variants(self._resample(x[start : start + per_pass]))
                flat = chunk.reshape(chunk.shape[0] * n_var, *chunk.shape[2:])
                out.append(self.network(flat.to(self.device)).float().cpu())
        others = torch.cat(out).numpy().astype(np.float32, copy=False).reshape(x.shape[0], n_var, self.dim)
        if not np.isfinite(others).all():
            raise ValueError("the embedding network produced NaN/Inf vectors; the weights are unusable.")
        return np.concatenate([plain[:, None, :], others], axis=1)

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights, config, data fingerprint, query variants and training facts to ``path`` atomically.

        The file is written to a temporary sibling and renamed over ``path`` (``os.replace``), so a crash
        never leaves a truncated weights file under the final name. Returns the path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": _FORMAT,
            "version": self._format_version,
            "config": self.config,
            "spatial_size": list(self.spatial_size),
            "data_fingerprint": self.data_fingerprint,
            "training": self.training,
            "zooms": list(self.zooms),
            "variants": list(self.variants),
            "variant_shift": self.variant_shift,
            "fingerprint": self.fingerprint(),
            "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
        }
        with atomic_file(path, durable=True) as tmp:
            torch.save(payload, tmp)
        return path

    @classmethod
    def from_weights(
        cls,
        path: str | os.PathLike,
        expected_data_fingerprint: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        zooms: Sequence[float] | None = None,
        variants: Sequence[str] | None = None,
    ) -> EmbeddingSpace:
        """Load weights written by :meth:`save` (format version 1 or 2).

        Args:
            path: the weights file.
            expected_data_fingerprint: when given, refuse weights trained on other data (pass the fingerprint of
                the training datalist the index is built from).
            device: where to run the network.
            batch_size: images per forward pass in :meth:`embed`.
            zooms: query zooms to use instead of the saved ones (files written before zooms existed load with
                ``(1.0,)``); the stored fingerprint is checked against the saved ones first.
            variants: query variants to use instead of the saved ones (version-1 files load with none); checked
                after the stored fingerprint, like ``zooms``.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            EmbeddingWeightsError: if the file is unreadable or corrupt, is not an embedding weights file, has a
                format version this code does not read, its content does not match its stored fingerprint, or it
                was trained on other data.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"embedding weights not found at {path}; train them with `monai-synth train-embedding`."
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EmbeddingWeightsError(f"cannot read embedding weights {path} (corrupt or truncated?): {e}") from e
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise EmbeddingWeightsError(f"{path} is not a monai_synth embedding weights file.")
        version = payload.get("version")
        if version not in _READABLE_VERSIONS:
            raise EmbeddingWeightsError(
                f"{path} has embedding format version {version}; this version of monai_synth reads versions "
                f"{', '.join(map(str, _READABLE_VERSIONS))}. Retrain the embedding with this version "
                "(`monai-synth train-embedding`)."
            )
        try:
            config = dict(payload["config"])
            network = PatientEmbeddingNet(**config)
            network.load_state_dict(payload["state_dict"])
            space = cls(
                network,
                spatial_size=payload["spatial_size"],
                data_fingerprint=payload["data_fingerprint"],
                config=config,
                training=payload.get("training"),
                device=device,
                batch_size=batch_size,
                zooms=payload.get("zooms", cls._DEFAULT_ZOOMS),
                variants=payload.get("variants", ()),
                variant_shift=payload.get("variant_shift", 0.1),
            )
            space._format_version = int(version)
        except (KeyError, TypeError, RuntimeError, ValueError) as e:
            raise EmbeddingWeightsError(f"embedding weights {path} are incomplete or inconsistent: {e}") from e
        if space.fingerprint() != payload.get("fingerprint"):
            raise EmbeddingWeightsError(
                f"embedding weights {path} do not match their stored fingerprint (modified or damaged); retrain them."
            )
        if expected_data_fingerprint is not None and space.data_fingerprint != str(expected_data_fingerprint):
            raise EmbeddingWeightsError(
                f"embedding weights {path} were trained on data with fingerprint {space.data_fingerprint[:16]}..., "
                f"not the expected {str(expected_data_fingerprint)[:16]}...; it must know every training patient. "
                "Leave the weights out and the embedding is trained on exactly these training images (the bundle: "
                "`--embedding_weights None`, saved to `embedding_out`; `monai-synth guard`: no `--embedding-weights`), "
                "or train it on the same training datalist with `monai-synth train-embedding --train ...`."
            )
        if zooms is not None:
            space.zooms = _check_zooms(zooms)
        if variants is not None:
            space.variants, space.variant_shift = _check_variants(variants, space.variant_shift)
        return space

    def __repr__(self) -> str:
        return (
            f"EmbeddingSpace(spatial_size={self.spatial_size}, dim={self.dim}, zooms={self.zooms}, "
            f"variants={self.variants}, data_fingerprint={self.data_fingerprint[:12]}...)"
        )


def _batches(sampler: PatientBatchSampler) -> Iterator[list[int]]:
    """The sampler's batches, pass after pass, each pass in the order of its own epoch number."""
    for sampler_epoch in itertools.count():
        sampler.set_epoch(sampler_epoch)
        yield from sampler


def _working_size(spatial_size: Sequence[int], working_size: int | Sequence[int] | None) -> tuple[int, ...]:
    nd = len(spatial_size)
    if working_size is None:
        cap = (_WORKING_SIZE[nd],) * nd
    elif isinstance(working_size, int):
        cap = (int(working_size),) * nd
    else:
        cap = tuple(int(w) for w in working_size)
    if len(cap) != nd or min(cap) < 1:
        raise ValueError(f"working_size must be a positive int or {nd} positive ints, got {working_size}.")
    return tuple(min(int(s), c) for s, c in zip(spatial_size, cap))


def train_embedding(
    images: torch.Tensor | np.ndarray,
    patient_ids: Sequence[str],
    spatial_dims: int,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 64,
    views_per_patient: int = 4,
    seed: int = 0,
    out_dim: int = 128,
    channels: Sequence[int] = (16, 32, 64, 128),
    num_res_units: int = 1,
    lr: float = DEFAULT_LR,
    weight_decay: float = 1e-4,
    temperature: float = 0.1,
    augmentation_strength: float | None = None,
    max_shift: float | None = None,
    data_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    zooms: Sequence[float] = EmbeddingSpace._DEFAULT_ZOOMS,
    views_per_image: int = 12,
    patient_weight: float = 0.5,
    instance_scale: float = 32.0,
    working_size: int | Sequence[int] | None = None,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    variant_shift: float = 0.1,
    augment_group: int = 4,
) -> EmbeddingSpace:
    """Train the copy-detection / re-identification embedding on the training set.

    Every batch holds ``views_per_patient`` altered views of each of ``batch_size // views_per_patient`` patients
    (:class:`PatientBatchSampler`; a patient's views cycle through its images, so an image with few siblings gets
    several views). Two losses pull the right views together:

    * instance: a cosine classifier with one learned centre per training image (scale ``instance_scale``) puts
      every altered copy of an image (:func:`copy_augmentations`) next to that image's centre and away from all
      other images' centres;
    * patient: :class:`SupervisedContrastiveLoss` over the batch with the patient as label, weighted by
      ``patient_weight``, pulls a patient's repeat studies (another pose, other noise) together.

    The images are first resampled to the working size (at most 32 pixels per axis in 2D, 16 in 3D by default),
    the way :class:`EmbeddingSpace` resamples its queries. Alterations that the returned space's query ``variants``
    undo exactly (flips, quarter turns, inversion) are not trained. AdamW with a one-cycle learning-rate schedule.

    The run is deterministic from ``seed`` (for a given number of torch threads): the network's initialisation, the
    batch order and the augmentations use their own seeded generators, and the global torch RNG state is restored
    afterwards.

    Args:
        images: ``(N, C, *spatial)`` training images in model space (about [-1, 1]), all of one size.
        patient_ids: patient identity of each image.
        spatial_dims: 2 or 3.
        epochs: passes over the data; one epoch shows every training image about ``views_per_image`` times, each
            time altered differently. The training time grows linearly with epochs x views_per_image x images.
        batch_size: views per step.
        views_per_patient: views of each patient per batch (>= 2).
        seed: random seed.
        out_dim: length of the embedding.
        channels: channels of the network's residual stages.
        num_res_units: sub-units per residual stage.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay of the network.
        temperature: temperature of the patient loss.
        augmentation_strength: scale of the copy augmentations (see :func:`copy_augmentations`); default 1.0 for
            images and 0.3 for volumes: every alteration at full strength in three dimensions (rotations about
            three axes, crops in three) is more than a few hundred CPU steps can learn, and the network then maps
            every volume to nearly one vector.
        max_shift: largest training shift as a fraction of the field of view (see :func:`copy_augmentations`);
            default 0.15 for images, 0.05 for volumes, for the same reason.
        data_fingerprint: fingerprint of the data, stored with the weights (pass the training datalist's
            fingerprint so that the index can check it); default: a sha256 of ``images`` and ``patient_ids``.
        device: training device (default CPU).
        zooms: query zooms of the returned space (see :class:`EmbeddingSpace`).
        views_per_image: altered views of every training image per epoch (on average).
        patient_weight: weight of the patient loss next to the instance loss (0 switches it off).
        instance_scale: scale of the cosine classifier's logits; larger values make tighter clusters.
        working_size: largest size per axis the network sees (int or one per axis); default 32 (2D) / 16 (3D).
        variants: query variants of the returned space (see :class:`EmbeddingSpace`).
        variant_shift: displacement of the ``"shift"`` variants, as a fraction of the field of view.
        augment_group: views augmented together, stacked as channels, with one draw of the geometric parameters
            (views of different patients; each keeps its own noise and composite partners): MONAI's per-call
            overhead dominates on small images, so groups of 4 cut the augmentation time about 4-fold. 1 draws
            anew for every view.

    Returns:
        the trained :class:`EmbeddingSpace`.

    Raises:
        ValueError: for inconsistent shapes or lengths, fewer than 2 patients, NaN/Inf images, images smaller
            than the network can down-sample, or invalid hyper-parameters.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    x = as_image_batch(images, spatial_dims)
    check_finite(x)
    ids = [str(p) for p in patient_ids]
    if len(ids) != x.shape[0]:
        raise ValueError(f"got {x.shape[0]} images but {len(ids)} patient ids; give one id per image.")
    if len(set(ids)) < 2:
        raise ValueError("need images of at least 2 different patients to learn patient identities.")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs}.")
    if int(views_per_patient) < 2:
        raise ValueError(f"views_per_patient must be at least 2, got {views_per_patient}.")
    if int(batch_size) < 2 * int(views_per_patient):
        raise ValueError(
            f"batch_size ({batch_size}) must hold at least 2 patients x views_per_patient ({views_per_patient})."
        )
    if int(views_per_image) < 1:
        raise ValueError(f"views_per_image must be a positive integer, got {views_per_image}.")
    if not float(lr) > 0:
        raise ValueError(f"lr must be > 0, got {lr}.")
    if not float(patient_weight) >= 0:
        raise ValueError(f"patient_weight must be >= 0, got {patient_weight}.")
    if not float(instance_scale) > 0:
        raise ValueError(f"instance_scale must be > 0, got {instance_scale}.")
    if int(augment_group) < 1:
        raise ValueError(f"augment_group must be a positive integer, got {augment_group}.")
    zooms = _check_zooms(zooms)  # before training, not after it
    variants, variant_shift = _check_variants(variants, variant_shift)
    if augmentation_strength is None:
        augmentation_strength = _STRENGTH[spatial_dims]
    if max_shift is None:
        max_shift = _MAX_SHIFT[spatial_dims]
    size = _working_size(tuple(x.shape[2:]), working_size)
    config = {
        "spatial_dims": int(spatial_dims),
        "in_channels": int(x.shape[1]),
        "channels": [int(c) for c in channels],
        "out_dim": int(out_dim),
        "num_res_units": int(num_res_units),
        "norm": "BATCH",
        "input_norm": "rank",
    }
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if data_fingerprint is None:
        data_fingerprint = _hash_tensor_data(x, ids)

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        network = PatientEmbeddingNet(**config)
        if min(size) < network.min_size:
            raise ValueError(
                f"images of size {tuple(x.shape[2:])} (working size {size}) are too small for "
                f"{len(config['channels'])} stages; use images of at least {network.min_size} pixels per axis or "
                "fewer channels."
            )
        network = network.to(dev).train()
        centres = torch.nn.Parameter(0.01 * torch.randn(x.shape[0], int(out_dim), device=dev))

        work = _resize(x, size)
        skip = [v for v in ("flip", "transpose", "invert") if v in variants]
        augment = copy_augmentations(size, augmentation_strength, max_shift, pool=work, skip=skip)
        augment.set_random_state(seed=seed)
        sampler = PatientBatchSampler(
            ids, int(batch_size) // int(views_per_patient), views_per_patient=int(views_per_patient), seed=seed
        )
        batches = _batches(sampler)
        label_of = {p: i for i, p in enumerate(sorted(set(ids)))}
        patients_all = torch.tensor([label_of[p] for p in ids])
        steps_per_epoch = max(1, math.ceil(int(views_per_image) * x.shape[0] / int(batch_size)))
        total = int(epochs) * steps_per_epoch

        patient_loss = SupervisedContrastiveLoss(temperature=temperature)
        optimizer = torch.optim.AdamW(
            [
                {"params": list(network.parameters()), "weight_decay": float(weight_decay)},
                {"params": [centres], "weight_decay": 0.0},  # centres are unit directions: nothing to decay
            ],
            lr=lr,
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.15)
        history: list[float] = []
        start = time.monotonic()
        logger.info(
            "training the embedding on %d images of %d patients at %s: %d epochs of %d steps",
            x.shape[0],
            len(label_of),
            "x".join(map(str, size)),
            int(epochs),
            steps_per_epoch,
        )
        for epoch in range(int(epochs)):
            sums = np.zeros(2)
            for _ in range(steps_per_epoch):
                idx = next(batches)
                views = _augment_batch(augment, work, idx, int(augment_group)).to(dev)
                z = network(views)
                target = torch.as_tensor(idx, device=dev)
                inst = F.cross_entropy(float(instance_scale) * (z @ F.normalize(centres, dim=1).T), target)
                pat = patient_loss(z, patients_all[idx].to(dev)) if patient_weight else z.sum() * 0.0
                loss = inst + float(patient_weight) * pat
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                sums += (float(inst.detach()), float(pat.detach()))
            mean = sums / steps_per_epoch
            history.append(float(mean[0] + float(patient_weight) * mean[1]))
            logger.info(
                "embedding epoch %d/%d: loss %.4f (instance %.4f, patient %.4f), %.0f s",
                epoch + 1,
                int(epochs),
                history[-1],
                mean[0],
                mean[1],
                time.monotonic() - start,
            )

    training = {
        "epochs": int(epochs),
        "steps": total,
        "batch_size": int(batch_size),
        "views_per_patient": int(views_per_patient),
        "views_per_image": int(views_per_image),
        "seed": int(seed),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "temperature": float(temperature),
        "patient_weight": float(patient_weight),
        "instance_scale": float(instance_scale),
        "augmentation_strength": float(augmentation_strength),
        "max_shift": float(max_shift),
        "augment_group": int(augment_group),
        "input_size": [int(s) for s in x.shape[2:]],
        "n_images": int(x.shape[0]),
        "n_patients": len(label_of),
        "loss_history": history,
        "seconds": round(time.monotonic() - start, 3),
    }
    return EmbeddingSpace(
        network.eval(),
        size,
        data_fingerprint,
        config,
        training=training,
        device=dev,
        zooms=zooms,
        variants=variants,
        variant_shift=variant_shift,
    )
