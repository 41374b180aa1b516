"""``monai-synth guard``: the privacy safeguard as a gate for images made by any generator.

Given the training datalist the generator saw, a holdout datalist of other patients and a folder of candidate
images, :func:`run_guard` builds the training index of each privacy space, calibrates the thresholds on the
holdout, judges every candidate and writes only those that pass, plus the certificate, atomically with
:class:`~monai_synth.data.export.ReleaseWriter`. The private audit file (nearest training patient per candidate) is
written next to, never into, the release folder.

Every image (training, holdout, candidate) is brought to model space the same way: the modality presets of
:mod:`monai_synth.transforms.presets` (reader by file type, orientation/spacing, intensity normalisation, resize to
``spatial_size``), the same transform the generator was trained on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_synth.data.loading import is_dicom
from monai_synth.data.modalities import get_modality
from monai_synth.privacy.certificate import write_certificate, write_private_audit
from monai_synth.privacy.safeguard import build_safeguard
from monai_synth.privacy.sampling import GuardedSamplingResult, SampleRecord
from monai_synth.privacy.spaces import PixelSpace, PrivacySpace

__all__ = ["run_guard", "train_embedding_from_datalist", "find_candidates", "make_space", "load_model_space"]

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


def find_candidates(folder: str | os.PathLike) -> list[Path]:
    """Candidate images in ``folder`` (recursively): image files, and folders holding one DICOM series.

    Hidden entries are skipped. Sorted, so runs are reproducible.

    Raises:
        FileNotFoundError: if ``folder`` is not a folder.
        ValueError: if it holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"candidate folder not found: {root}")
    found: list[Path] = []

    def visit(d: Path) -> None:
        entries = sorted(p for p in d.iterdir() if not p.name.startswith("."))
        subdirs = [p for p in entries if p.is_dir()]
        files = [p for p in entries if p.is_file()]
        dicom_files = [p for p in files if _suffix(p) not in _IMAGE_SUFFIXES[:6] and is_dicom(p)]
        if d != root and not subdirs and dicom_files and len(dicom_files) == len(files):
            found.append(d)  # a DICOM series: one image
            return
        found.extend(p for p in files if _suffix(p) in _IMAGE_SUFFIXES or p in dicom_files)
        for s in subdirs:
            visit(s)

    visit(root)
    if not found:
        raise ValueError(f"no candidate images (NIfTI, DICOM, PNG, ...) in {root}")
    return found


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

    try:
        return batch_load([{"image": os.fspath(p)} for p in paths], modality, spatial_size, spatial_dims=spatial_dims)
    except Exception as err:
        raise ValueError(f"cannot load images into {modality} model space: {err}") from err


def _load_candidates(
    files: Sequence[Path], modality: str, spatial_size: Sequence[int], spatial_dims: int
) -> tuple[torch.Tensor, dict[int, str]]:
    """Candidates in model space, one file at a time, so that one unreadable file is refused, not the whole run.

    An unreadable file becomes a NaN image, which the safeguard fails closed; its index maps to the read error.
    """
    from monai_synth.transforms.presets import load_with, modality_transforms

    chain = modality_transforms(modality, spatial_size, keys=("image",), spatial_dims=spatial_dims)
    images, unreadable = [], {}
    for i, path in enumerate(files):
        try:
            images.append(load_with(chain, path))
        except Exception as err:  # any reader failure: this file is refused, the others are still checked
            root: BaseException = err
            while root.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
                root = root.__cause__
            unreadable[i] = f"{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}"
            images.append(torch.full((1, *spatial_size), float("nan")))
    return torch.stack(images), unreadable


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


def space_name(spec: str) -> str:
    """The kind of privacy space a command-line spec names (``"pixel:flip,shift"`` -> ``"pixel"``)."""
    return spec.partition(":")[0].strip().lower()


def make_space(
    spec: str,
    spatial_dims: int,
    spatial_size: Sequence[int],
    embedding_weights: str | None = None,
    data_fingerprint: str | None = None,
) -> PrivacySpace:
    """A privacy space from its command-line name.

    ``pixel`` = :class:`PixelSpace` invariant to flips, shifts of up to 2 grid cells and zooms (the safe default);
    ``pixel:none``, ``pixel:flip,shift`` etc. choose the invariances (``none``, ``flip``, ``shift``, ``zoom``);
    ``embedding`` = the learned :class:`~monai_synth.privacy.embedding.EmbeddingSpace` (needs its weights; with
    ``data_fingerprint``, weights trained on another training set are refused).

    The default pixel space compares every query in 500 variants (4 flips x 25 shifts x 5 zooms): fine for a gate
    over thousands of training images; inside a sampler over ~1e5 training images use ``pixel:none`` plus
    ``embedding``, which together stay under 5% of sampling time (``docs/benchmarks.md``).
    """
    name, opts = space_name(spec), spec.partition(":")[2]
    if name == "pixel":
        inv = ("flip", "shift", "zoom") if not opts else tuple(o for o in opts.split(",") if o and o != "none")
        grid = min(32, *spatial_size)
        return PixelSpace(grid=grid, spatial_dims=spatial_dims, invariances=inv, max_shift=min(2, grid // 2 - 1))
    if name == "embedding":
        if not embedding_weights:
            raise ValueError("the embedding space needs --embedding-weights (from `monai-synth train-embedding`)")
        from monai_synth.privacy.embedding import EmbeddingSpace

        return EmbeddingSpace.from_weights(embedding_weights, expected_data_fingerprint=data_fingerprint)
    raise ValueError(f"unknown privacy space {spec!r}; use pixel[:none|flip,shift,zoom] and/or embedding")


def run_guard(
    train: str,
    holdout: str,
    candidates: str,
    out: str,
    modality: str,
    spatial_size: int | Sequence[int] = 64,
    spaces: Sequence[str] = ("pixel",),
    embedding_weights: str | None = None,
    quantile: float = 0.01,
    floor: float = 0.0,
    fmt: str | None = None,
    audit: str | None = None,
    batch_size: int = 32,
) -> dict:
    """Release the candidate images that are not near-copies of any training image.

    Args:
        train: training datalist (CSV or MONAI JSON) of the images the generator was trained on.
        holdout: datalist of other patients, for calibrating the thresholds.
        candidates: folder of candidate images (NIfTI, DICOM files or series folders, PNG, ...).
        out: release folder (written atomically; must not exist or be empty).
        modality: ``ct``, ``mri``, ``pet`` or ``us``.
        spatial_size: model-space size (as the generator was trained).
        spaces: privacy spaces (see :func:`make_space`); a candidate must pass all.
        embedding_weights: weights file of the embedding space.
        quantile: holdout quantile that sets each threshold.
        floor: absolute minimum threshold.
        fmt: release format (default: the modality's native one).
        audit: PRIVATE audit CSV (default ``<out>.private_audit.csv`` next to the release folder).
        batch_size: images embedded at once.

    Returns:
        the certificate summary (generated, rejected, released, rejection_rate, ...) plus ``out`` and ``audit``.
    """
    from monai.transforms import LoadImage

    from monai_synth.data.datalist import datalist_fingerprint, load_datalist
    from monai_synth.data.export import ReleaseWriter
    from monai_synth.data.loading import reader_for

    mod = get_modality(modality)
    fmt = fmt or mod.native_formats[0]
    out_path = Path(out).expanduser().absolute()
    audit_path = Path(audit) if audit else out_path.parent / f"{out_path.name}.private_audit.csv"
    train_records = load_datalist(train, labels=mod.labels)
    holdout_records = load_datalist(holdout, labels=mod.labels)
    shared = sorted({r["patient_id"] for r in train_records} & {r["patient_id"] for r in holdout_records})
    if shared:
        raise ValueError(f"patients in both --train and --holdout: {shared[:10]}; the holdout must be unseen patients")
    files = find_candidates(candidates)
    spatial_dims = _spatial_dims_of(modality, train_records[0]["image"], spatial_size)
    size = _spatial(spatial_size, spatial_dims)
    train_images = load_model_space([r["image"] for r in train_records], modality, size, spatial_dims)
    holdout_images = load_model_space([r["image"] for r in holdout_records], modality, size, spatial_dims)
    cand_images, unreadable = _load_candidates(files, modality, size, spatial_dims)
    dl_fp = datalist_fingerprint(train_records)

    safeguard = build_safeguard(
        [make_space(spec, spatial_dims, size, embedding_weights, data_fingerprint=dl_fp) for spec in spaces],
        train_images,
        [r["patient_id"] for r in train_records],
        holdout_images,
        [r["patient_id"] for r in holdout_records],
        dl_fp,
        quantile=quantile,
        floor=floor,
        batch_size=batch_size,
    )
    root = Path(candidates)
    records = [
        SampleRecord.from_result(
            res,
            condition=None,
            seed=None,
            batch_index=i,
            attempt=0,
            guidance=None,
            source=path.relative_to(root).as_posix(),
        )
        for i, (path, res) in enumerate(zip(files, safeguard.check(cand_images)))
    ]
    for i, why in unreadable.items():  # checked as NaN images, so they failed; say why they could not be checked
        records[i].passed = False
        records[i].reason = f"cannot read candidate: {why}"
    # released candidates are written as they were given (physical units, own spacing), not re-rendered
    released_physical: list[Any] = []
    spacings: list[Any] = []
    for path, rec in zip(files, records):
        if rec.passed:
            img = LoadImage(reader=reader_for(path), image_only=True, ensure_channel_first=True, dtype=np.float32)(
                os.fspath(path)
            )
            spacing = [float(s) for s in np.asarray(img.pixdim)][:spatial_dims] if hasattr(img, "pixdim") else None
            released_physical.append(np.asarray(img, dtype=np.float32))
            spacings.append(spacing)
    result = GuardedSamplingResult(images=released_physical, records=records, requested=len(records))
    with ReleaseWriter(out_path, fmt=fmt, modality=mod.name) as writer:
        for i, (image, rec, spacing) in enumerate(zip(result.images, result.released_records, spacings)):
            rec.file = writer.write_image(image, stem=f"images/{mod.name}_{i:05d}", spacing=spacing)
        write_certificate(
            writer,
            result,
            fingerprints={"datalist": dl_fp, "checkpoint": None, "generator": "external (monai-synth guard)"},
            safeguard=safeguard,
            extra={"modality": mod.name, "format": fmt, "spatial_size": list(size)},
        )
    write_private_audit(audit_path, result, release_dir=out_path)
    summary = result.summary()
    summary.update({"out": str(out_path), "audit": str(audit_path), "thresholds": dict(safeguard.thresholds)})
    return summary


def train_embedding_from_datalist(
    train: str,
    modality: str,
    spatial_size: int | Sequence[int] = 64,
    epochs: int = 20,
    seed: int = 0,
    out: str = "embedding.pt",
) -> str:
    """Train the re-identification embedding on a training datalist and save its weights.

    Thin glue: loads the images in model space, calls
    :func:`monai_synth.privacy.embedding.train_embedding` with the patient ids as identities and saves the space.

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
        epochs=epochs,
        seed=seed,
        data_fingerprint=datalist_fingerprint(records),
    )
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    space.save(out_path)
    return str(out_path)
