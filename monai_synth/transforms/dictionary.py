"""Dictionary versions of the modality intensity transforms (MONAI ``MapTransform`` style)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import InvertibleTransform, MapTransform

from monai_synth.transforms.array import (
    CTWindow,
    IntensityScale,
    MRIPercentileScale,
    PETSUVScale,
    UltrasoundGreyScale,
)

__all__ = [
    "IntensityScaled",
    "CTWindowd",
    "MRIPercentileScaled",
    "PETSUVScaled",
    "UltrasoundGreyScaled",
    "CTWindowD",
    "CTWindowDict",
    "MRIPercentileScaleD",
    "MRIPercentileScaleDict",
    "PETSUVScaleD",
    "PETSUVScaleDict",
    "UltrasoundGreyScaleD",
    "UltrasoundGreyScaleDict",
]


class IntensityScaled(MapTransform, InvertibleTransform):
    """Apply an array :class:`~monai_synth.transforms.array.IntensityScale` to each key.

    The array transform records its parameters on each ``MetaTensor`` it produces, so ``inverse`` (and MONAI's
    ``Invertd``) restore physical units per key.

    Args:
        keys: keys of the images to transform.
        scaler: the array transform.
        allow_missing_keys: skip keys that are absent.
    """

    backend = IntensityScale.backend

    def __init__(self, keys: KeysCollection, scaler: IntensityScale, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scaler = scaler

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler.inverse(d[key])
        return d


class CTWindowd(IntensityScaled):
    """Dictionary :class:`~monai_synth.transforms.array.CTWindow`."""

    def __init__(
        self,
        keys: KeysCollection,
        window_min: float = -1000.0,
        window_max: float = 1000.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, CTWindow(window_min, window_max), allow_missing_keys)


class MRIPercentileScaled(IntensityScaled):
    """Dictionary :class:`~monai_synth.transforms.array.MRIPercentileScale` (percentiles per image and key)."""

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 1.0,
        upper: float = 99.0,
        clip: bool = False,
        reference: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, MRIPercentileScale(lower, upper, clip=clip, reference=reference), allow_missing_keys)


class PETSUVScaled(IntensityScaled):
    """Dictionary :class:`~monai_synth.transforms.array.PETSUVScale`."""

    def __init__(
        self, keys: KeysCollection, suv_max: float = 15.0, log: bool = False, allow_missing_keys: bool = False
    ):
        super().__init__(keys, PETSUVScale(suv_max, log=log), allow_missing_keys)


class UltrasoundGreyScaled(IntensityScaled):
    """Dictionary :class:`~monai_synth.transforms.array.UltrasoundGreyScale`."""

    def __init__(self, keys: KeysCollection, max_grey: float = 255.0, allow_missing_keys: bool = False):
        super().__init__(keys, UltrasoundGreyScale(max_grey), allow_missing_keys)


CTWindowD = CTWindowDict = CTWindowd
MRIPercentileScaleD = MRIPercentileScaleDict = MRIPercentileScaled
PETSUVScaleD = PETSUVScaleDict = PETSUVScaled
UltrasoundGreyScaleD = UltrasoundGreyScaleDict = UltrasoundGreyScaled
