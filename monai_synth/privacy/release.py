"""The one judge-write-certify path of every release: the bundle's guarded sampling and ``monai-synth guard``.

What is judged is what is written. A candidate is first turned into exactly the array its file will hold
(:meth:`ReleaseEncoder.store`: PNG grey levels rounded to uint8, DICOM quantised to its stored integers, NIfTI
float32), at its own size and geometry; the safeguard judges that array over its whole field of view (never a
crop), and the same array is written. Nothing is read twice.

The safeguard sees the stored array through two intensity *views*, judged together as one image's variants (the
holdout is calibrated the same way), and every view must be far enough in every space:

* the modality transform the training images went through (e.g. the ultrasound grey range or the CT window, with
  its clipping), so a copy compares with the index as the training image did;
* a robust rescaling of the array's own range (0.5-99.5 percentiles to [-1, 1]), so a copy whose values were
  multiplied far beyond the modality range (a 16-bit PNG of an 8-bit image, an exact copy times 1e20) is not
  flattened by the clipping into something that looks new.

Every output path is validated before any work starts, and the private audit is written *before* the release is
committed: a crash or an unwritable audit leaves no release that looks complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_synth.data.export import ReleaseWriter, _dicom_storage
from monai_synth.data.modalities import get_modality
from monai_synth.privacy.certificate import write_certificate, write_private_audit
from monai_synth.privacy.safeguard import PrivacySafeguard, SafeguardResult
from monai_synth.privacy.sampling import GuardedSamplingResult, SampleRecord

__all__ = ["VIEWS_PER_IMAGE", "ReleaseEncoder", "GuardedRelease", "check_release_paths", "default_audit_path"]

ROBUST_PERCENTILES = (0.5, 99.5)
VIEWS_PER_IMAGE = 2
"""Views the safeguard judges of each stored image at most (:meth:`ReleaseEncoder.views`): a release judging ``n``
images at once hands the safeguard ``VIEWS_PER_IMAGE * n``, so both views of an image are searched in one batch and
the second rides on the first's products (:func:`~monai_synth.privacy.search._ride`)."""


def default_audit_path(out_dir: str | os.PathLike) -> Path:
    """``<out>.private_audit.csv`` next to (never inside) the release folder."""
    out = Path(out_dir).expanduser().absolute()
    return out.parent / f"{out.name}.private_audit.csv"


def check_release_paths(out_dir: str | os.PathLike, audit: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse unusable output paths before any work: an existing release, an audit inside the release, folders that
    cannot be written.

    Raises:
        FileExistsError: ``out_dir`` holds files and ``overwrite`` is off, or a path is taken by a file.
        ValueError: the audit lies inside the release.
        PermissionError: a folder that would receive a file cannot be written.
    """
    out = Path(out_dir).expanduser().absolute()
    audit_path = Path(audit).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another release folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already holds files; choose a new release folder or allow replacing it (`--overwrite` on the "
            "command line, `overwrite=True` in Python; the old release is replaced only once the new one is complete)"
        )
    if audit_path == out or out in audit_path.parents:
        raise ValueError(f"the private audit {audit_path} must not be written inside the release {out}")
    if audit_path.is_dir():
        raise FileExistsError(f"the private audit path {audit_path} is a folder; give a file name")
    for folder in (out.parent, audit_path.parent):
        existing = folder
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write into {existing}; choose output paths in a writable folder")


MAX_GENERATED_CLIP = 0.25
"""Largest change (model units, range [-1, 1]) the physical transform's clipping may make to a generated image: a
decoder's overshoot just past the range is clipped; an image far outside it is refused."""


class ReleaseEncoder:
    """How a release stores an image, and how the safeguard sees exactly that stored image.

    Args:
        fmt: ``png``, ``dicom`` or ``nifti``.
        modality: modality key.
        to_model: physical units -> model space, the transform the training images went through (default: the
            modality's :func:`~monai_synth.transforms.presets.intensity_transform`).
        to_physical: model space -> physical units, for generated images (default: ``to_model.inverse``).
    """

    def __init__(
        self,
        fmt: str,
        modality: str,
        to_model: Callable[[torch.Tensor], Any] | None = None,
        to_physical: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        from monai_synth.transforms.presets import intensity_transform

        self.fmt = str(fmt).lower()
        self.modality = get_modality(modality)
        if self.fmt not in ("png", "dicom", "nifti"):
            raise ValueError(f"unknown release format {fmt!r}; expected 'png', 'dicom' or 'nifti'")
        self.to_model = to_model if to_model is not None else intensity_transform(self.modality.name)
        self.to_physical = to_physical if to_physical is not None else getattr(self.to_model, "inverse", None)

    def store(self, physical: Any) -> np.ndarray:
        """``(1, *spatial)`` physical image -> float32 array of the values its file will hold.

        Raises:
            ValueError: not a single-channel 2D/3D image, a 3D image for PNG, or NaN/Inf values.
        """
        array = np.asarray(physical.detach().cpu() if torch.is_tensor(physical) else physical, dtype=np.float64)
        if array.ndim not in (3, 4) or array.shape[0] != 1:
            raise ValueError(f"expected a single-channel 2D or 3D image (1, *spatial), got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("image contains NaN or Inf values")
        if self.fmt == "png":
            if array.ndim != 3:
                raise ValueError("PNG releases are 2D only; use nifti or dicom for volumes")
            stored, step = np.clip(np.rint(array), 0, 255), 1.0
        elif self.fmt == "dicom":
            volume = array[0] if array.ndim == 4 else array[0][..., None]
            pixels, slope, intercept, _, _ = _dicom_storage(self.modality.dicom_code, volume)
            stored, step = (pixels.astype(np.float64) * slope + intercept).reshape(array.shape), float(slope)
        else:
            stored, step = array.astype(np.float32).astype(np.float64), 0.0
        # storage that clips (8-bit PNG, CT int16) would release another image than the one judged and given
        error = float(np.max(np.abs(stored - array))) if np.isfinite(stored).all() else float("inf")
        if not error <= step / 2 + 1e-6 * max(1.0, float(np.max(np.abs(array)))):
            raise ValueError(
                f"values {array.min():.4g}..{array.max():.4g} do not fit a {self.fmt} {self.modality.name} release "
                f"without clipping (error {error:.4g}); release the image in another format or rescale it first"
            )
        return stored.astype(np.float32)

    def store_generated(self, model_image: Any) -> np.ndarray:
        """A generated model-space image -> the array its file will hold.

        Raises:
            ValueError: values so far outside the model's intensity range that going to physical units clips them
                (a copy of a training image times 1e20 came out as its binarised silhouette): the stored image would
                not be the one generated.
        """
        if self.to_physical is None:
            raise ValueError("this encoder has no to_physical transform for generated images")
        x = torch.as_tensor(model_image).detach().cpu().float()
        physical = self.to_physical(x)
        back = torch.as_tensor(self._back_to_model(torch.as_tensor(physical).float())).as_subclass(torch.Tensor).float()
        moved = float((back - x).abs().max()) if bool(torch.isfinite(x).all()) else float("inf")
        if not moved <= MAX_GENERATED_CLIP:
            raise ValueError(
                f"generated values {float(x.min()):.4g}..{float(x.max()):.4g} lie outside the model's intensity range: "
                f"physical units would clip them by up to {moved:.4g}, releasing another image than the one generated"
            )
        return self.store(physical)

    def _back_to_model(self, physical: torch.Tensor) -> Any:
        """Physical units -> model space by the very scaling ``to_physical`` inverted, so that only clipping shows
        (a generated MRI image goes to physical units by the dataset reference; mapped back by its own percentiles,
        an image whose spread is not the reference's would move with nothing clipped)."""
        if self.to_physical == getattr(self.to_model, "inverse", None) and hasattr(self.to_model, "forward_as_inverse"):
            return self.to_model.forward_as_inverse(physical)
        return self.to_model(physical)

    def views(self, stored: np.ndarray) -> list[torch.Tensor]:
        """The model-space views the safeguard judges: the modality transform, and the array's own robust range."""
        x = torch.as_tensor(np.asarray(stored, dtype=np.float32))
        model = torch.as_tensor(self.to_model(x)).as_subclass(torch.Tensor).float()
        views = [model]
        lo, hi = np.percentile(np.asarray(stored, dtype=np.float64), ROBUST_PERCENTILES)
        if hi > lo:
            robust = (np.asarray(stored, dtype=np.float64) - lo) / (hi - lo) * 2.0 - 1.0
            views.append(torch.as_tensor(np.clip(robust, -1.0, 1.0), dtype=torch.float32))
        return views

    def model_views(self, model_image: Any) -> list[torch.Tensor]:
        """The views the safeguard would judge if this model-space image were released (how the holdout is judged
        when the thresholds are calibrated); the image itself when it cannot be stored."""
        try:
            return self.views(self.store_generated(model_image))
        except ValueError:
            return [torch.as_tensor(model_image).detach().cpu().float()]

    def judge(self, safeguard: PrivacySafeguard, stored: Sequence[np.ndarray]) -> list[SafeguardResult]:
        """One result per stored array, judged in all its views together (:meth:`PrivacySafeguard.check`): passed only
        if it is far enough in every space in every view; distances are the smallest over the views."""
        return safeguard.check([self.views(s) for s in stored])


class GuardedRelease:
    """Write judged images, their certificate and the private audit, committed atomically as one release.

    Use as a context manager; :meth:`add` every judged candidate (released or not) in order, then :meth:`finish`.
    Paths are validated when the object is created, before the caller does any work. The audit is written before
    the release is committed; an exception anywhere leaves no release (and an old one, if replaced, untouched).

    Args:
        out_dir: release folder.
        fmt: release format.
        modality: modality key.
        audit: path of the PRIVATE audit CSV (default: next to the release).
        overwrite: replace an existing release.
        stem: file stem pattern of released images, formatted with ``index`` (0, 1, ... in release order).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        fmt: str,
        modality: str,
        audit: str | os.PathLike | None = None,
        overwrite: bool = False,
        stem: str | None = None,
    ) -> None:
        if not isinstance(overwrite, bool):  # the string "false" from a command line is truthy
            raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
        self.out_dir = Path(out_dir).expanduser().absolute()
        self.audit = Path(audit).expanduser().absolute() if audit else default_audit_path(self.out_dir)
        check_release_paths(self.out_dir, self.audit, overwrite)
        self.modality = get_modality(modality)
        self.fmt = str(fmt).lower()
        self.writer = ReleaseWriter(self.out_dir, fmt=self.fmt, modality=self.modality.name, overwrite=overwrite)
        self.stem = stem or f"images/{self.modality.name}_{{index:05d}}"
        self.records: list[SampleRecord] = []
        self.requested = 0
        self._released = 0

    def __enter__(self) -> GuardedRelease:
        self.writer.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self.writer.__exit__(exc_type, exc, tb)

    def add(
        self,
        record: SampleRecord,
        stored: np.ndarray | None,
        spacing: Sequence[float] | None = None,
        direction: Sequence[Sequence[float]] | None = None,
    ) -> None:
        """Record a judged candidate and, if it passed, write exactly ``stored`` (the array that was judged) with the
        voxel ``spacing`` and axis ``direction`` of the training data (see ``ReleaseWriter.write_image``)."""
        if record.passed:
            if stored is None:
                raise ValueError("a released record needs its stored array")
            stem = self.stem.format(index=self._released)
            record.file = self.writer.write_image(stored, stem, spacing, direction)
            self._released += 1
        self.records.append(record)

    @property
    def result(self) -> GuardedSamplingResult:
        """The records so far as a guarded-sampling result (no images kept: they are already written)."""
        return GuardedSamplingResult(images=[], records=self.records, requested=self.requested or len(self.records))

    def finish(
        self,
        safeguard: PrivacySafeguard,
        fingerprints: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict:
        """Write the certificate into the release and the private audit next to it (before the commit).

        Returns:
            the summary (generated, rejected, released, ...) with ``out``, ``audit`` and ``thresholds``.
        """
        result = self.result
        write_certificate(self.writer, result, fingerprints=fingerprints, safeguard=safeguard, extra=extra)
        write_private_audit(self.audit, result, release_dir=self.out_dir)
        summary = result.summary()
        summary.update({"out": str(self.out_dir), "audit": str(self.audit), "thresholds": dict(safeguard.thresholds)})
        return summary
