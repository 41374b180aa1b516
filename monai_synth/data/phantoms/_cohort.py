"""Cohort generation: patients, labels, studies."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from monai.utils import ensure_tuple_rep

from monai_synth.data.modalities import get_modality
from monai_synth.data.phantoms._base import ANATOMY, LESION, STUDY, PhantomModel, patient_rng
from monai_synth.data.phantoms._geometry import Pose, image_grid
from monai_synth.data.phantoms.ct import CTPhantom
from monai_synth.data.phantoms.mri import MRIPhantom
from monai_synth.data.phantoms.pet import PETPhantom
from monai_synth.data.phantoms.us import USPhantom

__all__ = ["generate_cohort", "iter_cohort", "PHANTOMS", "patient_id"]

PHANTOMS: dict[str, PhantomModel] = {"ct": CTPhantom(), "mri": MRIPhantom(), "pet": PETPhantom(), "us": USPhantom()}


def patient_id(index: int) -> str:
    return f"P{index:04d}"


def _check_args(
    modality: str, n_patients: int, images_per_patient: int, spatial_dims: int, spatial_size: int | Sequence[int]
) -> tuple[str, tuple[int, ...]]:
    mod = get_modality(modality)
    if int(n_patients) < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    if int(images_per_patient) < 1:
        raise ValueError(f"images_per_patient must be >= 1, got {images_per_patient}")
    if spatial_dims not in mod.spatial_dims:
        raise ValueError(
            f"spatial_dims={spatial_dims} is not available for {mod.name} phantoms; "
            f"use spatial_dims in {list(mod.spatial_dims)}"
        )
    scalar = np.isscalar(spatial_size)
    if not scalar and len(spatial_size) != spatial_dims:
        raise ValueError(
            f"spatial_size {tuple(spatial_size)} has {len(spatial_size)} axes but spatial_dims={spatial_dims}"
        )
    size = tuple(int(s) for s in ensure_tuple_rep(int(spatial_size) if scalar else spatial_size, spatial_dims))
    if min(size) < 4:
        raise ValueError(f"spatial_size must be at least 4 along every axis, got {tuple(size)}")
    return mod.name, size


def iter_cohort(
    modality: str,
    n_patients: int,
    images_per_patient: int = 3,
    spatial_dims: int = 2,
    spatial_size: int | Sequence[int] = 64,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    first_patient: int = 0,
) -> Iterator[dict[str, Any]]:
    """Lazily yield the records of :func:`generate_cohort`, one image at a time (constant memory for big cohorts)."""
    name, size = _check_args(modality, n_patients, images_per_patient, spatial_dims, spatial_size)
    if int(seed) < 0 or int(first_patient) < 0:
        raise ValueError(f"seed and first_patient must be >= 0, got seed={seed}, first_patient={first_patient}")
    mod = get_modality(name)
    if labels is not None:
        labels = [str(lb) for lb in labels]
        if not labels:
            raise ValueError("labels must not be empty; pass None for a balanced round-robin")
        for lb in labels:
            mod.label_index(lb)
    model = PHANTOMS[name]
    fov = model.fov(spatial_dims)
    spacing = tuple(float(f / n) for f, n in zip(fov, size))
    axes = model.axes(spatial_dims)
    for i in range(int(n_patients)):
        p = int(first_patient) + i
        label = labels[i % len(labels)] if labels is not None else mod.labels[p % len(mod.labels)]
        anatomy = model.anatomy(patient_rng(seed, p, ANATOMY), patient_rng(seed, p, LESION), label)
        centre = model.centre(anatomy, spatial_dims)
        scanner_pts = image_grid(size, fov, axes, centre, Pose.identity())
        for study in range(int(images_per_patient)):
            rng = patient_rng(seed, p, STUDY, study)
            pts = image_grid(size, fov, axes, centre, model.pose(rng, spatial_dims))
            image = model.render(pts, scanner_pts, spacing, anatomy, rng)
            record = {
                "image": np.asarray(image, dtype=np.float32)[None],
                "patient_id": patient_id(p),
                "label": label,
                "study": study,
                "spacing": spacing,
            }
            record.update(model.extras(anatomy))
            yield record


def generate_cohort(
    modality: str,
    n_patients: int,
    images_per_patient: int = 3,
    spatial_dims: int = 2,
    spatial_size: int | Sequence[int] = 64,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    first_patient: int = 0,
) -> list[dict[str, Any]]:
    """Generate a labelled phantom cohort in memory.

    Each patient has fixed anatomy (and lesion) drawn only from ``(seed, patient index)``; its repeat studies differ
    by pose, noise and intensity calibration, so re-identification and memorisation can be measured on phantoms.

    Args:
        modality: "ct", "mri", "pet" or "us".
        n_patients: number of patients.
        images_per_patient: repeat studies per patient.
        spatial_dims: 2 or 3 (ultrasound is 2D only).
        spatial_size: int or one value per axis; the field of view is fixed, so the spacing follows.
        seed: cohort seed; the same seed gives the same cohort.
        labels: labels assigned in turn to the generated patients (a list as long as ``n_patients`` gives each
            patient its own); default: the modality's labels round-robin over the global patient index.
        first_patient: global index of the first patient; ``first_patient=100`` gives patients not in a cohort of 100.

    Returns:
        one dict per image: "image" float32 (1, *spatial) in physical units (HU, a.u., SUV, grey 0-255), with
        spatial axes in MONAI reader order (x, y[, z]); "patient_id" ("P0000"); "label"; "study"; "spacing" (mm per
        axis); "lesion_size_mm" (0 without a lesion).

    Raises:
        ValueError: unknown modality or label, a spatial_dims the modality lacks (3D ultrasound), bad sizes.
    """
    return list(
        iter_cohort(modality, n_patients, images_per_patient, spatial_dims, spatial_size, seed, labels, first_patient)
    )
