"""Modality intensity transforms (array + dictionary pairs, MONAI style) and per-modality loading presets."""

from __future__ import annotations

from monai_synth.transforms.array import CTWindow, IntensityScale, MRIPercentileScale, PETSUVScale, UltrasoundGreyScale
from monai_synth.transforms.dictionary import (
    CTWindowD,
    CTWindowd,
    CTWindowDict,
    IntensityScaled,
    MRIPercentileScaleD,
    MRIPercentileScaled,
    MRIPercentileScaleDict,
    PETSUVScaleD,
    PETSUVScaled,
    PETSUVScaleDict,
    UltrasoundGreyScaleD,
    UltrasoundGreyScaled,
    UltrasoundGreyScaleDict,
)
from monai_synth.transforms.presets import (
    EnsureSpatialDimsd,
    batch_load,
    intensity_transform,
    intensity_transformd,
    modality_transforms,
)

__all__ = [
    "IntensityScale",
    "CTWindow",
    "MRIPercentileScale",
    "PETSUVScale",
    "UltrasoundGreyScale",
    "IntensityScaled",
    "CTWindowd",
    "CTWindowD",
    "CTWindowDict",
    "MRIPercentileScaled",
    "MRIPercentileScaleD",
    "MRIPercentileScaleDict",
    "PETSUVScaled",
    "PETSUVScaleD",
    "PETSUVScaleDict",
    "UltrasoundGreyScaled",
    "UltrasoundGreyScaleD",
    "UltrasoundGreyScaleDict",
    "EnsureSpatialDimsd",
    "intensity_transform",
    "intensity_transformd",
    "modality_transforms",
    "batch_load",
]
