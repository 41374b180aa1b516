"""Modality intensity transforms: physical units <-> model space ([-1, 1]).

Each transform maps one modality's physical intensities (Hounsfield units, MRI signal, SUV, ultrasound grey
levels) to roughly [-1, 1], the range the autoencoder and diffusion model are trained in, and has an ``inverse``
that maps model-space images back to physical units, so released images are written in the units clinicians and
downstream tools expect.

All of them follow MONAI's invertible pattern: called on a ``MetaTensor`` (with meta tracking on) they push their
parameters onto ``applied_operations`` so ``Compose.inverse`` / ``Invertd`` can undo them. Generated images carry
no such history; their inverse uses the transform's own (fixed or reference) parameters instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import InvertibleTransform
from monai.utils import TraceKeys, TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = [
    "IntensityScale",
    "CTWindow",
    "MRIPercentileScale",
    "PETSUVScale",
    "UltrasoundGreyScale",
]


class IntensityScale(InvertibleTransform):
    """Base for the modality transforms: ``y = 2 * (f(clip(x)) - f(lo)) / (f(hi) - f(lo)) - 1`` with monotone ``f``.

    Subclasses give the physical range ``(lo, hi)`` and optionally ``f`` (identity, or ``log1p`` for PET). The
    forward clips to ``[lo, hi]`` when ``clip`` is set (so model space is exactly [-1, 1]); the inverse clips model
    values to [-1, 1] first when ``clip`` is set, because a generated value outside the training range has no
    physical meaning the model learned.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, clip: bool = True, log: bool = False):
        self.clip = bool(clip)
        self.log = bool(log)

    def _range(self, img: torch.Tensor) -> tuple[float, float]:
        """Physical values mapped to -1 and +1 for ``img`` (subclasses may compute them from the image)."""
        raise NotImplementedError

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x) if self.log else x

    def _f_inv(self, y: torch.Tensor) -> torch.Tensor:
        return torch.expm1(y) if self.log else y

    def _fv(self, v: float) -> float:
        return math.log1p(v) if self.log else v

    def _forward(self, img: NdarrayOrTensor, lo: float, hi: float) -> torch.Tensor:
        x = convert_to_tensor(img, dtype=torch.float32, track_meta=get_track_meta())
        if self.clip:
            x = torch.clamp(x, lo, hi)
        elif self.log:
            x = torch.clamp(x, min=0.0)  # log1p is undefined below -1; SUV is non-negative anyway
        flo, fhi = self._fv(lo), self._fv(hi)
        denom = fhi - flo if fhi != flo else 1.0
        return 2.0 * (self._f(x) - flo) / denom - 1.0

    def _backward(self, img: NdarrayOrTensor, lo: float, hi: float) -> torch.Tensor:
        y = convert_to_tensor(img, dtype=torch.float32, track_meta=get_track_meta())
        if self.clip:
            y = torch.clamp(y, -1.0, 1.0)
        flo, fhi = self._fv(lo), self._fv(hi)
        denom = fhi - flo if fhi != flo else 1.0
        x = self._f_inv((y + 1.0) / 2.0 * denom + flo)
        return torch.clamp(x, lo, hi) if self.clip else x

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Physical units -> model space; returns the input's type (numpy stays numpy)."""
        lo, hi = self._range(img)
        out = self._forward(img, lo, hi)
        out, *_ = convert_to_dst_type(out, dst=img, dtype=torch.float32)
        if isinstance(out, MetaTensor):
            self.push_transform(out, extra_info={"lower_value": lo, "upper_value": hi})
        return out

    def _pop_values(self, img: Any) -> tuple[float, float] | None:
        """Pop this transform's record from a ``MetaTensor``'s history, if it is the most recent operation."""
        if not isinstance(img, MetaTensor) or not img.applied_operations:
            return None
        last = img.applied_operations[-1]
        if last.get(TraceKeys.CLASS_NAME) != self.__class__.__name__:
            return None
        info = self.pop_transform(img, check=False)[TraceKeys.EXTRA_INFO]
        return float(info["lower_value"]), float(info["upper_value"])

    def inverse(self, data: NdarrayOrTensor) -> NdarrayOrTensor:
        """Model space -> physical units."""
        values = self._pop_values(data)
        lo, hi = values if values is not None else self._inverse_range()
        with self.trace_transform(False):
            out = self._backward(data, lo, hi)
        out, *_ = convert_to_dst_type(out, dst=data, dtype=torch.float32)
        return out

    def _inverse_range(self) -> tuple[float, float]:
        raise NotImplementedError

    def forward_as_inverse(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Physical units -> model space by the range :meth:`inverse` uses for an image without a history, so that
        ``forward_as_inverse(inverse(y))`` is ``y`` up to clipping. For a modality scaled per image (MRI) that is the
        dataset-level reference, not the image's own percentiles; for a fixed range it is the usual forward."""
        out = self._forward(img, *self._inverse_range())
        out, *_ = convert_to_dst_type(out, dst=img, dtype=torch.float32)
        return out


class CTWindow(IntensityScale):
    """CT Hounsfield window -> [-1, 1].

    ``window_min`` maps to -1 and ``window_max`` to +1; values outside the window are clipped (the model cannot
    represent them, so the inverse gives at most the window edges). The default [-1000, 1000] HU keeps air, lung,
    soft tissue and most bone.

    Args:
        window_min: HU mapped to -1.
        window_max: HU mapped to +1.
    """

    def __init__(self, window_min: float = -1000.0, window_max: float = 1000.0):
        if not window_max > window_min:
            raise ValueError(f"window_max ({window_max}) must be greater than window_min ({window_min})")
        super().__init__(clip=True)
        self.window_min, self.window_max = float(window_min), float(window_max)

    def _range(self, img):
        return self.window_min, self.window_max

    def _inverse_range(self):
        return self.window_min, self.window_max


class PETSUVScale(IntensityScale):
    """PET standardised uptake value -> [-1, 1].

    SUV 0 maps to -1 and ``suv_max`` to +1 (clipped above; hot lesions beyond ``suv_max`` saturate). With
    ``log=True`` the mapping is ``log1p`` so that the low-uptake background keeps more of the model's range
    while hot spots stay distinguishable.

    Args:
        suv_max: SUV mapped to +1.
        log: scale ``log1p(SUV)`` instead of SUV.
    """

    def __init__(self, suv_max: float = 15.0, log: bool = False):
        if not suv_max > 0:
            raise ValueError(f"suv_max must be positive, got {suv_max}")
        super().__init__(clip=True, log=log)
        self.suv_max = float(suv_max)

    def _range(self, img):
        return 0.0, self.suv_max

    def _inverse_range(self):
        return 0.0, self.suv_max


class UltrasoundGreyScale(IntensityScale):
    """Ultrasound grey levels ``0..max_grey`` -> [-1, 1] (clipped).

    Args:
        max_grey: grey level mapped to +1 (255 for 8-bit images).
    """

    def __init__(self, max_grey: float = 255.0):
        if not max_grey > 0:
            raise ValueError(f"max_grey must be positive, got {max_grey}")
        super().__init__(clip=True)
        self.max_grey = float(max_grey)

    def _range(self, img):
        return 0.0, self.max_grey

    def _inverse_range(self):
        return 0.0, self.max_grey


class MRIPercentileScale(IntensityScale):
    """MRI robust percentile scaling: the image's ``lower`` / ``upper`` percentiles -> -1 / +1.

    MRI intensities have no absolute unit, so each image is scaled by its own robust range; tails beyond the
    percentiles are kept (values go somewhat beyond [-1, 1]) unless ``clip=True``, so that without clipping the
    inverse is exact.

    Inverting needs the two percentile values. For a loaded image they are recorded in the ``MetaTensor``'s
    ``applied_operations`` (MONAI's invertible pattern, used by ``Compose.inverse`` / ``Invertd``). A *generated*
    image has no percentiles of its own, so it is inverted with a dataset-level reference: pass explicit
    ``lower_value`` / ``upper_value`` to :meth:`inverse`, or construct the transform with ``reference=(lo, hi)``,
    e.g. from :meth:`reference_from` (the median percentiles of the training images).

    Args:
        lower: lower percentile (0-100) mapped to -1.
        upper: upper percentile (0-100) mapped to +1.
        clip: clip to [-1, 1] (loses the tails; the inverse then returns at most the percentile values).
        reference: dataset-level ``(lower_value, upper_value)`` used to invert images without a recorded history.
    """

    def __init__(
        self,
        lower: float = 1.0,
        upper: float = 99.0,
        clip: bool = False,
        reference: Sequence[float] | None = None,
    ):
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        super().__init__(clip=clip)
        self.lower, self.upper = float(lower), float(upper)
        self.reference = None if reference is None else self._check_pair(reference)

    @staticmethod
    def _check_pair(pair: Sequence[float]) -> tuple[float, float]:
        lo, hi = (float(v) for v in pair)
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
            raise ValueError(f"percentile values must be finite with upper >= lower, got {pair}")
        return lo, hi

    def percentiles(self, img: NdarrayOrTensor) -> tuple[float, float]:
        """The image's ``(lower, upper)`` percentile values (over all channels and voxels)."""
        x = convert_to_tensor(img, dtype=torch.float32, track_meta=False).flatten()
        q = torch.tensor([self.lower / 100.0, self.upper / 100.0], dtype=torch.float32)
        if x.numel() > 16_000_000:  # torch.quantile has an input size limit; fall back to numpy
            lo, hi = np.percentile(x.numpy(), [self.lower, self.upper])
            return float(lo), float(hi)
        lo, hi = torch.quantile(x, q).tolist()
        return float(lo), float(hi)

    def reference_from(self, images: Sequence[NdarrayOrTensor]) -> tuple[float, float]:
        """Dataset-level reference: the median of the images' percentile values (robust to odd scans).

        Use it to invert generated images: ``MRIPercentileScale(reference=t.reference_from(training_images))``.
        """
        if len(images) == 0:
            raise ValueError("need at least one image to compute a reference")
        values = np.asarray([self.percentiles(img) for img in images])
        return float(np.median(values[:, 0])), float(np.median(values[:, 1]))

    def _range(self, img):
        return self.percentiles(img)

    def __call__(
        self, img: NdarrayOrTensor, lower_value: float | None = None, upper_value: float | None = None
    ) -> NdarrayOrTensor:
        """Scale by the image's own percentiles, or by explicit ``lower_value`` / ``upper_value`` when both given."""
        if (lower_value is None) != (upper_value is None):
            raise ValueError("pass both lower_value and upper_value, or neither")
        lo, hi = self._check_pair((lower_value, upper_value)) if lower_value is not None else self._range(img)
        out = self._forward(img, lo, hi)
        out, *_ = convert_to_dst_type(out, dst=img, dtype=torch.float32)
        if isinstance(out, MetaTensor):
            self.push_transform(out, extra_info={"lower_value": lo, "upper_value": hi})
        return out

    def _forward(self, img, lo, hi):
        x = convert_to_tensor(img, dtype=torch.float32, track_meta=get_track_meta())
        denom = hi - lo if hi > lo else 1.0  # a constant image maps to -1 instead of dividing by zero
        y = 2.0 * (x - lo) / denom - 1.0
        return torch.clamp(y, -1.0, 1.0) if self.clip else y

    def _backward(self, img, lo, hi):
        y = convert_to_tensor(img, dtype=torch.float32, track_meta=get_track_meta())
        if self.clip:
            y = torch.clamp(y, -1.0, 1.0)
        denom = hi - lo if hi > lo else 1.0
        return (y + 1.0) / 2.0 * denom + lo

    def inverse(
        self, data: NdarrayOrTensor, lower_value: float | None = None, upper_value: float | None = None
    ) -> NdarrayOrTensor:
        """Model space -> MRI units.

        The percentile values come from, in order: explicit ``lower_value`` / ``upper_value``; the image's recorded
        history (a ``MetaTensor`` this transform produced); the ``reference`` given at construction.

        Raises:
            ValueError: none of those is available (a generated image with no reference).
        """
        if (lower_value is None) != (upper_value is None):
            raise ValueError("pass both lower_value and upper_value, or neither")
        recorded = self._pop_values(data)
        if lower_value is not None:
            lo, hi = self._check_pair((lower_value, upper_value))
        elif recorded is not None:
            lo, hi = recorded
        else:
            lo, hi = self._inverse_range()
        with self.trace_transform(False):
            out = self._backward(data, lo, hi)
        out, *_ = convert_to_dst_type(out, dst=data, dtype=torch.float32)
        return out

    def _inverse_range(self):
        if self.reference is None:
            raise ValueError(
                "this image has no recorded percentiles (e.g. it was generated); pass lower_value= and "
                "upper_value= to inverse(), or build MRIPercentileScale(reference=...) with dataset-level values "
                "from reference_from(training_images)"
            )
        return self.reference
