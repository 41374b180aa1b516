"""The interface every phantom modality implements, and the random streams that give patients their identity."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from monai_synth.data.phantoms._geometry import Pose, sample_pose

__all__ = ["PhantomModel", "patient_rng", "ANATOMY", "LESION", "STUDY"]

# Independent random streams per patient. Anatomy and lesion are separate so a patient's anatomy does not depend on
# the label it was given, and the study stream is indexed by the study so repeat studies are new draws.
ANATOMY, LESION, STUDY = 0, 1, 2


def patient_rng(seed: int, patient_index: int, stream: int, *extra: int) -> np.random.Generator:
    """Generator that depends only on (seed, patient index, stream, extra): patient identity is reproducible whatever
    cohort the patient is generated in."""
    return np.random.default_rng([int(seed), int(patient_index), int(stream), *[int(e) for e in extra]])


class PhantomModel(ABC):
    """One imaging modality's phantom.

    A phantom is an analytic function of anatomical coordinates (mm). ``anatomy`` draws a patient's fixed parameters,
    ``render`` evaluates one study of that patient on a posed grid and adds the acquisition's physics (resolution,
    noise, intensity calibration), returning physical units.
    """

    #: image axis -> anatomical axis (0 = x left-right, 1 = y anterior-posterior/depth, 2 = z cranio-caudal)
    axes_2d: tuple[int, int] = (0, 1)
    axes_3d: tuple[int, int, int] = (0, 1, 2)
    #: field of view (mm) of the 2D image axes and of the 3D volume axes
    fov_2d: tuple[float, float] = (256.0, 256.0)
    fov_3d: tuple[float, float, float] = (256.0, 256.0, 256.0)
    #: repositioning between studies: shift std (mm) and rotation std (degrees) about x, y, z
    pose_shift_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    pose_angle_deg: tuple[float, float, float] = (1.0, 1.0, 2.0)

    def fov(self, spatial_dims: int) -> tuple[float, ...]:
        return self.fov_2d if spatial_dims == 2 else self.fov_3d

    def axes(self, spatial_dims: int) -> tuple[int, ...]:
        return self.axes_2d if spatial_dims == 2 else self.axes_3d

    def pose(self, rng: np.random.Generator, spatial_dims: int) -> Pose:
        return sample_pose(rng, self.pose_shift_mm, self.pose_angle_deg)

    @abstractmethod
    def anatomy(self, rng: np.random.Generator, lesion_rng: np.random.Generator, label: str) -> dict[str, Any]:
        """Fixed parameters of one patient (shape, sizes, textures, lesion) given its label."""

    @abstractmethod
    def centre(self, anatomy: dict[str, Any], spatial_dims: int) -> np.ndarray:
        """Anatomical position (mm) of the image centre; for 2D images this sets the patient's slice level."""

    @abstractmethod
    def render(
        self,
        pts: np.ndarray,
        scanner_pts: np.ndarray,
        spacing: tuple[float, ...],
        anatomy: dict[str, Any],
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Physical-unit image of one study.

        Args:
            pts: anatomical coordinates (3, *spatial) of the voxels, after the study's pose.
            scanner_pts: the same voxels in scanner coordinates (no pose), for effects fixed to the device
                (coil bias field, beam direction).
            spacing: mm per image axis.
            anatomy: the patient's parameters from :meth:`anatomy`.
            rng: the study's generator (noise, intensity calibration).
        """

    def extras(self, anatomy: dict[str, Any]) -> dict[str, float]:
        """Continuous conditions recorded with every image of the patient."""
        return {"lesion_size_mm": float(anatomy.get("lesion_size_mm", 0.0))}
