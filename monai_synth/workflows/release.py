"""The bundle's release stage: calibrate the privacy safeguard, sample every class through it, write the release.

The judge-write-certify path itself lives in :mod:`monai_synth.privacy` (the safeguard, guarded sampling and the
atomic release writer, also used by ``monai-synth guard``); this module is the bundle-side orchestration around it:
the bundle's datasets and records in, an optional re-identification embedding trained on the bundle's own train
split, a sample grid of what was released, and the MLflow record of the release.

Under ``torch.distributed`` (``torchrun`` with the ``multi_gpu_sample.yaml`` overlay) the release is sharded: every
rank builds the same safeguard (an embedding is trained once, on rank 0, and read by the others; thresholds and index
fingerprints are compared across ranks), samples its share of every class from seeds no other rank uses, and rank 0
alone writes the one release, its certificate and MLflow record from the gathered candidates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_synth.data.datalist import datalist_fingerprint
from monai_synth.engines.checkpoint import checkpoint_fingerprint
from monai_synth.engines.sampler import Generator
from monai_synth.handlers.sample_grid import make_sample_grid, save_grid_png
from monai_synth.privacy.factory import DEFAULT_SPACES, build_spaces, space_name
from monai_synth.privacy.release import VIEWS_PER_IMAGE, GuardedRelease, ReleaseEncoder
from monai_synth.privacy.safeguard import PrivacySafeguard, build_safeguard
from monai_synth.privacy.sampling import GuardedSamplingResult, guarded_sample
from monai_synth.tracking import log_release

__all__ = ["calibrated_safeguard", "guarded_release", "release_grid", "release_requests", "shard_requests"]

logger = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the running ``torch.distributed`` group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_requests(
    requests: Sequence[tuple[Any, int]], rank: int, world_size: int, seed: int, max_retries: int
) -> tuple[list[tuple[Any, int]], int]:
    """One rank's share of a release: its count of every class, and the first seed of its own range.

    Every class is split as evenly as the counts allow (the first ranks take one more), so all ranks work while any
    class is left. :func:`~monai_synth.privacy.sampling.guarded_sample` without ``max_batch`` calls the generator at
    most once per request and attempt, one seed per call, so a rank uses fewer than ``len(requests) * (max_retries +
    1)`` seeds: rank ``r`` starts ``r`` such ranges after ``seed`` and no seed is drawn by two ranks. With one process
    this is ``(requests, seed)`` unchanged.
    """
    share = [
        (cond, int(count) // world_size + (1 if rank < int(count) % world_size else 0)) for cond, count in requests
    ]
    return share, int(seed) + rank * len(requests) * (int(max_retries) + 1)


class _ImageBatches:
    """Re-iterable batches of a MONAI dataset's images as plain float tensors ``(B, C, *spatial)``, in order."""

    def __init__(self, dataset: Any, batch_size: int = 64) -> None:
        self.dataset = dataset
        self.batch_size = int(batch_size)

    def __iter__(self):
        for start in range(0, len(self.dataset), self.batch_size):
            stop = min(start + self.batch_size, len(self.dataset))
            yield torch.stack(
                [
                    torch.as_tensor(self.dataset[i]["image"]).as_subclass(torch.Tensor).float()
                    for i in range(start, stop)
                ]
            )


def calibrated_safeguard(
    train_images: Sequence[Mapping[str, Any]],
    holdout_images: Sequence[Mapping[str, Any]],
    train_records: Sequence[Mapping[str, Any]],
    holdout_records: Sequence[Mapping[str, Any]],
    spaces: Sequence[str] = DEFAULT_SPACES,
    embedding_weights: str | None = None,
    embedding_out: str | os.PathLike | None = None,
    embedding_epochs: int | None = None,
    quantile: float = 0.01,
    floor: float = 0.0,
    seed: int = 0,
    encoder: ReleaseEncoder | None = None,
    cross_patient_images: int | None = None,
    specificity: float | None = None,
    consensus: int | None = None,
) -> PrivacySafeguard:
    """The privacy safeguard of a bundle: every training image indexed in each space, thresholds set on the holdout.

    Args:
        train_images: dataset of the training images in model space (dicts with ``"image"``), in record order.
        holdout_images: dataset of the holdout images in model space, in record order.
        train_records: datalist records of ``train_images`` (patient ids; fingerprint of the training data).
        holdout_records: datalist records of ``holdout_images``.
        spaces: privacy spaces (see :func:`monai_synth.privacy.factory.make_space`).
        embedding_weights: weights of the embedding space, trained on exactly ``train_records`` (checked by their
            data fingerprint: weights that never saw some training patient are refused). ``None`` with an
            ``embedding`` space trains the embedding here, on the training images, and saves it to ``embedding_out``.
        embedding_out: where to save an embedding trained here (``None``: not saved).
        embedding_epochs: training epochs of an embedding trained here (None: its training default).
        quantile: holdout quantile that sets each threshold.
        floor: absolute minimum threshold.
        seed: seed of an embedding trained here.
        encoder: the release's encoder; the holdout is then judged as a released candidate is (every view of its
            stored array), so the calibrated share of refused unseen images holds for the release.
        cross_patient_images: training images that join the holdout as calibration samples (None: as many as the
            spaces need; see :func:`~monai_synth.privacy.safeguard.build_safeguard`).
        specificity: the safeguard's specificity level (None: its default; 0: off).
        consensus: the safeguard's consensus count (None: calibrated; 0: off).

    Raises:
        ValueError: the image datasets and their records differ in length.
    """
    if len(train_images) != len(train_records) or len(holdout_images) != len(holdout_records):
        raise ValueError("the image datasets and their records differ in length; build both from the same split")
    # batches of plain tensors, so the training set never has to sit in memory as one array
    train = _ImageBatches(train_images)
    holdout = _ImageBatches(holdout_images)
    spatial_size = tuple(torch.as_tensor(train_images[0]["image"]).shape[1:])
    data_fp = datalist_fingerprint(train_records)
    train_ids, holdout_ids = ([r["patient_id"] for r in records] for records in (train_records, holdout_records))
    rank, world = _world()
    trains_embedding = not embedding_weights and any(space_name(s) == "embedding" for s in spaces)
    if world > 1 and trains_embedding and not embedding_out:
        raise ValueError("a sharded release trains its embedding once, on rank 0: give embedding_out to share it")
    if world > 1 and rank != 0:
        torch.distributed.barrier()  # rank 0 trains the embedding (if any) and saves it for the others
        if trains_embedding:
            embedding_weights, embedding_out = str(embedding_out), None
    built = build_spaces(
        spaces,
        len(spatial_size),
        spatial_size,
        train,
        train_ids,
        data_fp,
        embedding_weights,
        embedding_epochs,
        seed,
        embedding_out,
    )
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    views = None if encoder is None else encoder.model_views
    safeguard = build_safeguard(
        built,
        train,
        train_ids,
        holdout,
        holdout_ids,
        data_fp,
        quantile=quantile,
        floor=floor,
        batch_size=VIEWS_PER_IMAGE * 16,  # the views of 16 images at once
        views=views,
        cross_patient_images=cross_patient_images,
        specificity=specificity,
        consensus=consensus,
    )
    if world > 1:
        _check_same_safeguard(safeguard, world)
    logger.info(f"privacy thresholds calibrated on {len(holdout_images)} holdout images: {safeguard.thresholds}")
    return safeguard


def _label_of(condition: Any) -> Any:
    return condition.get("label") if isinstance(condition, Mapping) else condition


def release_requests(
    labels: Sequence[str],
    num_per_class: int,
    condition_keys: Sequence[str] = (),
    defaults: Mapping[str, float] | None = None,
    conditions_csv: str | os.PathLike | None = None,
) -> list[tuple[Any, int]]:
    """What a release asks the generator for: ``(condition, count)`` pairs.

    Without ``conditions_csv``: ``num_per_class`` images of every label, with the numeric conditions (if the model
    has any) at ``defaults`` (the training split's means). With it: one request per CSV row, columns ``label``, one
    per condition key and optionally ``count`` (images of that row, default 1), so each image's values are asked
    for explicitly and recorded in the certificate.

    Raises:
        ValueError: an unknown label, a missing condition column or a value that is not a finite number (naming the
            row), or a model without numeric conditions given a CSV with extra columns it cannot use.
    """
    keys = [str(k) for k in condition_keys]
    if not conditions_csv:
        if int(num_per_class) < 1:
            raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
        if not keys:
            return [(label, int(num_per_class)) for label in labels]
        fill = {k: float((defaults or {})[k]) for k in keys}
        return [({"label": label, **fill}, int(num_per_class)) for label in labels]
    import csv

    with open(conditions_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{conditions_csv} lists no conditions; write one row per request (label, {', '.join(keys)})")
    unused = sorted(set(rows[0]) - {"label", "count", *keys})
    if unused:
        raise ValueError(
            f"{conditions_csv} has columns {unused} the model is not conditioned on (condition_keys {keys})"
        )
    requests: list[tuple[Any, int]] = []
    for i, row in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
        label = str(row.get("label", "")).strip()
        if label not in [str(v) for v in labels]:
            raise ValueError(f"{conditions_csv} line {i}: label {label!r} is not one of {list(labels)}")
        condition: dict[str, Any] = {"label": label}
        for key in keys:
            try:
                value = float(row[key])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{conditions_csv} line {i}: {key} must be a number, got {row.get(key)!r}") from None
            if not np.isfinite(value):
                raise ValueError(f"{conditions_csv} line {i}: {key} = {value} is not finite")
            condition[key] = value
        count = int(row.get("count") or 1)
        if count < 1:
            raise ValueError(f"{conditions_csv} line {i}: count must be >= 1, got {count}")
        requests.append((condition if keys else label, count))
    return requests


def _check_same_safeguard(safeguard: PrivacySafeguard, world: int) -> None:
    """Refuse a sharded release whose ranks would judge against different indexes or thresholds.

    Raises:
        RuntimeError: naming the ranks that differ from rank 0.
    """
    mine = {
        "thresholds": dict(safeguard.thresholds),
        "fingerprints": dict(safeguard.fingerprints),
        "specificity": safeguard.specificity,
        "consensus": safeguard.consensus,
    }
    every: list[Any] = [None] * world
    torch.distributed.all_gather_object(every, mine)
    differ = [r for r, theirs in enumerate(every) if theirs != every[0]]
    if differ:
        raise RuntimeError(
            f"ranks {differ} built another privacy safeguard than rank 0 ({every[differ[0]]} vs {every[0]}); a sharded "
            "release must judge every candidate against the same index and thresholds. Run the release in one process"
        )


def _gather_shards(result: GuardedSamplingResult, labels: Sequence[str], rank: int, world: int):
    """The ranks' guarded-sampling results merged on rank 0 (class by class, rank by rank); ``None`` elsewhere."""
    released = iter(result.images)
    pairs = [(rec, next(released) if rec.passed else None) for rec in result.records]
    shards: list[Any] = [None] * world if rank == 0 else None
    torch.distributed.gather_object((pairs, result.requested), shards, dst=0)
    if rank != 0:
        return None
    merged = [
        pair
        for label in labels
        for shard, _ in shards
        for pair in shard
        if str(_label_of(pair[0].condition)) == str(label)
    ]
    lost = sum(len(shard) for shard, _ in shards) - len(merged)
    if lost:
        raise RuntimeError(f"{lost} gathered candidates have a condition outside the released classes {list(labels)}")
    return GuardedSamplingResult(
        images=[img for rec, img in merged if rec.passed],
        records=[rec for rec, _ in merged],
        requested=sum(requested for _, requested in shards),
    )


def release_grid(
    images: Sequence[torch.Tensor], conditions: Sequence[Any], labels: Sequence[str], per_class: int
) -> np.ndarray | None:
    """A grid of released images, one row per class (``per_class`` columns, short rows padded with background).

    Returns:
        The grid, or ``None`` when nothing was released.
    """
    rows = []
    for label in labels:
        picked = [img for img, cond in zip(images, conditions) if str(_label_of(cond)) == str(label)]
        if picked:
            rows.append(torch.stack([torch.as_tensor(i) for i in picked[: int(per_class)]]))
    if not rows:
        return None
    width = max(len(r) for r in rows)
    rows = [torch.cat([r, torch.full((width - len(r), *r.shape[1:]), -1.0)]) if len(r) < width else r for r in rows]
    return make_sample_grid(rows)


def guarded_release(
    sampler: Generator,
    safeguard: PrivacySafeguard,
    release: GuardedRelease,
    encoder: ReleaseEncoder,
    labels: Sequence[str],
    num_per_class: int,
    data_fingerprint: str,
    max_retries: int = 4,
    seed: int = 0,
    guidance_scale: float | None = None,
    checkpoints: Mapping[str, str | os.PathLike] | None = None,
    sample_grid: str | os.PathLike | None = None,
    grid_per_class: int = 8,
    mlflow: Mapping[str, Any] | None = None,
    spacing: Sequence[float] | None = None,
    direction: Sequence[Sequence[float]] | None = None,
    requests: Sequence[tuple[Any, int]] | None = None,
    conditions: Mapping[str, Any] | None = None,
) -> dict:
    """Sample every class through the privacy safeguard and write the release, its certificate and a sample grid.

    :func:`~monai_synth.privacy.sampling.guarded_sample` regenerates any candidate closer than the safeguard's
    threshold to a training image. Each candidate is judged as the file will hold it (physical units, the format's
    storage, see :mod:`monai_synth.privacy.release`) and exactly that array is written, atomically with
    ``certificate.json`` / ``.csv``; the private audit, which names training patients, is written outside the
    release, before the release is committed. ``release`` is built (and its paths checked) by the caller before the
    safeguard is calibrated, so a release folder that cannot be written stops the run before any work.

    Args:
        sampler: the generator (a :class:`~monai_synth.engines.sampler.LatentSampler` on the EMA weights).
        safeguard: the calibrated safeguard (:func:`calibrated_safeguard`).
        release: the release writer (folder, format, modality, private audit path, overwrite).
        encoder: what a candidate becomes in the release's storage and the views it is judged in; built with the
            training images' intensity transform (``to_model``), whose ``inverse`` exports generated images, so both
            directions come from one object. The same encoder the safeguard was calibrated with.
        labels: classes to release, ``num_per_class`` images each.
        num_per_class: released images per class.
        data_fingerprint: fingerprint of the training records, written into the certificate.
        max_retries: resampling rounds for rejected candidates.
        seed: first sampling seed.
        guidance_scale: classifier-free guidance weight.
        checkpoints: name -> checkpoint path, fingerprinted into the certificate.
        sample_grid: PNG path for a grid of released images (one row per class).
        grid_per_class: columns of the grid.
        mlflow: ``{"tracking_uri", "experiment_name", "run_name", "params"}`` to record the release in MLflow,
            or ``None``.
        spacing: voxel size in mm of the released NIfTI / DICOM images, the training images' model-space spacing
            (:func:`monai_synth.data.geometry.model_spacing`); ``None`` writes 1 mm.
        direction: direction cosines of the released images' axes, the training images' model-space orientation
            (:func:`monai_synth.data.geometry.model_direction`); ``None`` writes axes along R, A, S.
        requests: ``(condition, count)`` pairs (:func:`release_requests`) in place of ``num_per_class`` of every
            label, e.g. per-image numeric conditions; each released image's values are in its certificate row.
        conditions: how the numeric conditions were used (keys, training mean / std), recorded in the certificate.

    Returns:
        The certificate summary plus ``release_dir``, ``thresholds``, ``sample_grid`` and ``private_audit``.

    Raises:
        ValueError: ``num_per_class`` below 1.
    """
    if requests is None:
        if int(num_per_class) < 1:
            raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
        requests = [(label, int(num_per_class)) for label in labels]
    modality = release.modality.name
    if (encoder.fmt, encoder.modality.name) != (release.fmt, modality):
        raise ValueError(
            f"the encoder is for {encoder.fmt} {encoder.modality.name} images but the release writes {release.fmt} "
            f"{modality}; build both from the same release_format and modality"
        )
    rank, world = _world()
    share, first_seed = shard_requests(list(requests), rank, world, seed, max_retries)
    result = guarded_sample(
        sampler,
        safeguard,
        share,
        max_retries=int(max_retries),
        seed=first_seed,
        guidance_scale=guidance_scale,
        encoder=encoder,
    )
    if world > 1:
        result = _gather_shards(result, labels, rank, world)
        if rank != 0:  # rank 0 writes the one release; the others learn its summary
            summary = [None]
            torch.distributed.broadcast_object_list(summary, src=0)
            return summary[0]
    fingerprints = {name: checkpoint_fingerprint(path) for name, path in (checkpoints or {}).items()}
    fingerprints["datalist"] = data_fingerprint
    released = iter(result.images)
    with release:
        for rec in result.records:
            release.add(rec, next(released) if rec.passed else None, spacing, direction)
        release.requested = result.requested
        release.finish(
            safeguard,
            fingerprints=fingerprints,
            extra={
                "modality": modality,
                "format": release.fmt,
                "guidance_scale": guidance_scale,
                **({"conditions": dict(conditions)} if conditions else {}),
            },
        )
    grid_path = None
    if sample_grid:
        # the grid shows the released images as written, back in model space
        written = [encoder.views(img)[0] for img in result.images]
        grid = release_grid(written, [rec.condition for rec in result.released_records], labels, grid_per_class)
        grid_path = None if grid is None else str(save_grid_png(grid, sample_grid))
    summary = dict(result.summary())
    summary.update(
        {
            "release_dir": str(release.out_dir),
            "thresholds": dict(safeguard.thresholds),
            "sample_grid": grid_path,
            "private_audit": None if release.audit is None else str(release.audit),
        }
    )
    logger.info(
        f"released {summary.get('released')} of {summary.get('generated')} generated images "
        f"({summary.get('rejected')} rejected as too close to a training image) into {release.out_dir}"
    )
    if mlflow:
        log_release(mlflow, summary, release.out_dir, grid_path, fingerprints=fingerprints)
    if world > 1:
        torch.distributed.broadcast_object_list([summary], src=0)
    return summary
