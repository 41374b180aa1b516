"""The physical geometry of model space, so released volumes keep the voxel size and orientation of their data.

A model generates arrays on the grid of its training images after the loading chain (orientation, optional
resampling, resize or pad/crop to ``spatial_size``). MONAI tracks that grid in each image's affine, so the voxel size
and the direction of each array axis that a released NIfTI or DICOM must carry are read from the training images as
the model saw them, not assumed (the release writers otherwise default to 1 mm along R, A, S: a CT trained at
12.5 mm slices came out 12.5 times too thin, and an oblique or flipped acquisition came out axis-aligned).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data.utils import affine_to_spacing

__all__ = ["model_direction", "model_spacing"]

logger = logging.getLogger(__name__)


def model_spacing(images: Sequence[Any], tolerance: float = 0.01, key: str = "image") -> tuple[float, ...]:
    """Voxel size in mm per spatial axis of the training images in model space.

    Args:
        images: the training dataset after the loading chain (e.g. the bundle's ``train_images``), whose items hold
            MONAI ``MetaTensor`` images ``(C, *spatial)`` under ``key``.
        tolerance: relative spread per axis above which the images are said to differ (logged); the median is
            returned then, as the one grid the model's outputs can be given.
        key: image key of the items.

    Returns:
        One spacing per spatial axis (MONAI axis order).

    Raises:
        ValueError: an empty dataset, or items without an affine (plain arrays, whose geometry is unknown).
    """
    if len(images) == 0:
        raise ValueError("no training images to read the model-space spacing from")
    spacings = []
    for index in range(len(images)):
        image = images[index][key]
        affine = getattr(image, "affine", None)
        if affine is None:
            raise ValueError(
                f"training image {index} carries no affine (a plain array, not a MONAI MetaTensor), so its voxel "
                "size is unknown; load the training images with MONAI's LoadImaged"
            )
        spacings.append(affine_to_spacing(np.asarray(affine, dtype=np.float64), r=int(image.ndim) - 1))
    spacings = np.asarray(spacings, dtype=np.float64)
    median = np.median(spacings, axis=0)
    spread = (spacings.max(axis=0) - spacings.min(axis=0)) / median
    if np.any(spread > tolerance):
        logger.warning(
            f"the training images have different voxel sizes in model space (from {spacings.min(axis=0).tolist()} to "
            f"{spacings.max(axis=0).tolist()} mm); released images are written with the median {median.tolist()} mm"
        )
    return tuple(float(s) for s in median)


def model_direction(
    images: Sequence[Any], tolerance: float = 1e-3, key: str = "image"
) -> tuple[tuple[float, ...], ...]:
    """Direction cosines of the training images' array axes in model space: a 3 x 3 matrix whose columns are the
    world (RAS) directions of the array axes ``x, y, z`` (for 2D images the third column is the plane's normal).

    Args:
        images: the training dataset after the loading chain, whose items hold MONAI ``MetaTensor`` images.
        tolerance: largest difference of a cosine between images still taken as the same orientation.
        key: image key of the items.

    Returns:
        The orientation most training images share (a warning names how many differ), as nested tuples.

    Raises:
        ValueError: an empty dataset, or items without an affine.
    """
    if len(images) == 0:
        raise ValueError("no training images to read the model-space orientation from")
    directions = []
    for index in range(len(images)):
        affine = getattr(images[index][key], "affine", None)
        if affine is None:
            raise ValueError(
                f"training image {index} carries no affine (a plain array, not a MONAI MetaTensor), so its orientation "
                "is unknown; load the training images with MONAI's LoadImaged"
            )
        affine = np.asarray(affine, dtype=np.float64)
        linear = np.eye(3)
        r = min(3, affine.shape[0] - 1)
        linear[:r, :r] = affine[:r, :r]
        directions.append(linear / np.linalg.norm(linear, axis=0, keepdims=True))
    same = [sum(np.abs(d - other).max() <= tolerance for other in directions) for d in directions]
    chosen = directions[int(np.argmax(same))]
    if max(same) < len(directions):
        logger.warning(
            f"{len(directions) - max(same)} of {len(directions)} training images have another orientation in model "
            f"space; released images are written with the orientation of the others, {chosen.round(4).tolist()}"
        )
    return tuple(tuple(float(v) for v in row) for row in chosen)
