"""The learned ``embedding`` privacy space: a patient re-identification embedding.

The pixel space catches exact and lightly altered copies, but a generator that memorised a training patient
can reproduce that patient's anatomy in a new pose, cropped, with other noise or contrast. To catch "looks like
training patient P" we learn an embedding in which all images of one patient (repeat studies and augmented
copies) are close and images of different patients are far apart, trained with a supervised contrastive loss
where the patient identity defines the positives (Khosla et al., "Supervised Contrastive Learning",
NeurIPS 2020, https://arxiv.org/abs/2004.11362).

Vectors are L2-normalised, so the distance is ``1 - cosine`` like every privacy space (see
:mod:`monai_synth.privacy.spaces`), and the same index / calibration / safeguard code serves it. The weights are
saved with a fingerprint of the data they were trained on; loading them for another training set is refused,
because an embedding that never saw a patient does not know what that patient looks like.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
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
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)
from torch.nn.modules.loss import _Loss
from torch.utils.data import Sampler

from monai_synth.atomic import atomic_file
from monai_synth.networks.embedding import PatientEmbeddingNet
from monai_synth.privacy.spaces import as_image_batch, check_finite

__all__ = [
    "EmbeddingSpace",
    "EmbeddingWeightsError",
    "PatientBatchSampler",
    "SupervisedContrastiveLoss",
    "copy_augmentations",
    "train_embedding",
]

logger = logging.getLogger(__name__)

_FORMAT = "monai_synth.embedding"
_VERSION = 1


class EmbeddingWeightsError(ValueError):
    """Embedding weights that must not be used: corrupt, not ours, modified, or trained on other data."""


class SupervisedContrastiveLoss(_Loss):
    """Supervised contrastive loss ("SupCon", L_out form) of Khosla et al., NeurIPS 2020.

    For every anchor ``i`` with at least one positive (another item with the same label in the batch)::

        loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )

    Why not :class:`monai.losses.ContrastiveLoss`: MONAI's loss is SimCLR's NT-Xent over exactly two views of
    each item (one positive per anchor). A patient has several repeat studies, and all of them (and their
    augmented copies) should pull together, which needs any number of positives per anchor; that is SupCon.
    It is a dozen lines, written here with a log-sum-exp for numerical stability.

    Args:
        temperature: softmax temperature ``T`` (> 0); 0.1 is the paper's default.

    Raises:
        ValueError: for a non-positive temperature, or inputs that are not ``(B, d)`` features with ``(B,)``
            labels.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args:
            features: ``(B, d)`` embeddings; they are L2-normalised here (a no-op when already unit length).
            labels: ``(B,)`` integer identities; items with equal labels are positives of each other.

        Returns:
            scalar mean loss over anchors that have a positive (0 when none has).
        """
        if features.ndim != 2:
            raise ValueError(f"features must have shape (B, d), got {tuple(features.shape)}.")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}.")
        z = F.normalize(features, dim=1)
        logits = z @ z.T / self.temperature
        self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = (labels[:, None] == labels[None, :]) & ~self_mask
        n_pos = pos.sum(dim=1)
        has_pos = n_pos > 0
        if not bool(has_pos.any()):
            return features.sum() * 0.0
        pos_log_prob = log_prob.masked_fill(~pos, 0.0).sum(dim=1)
        return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()


class PatientBatchSampler(Sampler[list[int]]):
    """Batches of ``patients_per_batch`` patients with ``views_per_patient`` items each ("P x K" sampling).

    Contrastive learning with identities as positives needs several images of each patient in every batch,
    and many patients per batch as negatives; a random batch of a 50-patient cohort would rarely hold two
    images of one patient. One epoch visits every patient once (in a random order); a patient's views cycle
    through its images in a random order, so all of its repeat studies are seen, and are repeated (each repeat
    augmented differently) when it has fewer images than views. The last group is topped up with other
    patients so that every batch has the same number of patients.

    Args:
        patient_ids: identity of every item of the dataset.
        patients_per_batch: P, at least 2 (a batch needs negatives); capped at the number of patients.
        views_per_patient: K, at least 2 (an anchor needs a positive).
        seed: seed of the sampler's own generator; call :meth:`set_epoch` for a new order each epoch.
    """

    def __init__(
        self, patient_ids: Sequence[str], patients_per_batch: int, views_per_patient: int = 4, seed: int = 0
    ) -> None:
        groups: dict[str, list[int]] = {}
        for i, pid in enumerate(patient_ids):
            groups.setdefault(str(pid), []).append(i)
        if len(groups) < 2:
            raise ValueError(f"need images of at least 2 patients to learn identities, got {len(groups)}.")
        if int(patients_per_batch) < 2:
            raise ValueError(f"patients_per_batch must be at least 2, got {patients_per_batch}.")
        if int(views_per_patient) < 2:
            raise ValueError(f"views_per_patient must be at least 2, got {views_per_patient}.")
        self.groups = [groups[k] for k in sorted(groups)]
        self.patients_per_batch = min(int(patients_per_batch), len(self.groups))
        self.views_per_patient = int(views_per_patient)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (deterministic from ``seed`` and ``epoch``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.groups) / self.patients_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.groups)).tolist()
        p = self.patients_per_batch
        for start in range(0, len(order), p):
            chosen = order[start : start + p]
            if len(chosen) < p:
                rest = [g for g in order if g not in chosen]
                chosen += rng.choice(rest, size=p - len(chosen), replace=False).tolist()
            batch: list[int] = []
            for g in chosen:
                items = self.groups[g]
                perm = rng.permutation(len(items))
                batch += [items[perm[k % len(items)]] for k in range(self.views_per_patient)]
            yield batch


def copy_augmentations(spatial_size: Sequence[int], strength: float = 1.0, max_shift: float = 0.15) -> Compose:
    """MONAI random transforms that make the altered copies the safeguard must still catch.

    Each is the kind of change a generator could make to a memorised image: mirror flips, small shifts and
    rotations, crop-and-resize, additive noise, and intensity gain/offset. Training with them makes a copy
    land next to its source patient; the test-suite checks that on held-out copies.

    Args:
        spatial_size: size of the (channel-first) images the pipeline receives and returns.
        strength: scales every range but the shift (1.0 = rotation up to ~6 degrees, zoom 10%, crops down to
            80% of each side, noise std up to 0.05 in model space, gain 0.75-1.25, offset 0.1). Much stronger
            changes (noise especially: tissue contrast in model space is often ~0.1) make the contrastive task so
            hard at the start that small cohorts learn slowly.
        max_shift: largest translation, as a fraction of the field of view per axis. Kept separate from
            ``strength`` because a CNN is least invariant to shifts, and a shifted copy is the cheapest copy.

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
    rotate = (0.1 * s,) if nd == 2 else (0.1 * s,) * 3
    crop_resize = Compose(
        [
            RandScaleCrop(roi_scale=max(0.2, 1.0 - 0.2 * s), max_roi_scale=1.0, random_center=True, random_size=True),
            Resize(spatial_size=size, mode="bilinear" if nd == 2 else "trilinear", anti_aliasing=False),
        ]
    )
    return Compose(
        [
            *[RandFlip(prob=0.5, spatial_axis=a) for a in range(nd)],
            OneOf([crop_resize, Identity()], weights=[0.5, 0.5]),
            RandAffine(
                prob=0.8,
                rotate_range=rotate,
                translate_range=tuple(float(max_shift) * n for n in size),
                scale_range=(0.1 * s,) * nd,
                padding_mode="border",
                mode="bilinear",
            ),
            RandGaussianNoise(prob=0.5, std=0.05 * s),
            RandScaleIntensity(factors=0.25 * s, prob=0.5),
            RandShiftIntensity(offsets=0.1 * s, prob=0.5),
        ]
    )


def _augment_batch(augment: Compose, images: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """Independently augmented copies of ``images[indices]`` as one plain tensor.

    Metadata tracking is switched off meanwhile: the views are thrown away after one step, and MetaTensor
    bookkeeping costs more than the transforms themselves on small images.
    """
    previous = get_track_meta()
    set_track_meta(False)
    try:
        return torch.stack([torch.as_tensor(augment(images[i])) for i in indices])
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


class EmbeddingSpace:
    """A trained :class:`~monai_synth.networks.embedding.PatientEmbeddingNet` as a privacy space.

    Implements :class:`monai_synth.privacy.spaces.PrivacySpace`: ``embed`` maps ``(B, C, *spatial)`` model-space
    images to ``(B, d)`` float32 unit vectors (distance = 1 - cosine), resampling them to the training size
    first. The network is always run in evaluation mode without gradients, so a vector depends only on its
    image. Build one with :func:`train_embedding` or :meth:`from_weights`; the network is treated as frozen.

    Args:
        network: the trained encoder.
        spatial_size: spatial size the network was trained at; inputs of other sizes are resampled to it.
        data_fingerprint: fingerprint of the training data the weights saw (e.g. the datalist fingerprint).
        config: keyword arguments that rebuild ``network`` (``spatial_dims``, ``in_channels``, ``channels``,
            ``out_dim``, ``num_res_units``).
        training: facts about the training run kept with the weights (epochs, seed, loss history, ...).
        device: where to run the network (default CPU).
        batch_size: images per forward pass in :meth:`embed`.
        zooms: scale factors of the query variants of :meth:`embed_variants` (1.0, the plain query, always comes
            first). A factor ``z < 1`` shrinks the query about its centre (borders replicated), which undoes a copy
            cropped to ``z`` of its side length and resized back: apparent body size is also what tells patients
            apart, so the network learns little scale invariance and such copies are otherwise poorly
            re-identified. Only queries are zoomed, so the index keeps one row per training image. Each extra
            variant is also another chance for a wrong patient to come nearest (a shrunk query looks like a
            smaller patient), so use few factors, matched to the crops to be caught.
    """

    name = "embedding"
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

    @property
    def spatial_dims(self) -> int:
        return self.network.spatial_dims

    @property
    def dim(self) -> int:
        """Length of the vectors."""
        return self.network.out_dim

    def fingerprint(self) -> str:
        """sha256 of the weights, the data fingerprint, the network config and the input size.

        Changes whenever the mapping from images to vectors could change, so an index built with other
        weights (or weights trained on other data) is refused. Query zooms other than the default are included:
        they change the distances, and so the thresholds calibrated with them.
        """
        h = hashlib.sha256()
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "config": self.config,
            "spatial_size": list(self.spatial_size),
            "data_fingerprint": self.data_fingerprint,
        }
        if self.zooms != self._DEFAULT_ZOOMS:  # left out by default, so fingerprints of earlier weights still hold
            meta["zooms"] = list(self.zooms)
        h.update(json.dumps(meta, sort_keys=True).encode())
        for key, value in sorted(self.network.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) == self.spatial_size:
            return x
        b, c = x.shape[:2]
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        # MONAI's Resize is channel-wise, so the batch can ride along as channels; anti-aliasing avoids
        # aliasing when large images are shrunk to the training size.
        resize = Resize(self.spatial_size, mode=mode, anti_aliasing=True)
        out = resize(x.reshape(b * c, *x.shape[2:]))
        return torch.as_tensor(out).reshape(b, c, *self.spatial_size)

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

    def _zoomed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B * Z', C, *spatial)``: every image scaled about its centre by every zoom but the identity.

        ``z < 1`` shrinks the content (the output point ``p`` samples the input at ``p / z``); the freed margin
        replicates the border, which for model-space images is mostly background.
        """
        zooms = self.zooms[1:]
        n, nd = x.shape[0], self.spatial_dims
        theta = torch.zeros(len(zooms), nd, nd + 1)
        for k, z in enumerate(zooms):
            theta[k, :, :nd] = torch.eye(nd) / z
        src = x.repeat_interleave(len(zooms), dim=0)
        coords = F.affine_grid(theta.repeat(n, 1, 1), list(src.shape), align_corners=False)
        return F.grid_sample(src, coords, mode="bilinear", padding_mode="border", align_corners=False)

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, V, d)`` vectors of every zoom variant of every image, ``V = len(zooms)``; variant 0 = :meth:`embed`.

        The index, calibration and safeguard take the smallest distance over the variants
        (:func:`monai_synth.privacy.spaces.embed_variants`). Variant 0 is computed by :meth:`embed` itself, so
        it is bit-identical to it whatever the batch composition.
        """
        plain = self.embed(images)
        if len(self.zooms) == 1:
            return plain[:, None, :]
        x = as_image_batch(images, self.spatial_dims)
        n_var = len(self.zooms) - 1
        per_pass = max(1, self.batch_size // n_var)
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], per_pass):
                chunk = self._zoomed(self._resample(x[start : start + per_pass]))
                out.append(self.network(chunk.to(self.device)).float().cpu())
        zoomed = torch.cat(out).numpy().astype(np.float32, copy=False).reshape(x.shape[0], n_var, self.dim)
        if not np.isfinite(zoomed).all():
            raise ValueError("the embedding network produced NaN/Inf vectors; the weights are unusable.")
        return np.concatenate([plain[:, None, :], zoomed], axis=1)

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights, config, data fingerprint and training facts to ``path`` atomically.

        The file is written to a temporary sibling and renamed over ``path`` (``os.replace``), so a crash
        never leaves a truncated weights file under the final name. Returns the path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "config": self.config,
            "spatial_size": list(self.spatial_size),
            "data_fingerprint": self.data_fingerprint,
            "training": self.training,
            "zooms": list(self.zooms),
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
    ) -> EmbeddingSpace:
        """Load weights written by :meth:`save`.

        Args:
            path: the weights file.
            expected_data_fingerprint: when given, refuse weights trained on other data (pass the fingerprint of
                the training datalist the index is built from).
            device: where to run the network.
            batch_size: images per forward pass in :meth:`embed`.
            zooms: query zooms to use instead of the saved ones (files written before zooms existed load with
                ``(1.0,)``); the stored fingerprint is checked against the saved ones first.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            EmbeddingWeightsError: if the file is unreadable or corrupt, is not an embedding weights file, its
                content does not match its stored fingerprint, or it was trained on other data.
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
        if payload.get("version") != _VERSION:
            raise EmbeddingWeightsError(
                f"{path} has embedding format version {payload.get('version')}; this version reads {_VERSION}."
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
            )
        except (KeyError, TypeError, RuntimeError, ValueError) as e:
            raise EmbeddingWeightsError(f"embedding weights {path} are incomplete or inconsistent: {e}") from e
        if space.fingerprint() != payload.get("fingerprint"):
            raise EmbeddingWeightsError(
                f"embedding weights {path} do not match their stored fingerprint (modified or damaged); retrain them."
            )
        if expected_data_fingerprint is not None and space.data_fingerprint != str(expected_data_fingerprint):
            raise EmbeddingWeightsError(
                f"embedding weights {path} were trained on data with fingerprint {space.data_fingerprint[:16]}..., "
                f"not the expected {str(expected_data_fingerprint)[:16]}...; retrain the embedding on this training "
                "set (`monai-synth train-embedding`) so it knows every training patient."
            )
        if zooms is not None:
            space.zooms = _check_zooms(zooms)
        return space

    def __repr__(self) -> str:
        return (
            f"EmbeddingSpace(spatial_size={self.spatial_size}, dim={self.dim}, "
            f"zooms={self.zooms}, data_fingerprint={self.data_fingerprint[:12]}...)"
        )


def train_embedding(
    images: torch.Tensor | np.ndarray,
    patient_ids: Sequence[str],
    spatial_dims: int,
    epochs: int = 20,
    batch_size: int = 64,
    views_per_patient: int = 4,
    seed: int = 0,
    out_dim: int = 128,
    channels: Sequence[int] = (16, 32, 64, 128),
    num_res_units: int = 2,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    temperature: float = 0.1,
    augmentation_strength: float = 1.0,
    max_shift: float = 0.15,
    data_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    zooms: Sequence[float] = EmbeddingSpace._DEFAULT_ZOOMS,
) -> EmbeddingSpace:
    """Train the patient re-identification embedding on the training set.

    Every batch holds ``views_per_patient`` augmented views of each of ``batch_size // views_per_patient``
    patients (:class:`PatientBatchSampler`); views of one patient (its repeat studies and their flipped, shifted,
    cropped, noised, rescaled copies, see :func:`copy_augmentations`) are positives of each other and everything
    else is a negative (:class:`SupervisedContrastiveLoss`). AdamW with a cosine learning-rate decay.

    The run is deterministic from ``seed``: the network's initialisation, the batch order and the augmentations
    use their own seeded generators (the global torch RNG state is restored afterwards).

    Args:
        images: ``(N, C, *spatial)`` training images in model space (about [-1, 1]), all of one size.
        patient_ids: patient identity of each image.
        spatial_dims: 2 or 3.
        epochs: passes over the patients (each pass shows every patient ``views_per_patient`` times).
        batch_size: images per batch.
        views_per_patient: augmented views of each patient per batch (>= 2).
        seed: random seed.
        out_dim: length of the embedding.
        channels: channels of the network's residual stages.
        num_res_units: sub-units per residual stage.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        temperature: SupCon temperature.
        augmentation_strength: scale of the copy augmentations (see :func:`copy_augmentations`).
        max_shift: largest training shift as a fraction of the field of view (see :func:`copy_augmentations`).
        data_fingerprint: fingerprint of the data, stored with the weights (pass the training datalist's
            fingerprint so that the index can check it); default: a sha256 of ``images`` and ``patient_ids``.
        device: training device (default CPU).
        zooms: query zooms of the returned space (see :class:`EmbeddingSpace`); they do not change the training.

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
    if not float(lr) > 0:
        raise ValueError(f"lr must be > 0, got {lr}.")
    zooms = _check_zooms(zooms)  # before training, not after it
    spatial_size = tuple(int(s) for s in x.shape[2:])
    config = {
        "spatial_dims": int(spatial_dims),
        "in_channels": int(x.shape[1]),
        "channels": [int(c) for c in channels],
        "out_dim": int(out_dim),
        "num_res_units": int(num_res_units),
    }
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if data_fingerprint is None:
        data_fingerprint = _hash_tensor_data(x, ids)

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        network = PatientEmbeddingNet(**config)
        if min(spatial_size) < network.min_size:
            raise ValueError(
                f"images of size {spatial_size} are too small for {len(config['channels'])} stages; "
                f"use images of at least {network.min_size} pixels per axis or fewer channels."
            )
        network = network.to(dev).train()

        augment = copy_augmentations(spatial_size, augmentation_strength, max_shift)
        augment.set_random_state(seed=seed)
        sampler = PatientBatchSampler(
            ids, int(batch_size) // int(views_per_patient), views_per_patient=int(views_per_patient), seed=seed
        )
        label_of = {p: i for i, p in enumerate(sorted(set(ids)))}
        labels_all = torch.tensor([label_of[p] for p in ids])

        loss_fn = SupervisedContrastiveLoss(temperature=temperature)
        optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(epochs) * len(sampler))
        history: list[float] = []
        for epoch in range(int(epochs)):
            sampler.set_epoch(epoch)
            running = 0.0
            for idx in sampler:
                views = _augment_batch(augment, x, idx).to(dev)
                loss = loss_fn(network(views), labels_all[idx].to(dev))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                running += float(loss.detach())
            history.append(running / len(sampler))
            logger.info("embedding epoch %d/%d: SupCon loss %.4f", epoch + 1, epochs, history[-1])

    training = {
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "views_per_patient": int(views_per_patient),
        "seed": int(seed),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "temperature": float(temperature),
        "augmentation_strength": float(augmentation_strength),
        "max_shift": float(max_shift),
        "n_images": int(x.shape[0]),
        "n_patients": len(label_of),
        "loss_history": history,
    }
    return EmbeddingSpace(
        network.eval(), spatial_size, data_fingerprint, config, training=training, device=dev, zooms=zooms
    )
