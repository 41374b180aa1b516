"""Geometry helpers shared by the phantom renderers.

Every phantom is an analytic function of *anatomical* coordinates in millimetres. A study samples that function on a
grid of image coordinates that has been moved by the study's pose (a small rotation and shift), so repeat studies of one
patient differ exactly as repositioned acquisitions do, and the 2D phantoms are planes cut through the same 3D anatomy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Pose", "RandomField", "sample_pose", "image_grid", "soft_inside", "ellipsoid_radius", "rotation_matrix"]


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about the x, then y, then z axis by ``angles_deg`` (degrees)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Pose:
    """Rigid placement of the patient in the scanner for one study: ``anatomy = rotation @ image + shift`` (mm)."""

    rotation: np.ndarray
    shift: np.ndarray

    @staticmethod
    def identity() -> Pose:
        return Pose(np.eye(3), np.zeros(3))


def sample_pose(rng: np.random.Generator, shift_mm: Sequence[float], angle_deg: Sequence[float]) -> Pose:
    """Draw a repositioning error: Gaussian shift (std per axis, mm) and rotation (std per axis, degrees), both clipped
    at 2 standard deviations so no study is an outlier that no longer looks like its patient."""
    shift = np.clip(rng.standard_normal(3), -2, 2) * np.asarray(shift_mm, dtype=np.float64)
    angles = np.clip(rng.standard_normal(3), -2, 2) * np.asarray(angle_deg, dtype=np.float64)
    return Pose(rotation_matrix(angles), shift)


def image_grid(
    shape: Sequence[int], fov_mm: Sequence[float], axes: Sequence[int], offset_mm: Sequence[float], pose: Pose
) -> np.ndarray:
    """Anatomical coordinates (3, *shape) in mm of the voxel centres of an image.

    Args:
        shape: spatial shape of the image (2 or 3 axes).
        fov_mm: field of view per image axis; the spacing is ``fov / shape``.
        axes: which anatomical axis (0 = x, 1 = y, 2 = z) each image axis runs along.
        offset_mm: anatomical position of the image centre (the slice level of a 2D image).
        pose: the study's repositioning, applied about the image centre.
    """
    pts = np.zeros((3, *shape), dtype=np.float64)
    for i, (n, fov, ax) in enumerate(zip(shape, fov_mm, axes)):
        spacing = fov / n
        line = (np.arange(n) - (n - 1) / 2.0) * spacing
        view = [1] * len(shape)
        view[i] = n
        pts[ax] = pts[ax] + line.reshape(view)
    flat = pts.reshape(3, -1)
    flat = pose.rotation @ flat + (np.asarray(offset_mm, dtype=np.float64) + pose.shift)[:, None]
    # float32 from here on: sub-micrometre precision is plenty and single precision halves the rendering time
    return flat.reshape(3, *shape).astype(np.float32)


class RandomField:
    """A smooth, unit-variance random function of position, fixed by the generator that drew it.

    Implemented as a sum of random Fourier features (Rahimi & Recht, 2007): it can be evaluated at any anatomical
    position, so a patient's tissue texture moves with the patient when the pose changes, and 2D slices of it agree
    with the 3D volume.

    Args:
        rng: generator the waves are drawn from.
        wavelength_mm: (shortest, longest) wavelength; sets how fine the texture is.
        n_waves: number of cosines; more gives a more Gaussian field.
        anisotropy: per-axis stretch of the wavelength, e.g. (1, 1, 3) for structures elongated along z.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        wavelength_mm: tuple[float, float],
        n_waves: int = 24,
        anisotropy: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        direction = rng.standard_normal((n_waves, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = np.exp(rng.uniform(np.log(wavelength_mm[0]), np.log(wavelength_mm[1]), n_waves))
        self.k = 2 * np.pi * direction / wavelength[:, None] / np.asarray(anisotropy, dtype=np.float64)[None]
        self.phase = rng.uniform(0, 2 * np.pi, n_waves)
        self.norm = np.sqrt(2.0 / n_waves)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        shape = pts.shape[1:]
        # float32 phases: single-precision cos is several times faster and phases of a few hundred radians keep
        # ~1e-5 accuracy, far below any noise added later
        flat = pts.reshape(3, -1).astype(np.float32)
        k, phase = self.k.astype(np.float32), self.phase.astype(np.float32)[:, None]
        out = np.empty(flat.shape[1], dtype=np.float32)
        # chunks keep the (waves x points) phase matrix small for 3D volumes
        for start in range(0, flat.shape[1], 1 << 15):
            block = flat[:, start : start + (1 << 15)]
            out[start : start + block.shape[1]] = np.cos(k @ block + phase).sum(axis=0)
        return (out * np.float32(self.norm)).reshape(shape)


def ellipsoid_radius(pts: np.ndarray, centre: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoidal radius: < 1 inside, 1 on the surface. Semi-axes of ``inf`` give cylinders."""
    c = np.asarray(centre, dtype=pts.dtype).reshape(3, *([1] * (pts.ndim - 1)))
    a = np.asarray(semi_axes, dtype=pts.dtype).reshape(3, *([1] * (pts.ndim - 1)))
    return np.sqrt(np.sum(((pts - c) / a) ** 2, axis=0))


def soft_inside(signed_depth_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """Partial-volume occupancy (0..1) from a signed depth (positive inside), so edges are anti-aliased and move
    continuously with sub-voxel pose changes."""
    return 0.5 * (1.0 + np.tanh(signed_depth_mm / max(width_mm, 1e-6)))
