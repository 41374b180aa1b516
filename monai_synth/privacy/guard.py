"""``monai-synth guard``: the privacy safeguard as a gate for images made by any generator.

Given the training datalist the generator saw, a holdout datalist of other patients and a folder of candidate
images, :func:`run_guard` builds the training index of each privacy space, calibrates the thresholds on the
holdout, judges every candidate and writes only those that pass, plus the certificate, through the one release path
of :mod:`monai_synth.privacy.release`. The private audit file (nearest training patient per candidate) is written
next to, never into, the release folder, before the release is committed.

Training and holdout images go through the modality presets of :mod:`monai_synth.transforms.presets` (reader by
file type, orientation, intensity normalisation) and are resized, whole field of view, to ``spatial_size`` for the
index. A candidate is read once and judged, at its own size and over its whole field of view, as the array its
release file will hold; that same array is written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_synth.data.loading import is_dicom
from monai_synth.data.modalities import get_modality
from monai_synth.privacy.factory import DEFAULT_SPACES, build_spaces
from monai_synth.privacy.safeguard import build_safeguard
from monai_synth.privacy.sampling import SampleRecord

logger = logging.getLogger(__name__)

__all__ = ["run_guard", "train_embedding_from_datalist", "find_candidates", "load_model_space"]

_IMAGE_SUFFIXES = (
    ".nii",
    ".nii.gz",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".dcm",
    ".dicom",
    ".ima",
    ".mha",
    ".mhd",
    ".nrrd",
)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def find_candidates(folder: str | os.PathLike, with_unsupported: bool = False) -> Any:
    """Candidate images in ``folder`` (recursively): image files, and folders holding one DICOM series.

    Hidden entries are skipped. Sorted, so runs are reproducible. With ``with_unsupported``, also the other files
    (``.tif``, ``.npy``, ...), returned as ``(images, unsupported)`` so a caller can refuse them with a reason instead of
    skipping them silently.

    Raises:
        FileNotFoundError: if ``folder`` is not a folder.
        ValueError: if it holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"candidate folder not found: {root}")
    found: list[Path] = []
    other: list[Path] = []

    def visit(d: Path) -> None:
        entries = sorted(p for p in d.iterdir() if not p.name.startswith("."))
        subdirs = [p for p in entries if p.is_dir()]
        files = [p for p in entries if p.is_file()]
        dicom_files = [p for p in files if _suffix(p) not in _IMAGE_SUFFIXES[:6] and is_dicom(p)]
        if d != root and not subdirs and dicom_files and len(dicom_files) == len(files):
            found.append(d)  # a DICOM series: one image
            return
        found.extend(p for p in files if _suffix(p) in _IMAGE_SUFFIXES or p in dicom_files)
        other.extend(p for p in files if not (_suffix(p) in _IMAGE_SUFFIXES or p in dicom_files))
        for s in subdirs:
            visit(s)

    visit(root)
    if not found and not (with_unsupported and other):
        raise ValueError(f"no candidate images (NIfTI, DICOM, PNG, ...) in {root}")
    return (found, other) if with_unsupported else found


def _spatial(spatial_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(spatial_size, int):
        return (int(spatial_size),) * spatial_dims
    size = tuple(int(s) for s in spatial_size)
    if len(size) == 1:
        return size * spatial_dims
    if len(size) != spatial_dims:
        raise ValueError(f"spatial_size {size} does not match spatial_dims={spatial_dims}")
    return size


def load_model_space(
    paths: Sequence[str | os.PathLike], modality: str, spatial_size: int | Sequence[int], spatial_dims: int
) -> torch.Tensor:
    """Load images into model space, ``(N, 1, *spatial_size)`` float32, through the modality presets' chain."""
    from monai_synth.transforms.presets import batch_load

    try:  # the whole field of view resampled, never a centre crop: a copy of any part of the image must be caught
        return batch_load(
            [{"image": os.fspath(p)} for p in paths], modality, spatial_size, spatial_dims=spatial_dims, resize="resize"
        )
    except Exception as err:
        raise ValueError(f"cannot load images into {modality} model space: {err}") from err


def _spatial_dims_of(modality: str, path: str | os.PathLike, spatial_size: int | Sequence[int]) -> int:
    if not isinstance(spatial_size, int) and len(tuple(spatial_size)) > 1:
        return len(tuple(spatial_size))
    if get_modality(modality).spatial_dims == (2,):
        return 2
    from monai_synth.data.loading import load_image

    shape = [s for s in load_image(path).shape[1:]]
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return len(shape)


def _read_candidate(path: Path, spatial_dims: int) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Read a candidate once, in physical units: ``(1, *spatial)`` float64 and its voxel size.

    Volumes are brought to RAS, as the training volumes are; trailing singleton axes are dropped.

    Raises:
        ValueError: not one grey channel, or not ``spatial_dims`` spatial axes.
    """
    from monai.transforms import LoadImage, Orientation

    from monai_synth.data.loading import reader_for

    img = LoadImage(reader=reader_for(path), image_only=True, ensure_channel_first=True, dtype=np.float64)(
        os.fspath(path)
    )
    while img.ndim - 1 > spatial_dims and img.shape[-1] == 1:
        img = img[..., 0]
    if img.shape[0] != 1:
        raise ValueError(f"{img.shape[0]} channels; expected one grey channel")
    if img.ndim - 1 != spatial_dims:
        raise ValueError(
            f"{img.ndim - 1}D image of shape {tuple(img.shape[1:])}, but the training images are {spatial_dims}D"
        )
    if spatial_dims == 3:
        img = Orientation(axcodes="RAS")(img)
    spacing = tuple(float(v) for v in np.asarray(img.pixdim)[:spatial_dims]) if hasattr(img, "pixdim") else None
    return np.asarray(img, dtype=np.float64), spacing


def run_guard(
    train: str,
    holdout: str,
    candidates: str,
    out: str,
    modality: str,
    spatial_size: int | Sequence[int] = 64,
    spaces: Sequence[str] = DEFAULT_SPACES,
    embedding_weights: str | None = None,
    quantile: float = 0.01,
    floor: float = 0.0,
    fmt: str | None = None,
    audit: str | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    embedding_epochs: int | None = None,
    duplicate_check: bool = True,
    cross_patient_images: int | None = None,
    specificity: float | None = None,
    consensus: int | None = None,
) -> dict:
    """Release the candidate images that are not near-copies of any training image.

    Each candidate file is read once; the array its release file will hold is judged over its whole field of view
    (see :mod:`monai_synth.privacy.release`) and that same array is written. Files that cannot be read, are of an
    unsupported type or of another dimensionality than the training images are refused with the reason.

    Args:
        train: training datalist (CSV or MONAI JSON) of the images the generator was trained on.
        holdout: datalist of other patients, for calibrating the thresholds.
        candidates: folder of candidate images (NIfTI, DICOM files or series folders, PNG, ...).
        out: release folder (written atomically; must not exist or be empty unless ``overwrite``).
        modality: ``ct``, ``mri``, ``pet`` or ``us``.
        spatial_size: size the training and holdout images are resampled to (whole field of view) for the index.
        spaces: privacy spaces (see :func:`make_space`); a candidate must pass all.
        embedding_weights: weights file of the embedding space; without it the embedding is trained here on the
            training images.
        quantile: holdout quantile that sets each threshold.
        floor: absolute minimum threshold.
        fmt: release format (default: the modality's native one).
        audit: PRIVATE audit CSV (default ``<out>.private_audit.csv`` next to the release folder).
        batch_size: images judged at once (bounds memory: 3D variants are large).
        overwrite: replace an existing release (only once the new one is complete).
        embedding_epochs: epochs of an embedding trained here (default: its training default).
        duplicate_check: refuse a holdout that holds near-duplicates of training images (they would lower the
            thresholds); switch off only for a holdout known to be new patients.
        cross_patient_images: training images measured against the other training patients that join the holdout
            as calibration samples (see :func:`~monai_synth.privacy.safeguard.build_safeguard`; None, the default: as
            many as the spaces need; 0: the holdout alone).
        specificity: also refuse images much closer to one training patient than to any other (see
            :class:`~monai_synth.privacy.safeguard.PrivacySafeguard`; None, the default:
            :data:`~monai_synth.privacy.safeguard.DEFAULT_SPECIFICITY`, lowered to its share of the calibration;
            0: off).
        consensus: also refuse images whose nearest training patient is the same in at least this many spaces (see
            :class:`~monai_synth.privacy.safeguard.PrivacySafeguard`; None, the default: calibrated; 0: off).

    Returns:
        the certificate summary (generated, rejected, released, rejection_rate, ...) plus ``out`` and ``audit``.
    """
    from monai_synth.data.datalist import datalist_fingerprint, load_datalist
    from monai_synth.privacy.release import VIEWS_PER_IMAGE, GuardedRelease, ReleaseEncoder

    mod = get_modality(modality)
    fmt = fmt or mod.native_formats[0]
    release = GuardedRelease(out, fmt, mod.name, audit=audit, overwrite=overwrite)  # checks every path first
    encoder = ReleaseEncoder(fmt, mod.name)
    specs = [str(s) for s in spaces]
    train_records = load_datalist(train, labels=mod.labels)
    holdout_records = load_datalist(holdout, labels=mod.labels)
    shared = sorted({r["patient_id"] for r in train_records} & {r["patient_id"] for r in holdout_records})
    if shared:
        raise ValueError(f"patients in both --train and --holdout: {shared[:10]}; the holdout must be unseen patients")
    files, unsupported = find_candidates(candidates, with_unsupported=True)
    spatial_dims = _spatial_dims_of(modality, train_records[0]["image"], spatial_size)
    size = _spatial(spatial_size, spatial_dims)
    train_images = load_model_space([r["image"] for r in train_records], modality, size, spatial_dims)
    holdout_images = load_model_space([r["image"] for r in holdout_records], modality, size, spatial_dims)
    dl_fp = datalist_fingerprint(train_records)
    train_ids = [r["patient_id"] for r in train_records]
    built = build_spaces(specs, spatial_dims, size, train_images, train_ids, dl_fp, embedding_weights, embedding_epochs)
    safeguard = build_safeguard(
        built,
        train_images,
        train_ids,
        holdout_images,
        [r["patient_id"] for r in holdout_records],
        dl_fp,
        quantile=quantile,
        floor=floor,
        batch_size=VIEWS_PER_IMAGE * batch_size,  # the views of batch_size candidates at once
        duplicate_check=duplicate_check,
        views=encoder.model_views,
        cross_patient_images=cross_patient_images,
        specificity=specificity,
        consensus=consensus,
    )
    del train_images, holdout_images
    logger.info(f"thresholds calibrated on {len(holdout_records)} holdout images: {safeguard.thresholds}")
    nan = dict.fromkeys(safeguard.thresholds, float("nan"))
    root = Path(candidates)
    with release:
        for path in unsupported:
            rec = _refused(safeguard, nan, path, root, "unsupported file type: not an image format the guard reads")
            release.add(rec, None)
        for start in range(0, len(files), max(1, int(batch_size))):
            stored, spacings, recs = [], [], []
            for path in files[start : start + max(1, int(batch_size))]:
                try:
                    physical, spacing = _read_candidate(path, spatial_dims)
                    stored.append(encoder.store(physical))
                    spacings.append(spacing)
                    recs.append(path)
                except Exception as err:  # this file is refused, the others are still judged
                    release.add(
                        _refused(safeguard, nan, path, root, f"cannot read candidate: {_root_cause(err)}"), None
                    )
            for path, array, spacing, res in zip(recs, stored, spacings, encoder.judge(safeguard, stored)):
                record = SampleRecord.from_result(
                    res, condition=None, seed=None, batch_index=0, attempt=0, guidance=None, source=_rel(path, root)
                )
                release.add(record, array, spacing)
            logger.info(f"judged {min(start + int(batch_size), len(files))} of {len(files)} candidates")
        release.requested = len(release.records)
        return release.finish(
            safeguard,
            fingerprints={"datalist": dl_fp, "checkpoint": None, "generator": "external (monai-synth guard)"},
            extra={"modality": mod.name, "format": fmt, "spatial_size": list(size), "space_specs": specs},
        )


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _root_cause(err: BaseException) -> str:
    root: BaseException = err
    while root.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
        root = root.__cause__
    text = str(root).splitlines()[0] if str(root) else ""
    return f"{type(root).__name__}: {text}"


def _refused(safeguard: Any, nan: dict, path: Path, root: Path, reason: str) -> SampleRecord:
    return SampleRecord(
        condition=None,
        seed=None,
        batch_index=0,
        attempt=0,
        guidance=None,
        passed=False,
        distances=dict(nan),
        thresholds=dict(safeguard.thresholds),
        reason=reason,
        source=_rel(path, root),
    )


def train_embedding_from_datalist(
    train: str,
    modality: str,
    spatial_size: int | Sequence[int] = 64,
    epochs: int | None = None,
    seed: int = 0,
    out: str = "embedding.pt",
) -> str:
    """Train the re-identification embedding on a training datalist and save its weights.

    Thin glue: loads the images in model space, calls
    :func:`monai_synth.privacy.embedding.train_embedding` with the patient ids as identities (``epochs``: its
    default when None) and saves the space.

    Returns:
        the weights path.
    """
    from monai_synth.data.datalist import datalist_fingerprint, load_datalist
    from monai_synth.privacy.embedding import train_embedding

    mod = get_modality(modality)
    records = load_datalist(train, labels=mod.labels)
    spatial_dims = _spatial_dims_of(modality, records[0]["image"], spatial_size)
    images = load_model_space([r["image"] for r in records], modality, spatial_size, spatial_dims)
    space = train_embedding(
        images,
        [r["patient_id"] for r in records],
        spatial_dims=spatial_dims,
        seed=seed,
        data_fingerprint=datalist_fingerprint(records),
        **({} if epochs is None else {"epochs": int(epochs)}),
    )
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    space.save(out_path)
    return str(out_path)
