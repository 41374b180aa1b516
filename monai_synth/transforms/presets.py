"""Per-modality presets: the whole loading chain from a datalist record to a model-space tensor.

One function builds what every stage needs (autoencoder training, latent caching, the privacy index, evaluation),
so all of them see the same pixels: a training image and the index entry for it can never disagree because one
stage resized differently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    Spacingd,
)
from monai.utils import ensure_tuple_rep, instantiate, look_up_option

from monai_synth.data.loading import FileTypeReader
from monai_synth.data.modalities import get_modality
from monai_synth.transforms.array import IntensityScale
from monai_synth.transforms.dictionary import IntensityScaled

__all__ = [
    "intensity_transform",
    "intensity_transformd",
    "intensity_reference",
    "modality_transforms",
    "batch_load",
    "load_with",
    "EnsureSpatialDimsd",
]

RESIZE_MODES = ("pad_crop", "resize")

#: Model-space value of "no signal" (air in CT, background in MRI / PET, black in ultrasound); padding uses it.
BACKGROUND = -1.0


class EnsureSpatialDimsd(MapTransform):
    """Check that channel-first images have ``spatial_dims`` spatial axes, dropping trailing singleton axes.

    A 2D image saved as a one-slice volume (``(1, H, W, 1)``) is squeezed to ``(1, H, W)``; any other mismatch
    (e.g. a 3D volume in a 2D pipeline) fails here with a clear message instead of deep inside a resize.

    Args:
        keys: image keys.
        spatial_dims: expected number of spatial axes.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = int(spatial_dims)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            while image.ndim - 1 > self.spatial_dims and image.shape[-1] == 1:
                image = image[..., 0]
            if image.ndim - 1 != self.spatial_dims:
                source = getattr(image, "meta", {}).get("filename_or_obj", key)
                raise ValueError(
                    f"{source}: expected {self.spatial_dims}D images (channel-first shape with {self.spatial_dims} "
                    f"spatial axes), got shape {tuple(image.shape)}; set spatial_dims to match the files "
                    "(taking 2D slices from 3D volumes is not supported)"
                )
            d[key] = image
        return d


def intensity_transform(modality: str, **kwargs: Any) -> IntensityScale:
    """The invertible array intensity transform of a modality.

    The class is the one the modality table names (``Modality.intensity``), e.g. ``CTWindow`` for CT.

    Args:
        modality: a key of :data:`monai_synth.data.modalities.MODALITIES`.
        kwargs: arguments of that transform (e.g. ``window_min=-200`` for CT, ``reference=(lo, hi)`` for MRI so
            generated images can be inverted).

    Returns:
        The transform; ``transform.inverse(model_images)`` gives physical units back.
    """
    return instantiate(get_modality(modality).intensity, "default", **kwargs)


def intensity_reference(
    records: Sequence[Mapping[str, Any]], modality: str, **kwargs: Any
) -> tuple[float, float] | None:
    """Dataset-level physical range that inverts generated images of a modality scaled per image (MRI percentiles).

    A generated MRI volume has no percentiles of its own, so the release needs the training images' typical ones
    (the median over ``records``, :meth:`~monai_synth.transforms.array.MRIPercentileScale.reference_from`) to bring it
    back to the data's units. Modalities with a fixed physical range (CT, PET, ultrasound) need none.

    Args:
        records: datalist records of the training images (``"image"`` paths).
        modality: modality key.
        kwargs: arguments of the modality's intensity transform (e.g. ``lower`` / ``upper`` percentiles).

    Returns:
        ``(lower_value, upper_value)``, or ``None`` for a modality whose transform has a fixed range.
    """
    transform = intensity_transform(modality, **kwargs)
    if not hasattr(transform, "reference_from"):
        return None
    from monai.transforms import LoadImage

    loader = LoadImage(reader=FileTypeReader(), image_only=True)
    return transform.reference_from([loader(rec["image"]) for rec in records])


def intensity_transformd(modality: str, keys: Sequence[str] = ("image",), **kwargs: Any) -> IntensityScaled:
    """Dictionary version of :func:`intensity_transform`."""
    return IntensityScaled(keys, intensity_transform(modality, **kwargs))


def _size_tuple(spatial_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    try:
        size = tuple(int(s) for s in ensure_tuple_rep(spatial_size, spatial_dims))
    except ValueError:
        size = ()
    if len(size) != spatial_dims or min(size) < 1:
        raise ValueError(f"spatial_size must be a positive int or {spatial_dims} positive ints, got {spatial_size}")
    return size


def modality_transforms(
    modality: str,
    spatial_size: int | Sequence[int],
    keys: Sequence[str] = ("image",),
    spatial_dims: int = 2,
    pixdim: Sequence[float] | None = None,
    resize: str = "pad_crop",
    intensity_kwargs: Mapping[str, Any] | None = None,
    load: bool = True,
    intensity: IntensityScale | None = None,
) -> Compose:
    """Build the loading chain of a modality as a MONAI ``Compose``.

    ``LoadImaged`` (reader chosen per file by :func:`monai_synth.data.loading.reader_for`) -> ``EnsureChannelFirstd``
    -> for 3D volumes ``Orientationd("RAS")`` and, when ``pixdim`` is given, ``Spacingd`` -> the modality's
    intensity transform -> ``ResizeWithPadOrCropd`` (pads with the model-space background -1) or ``Resized`` ->
    ``EnsureTyped(float32)``. Every step is invertible, so ``Compose.inverse`` / ``Invertd`` return to the input
    grid and physical units.

    Args:
        modality: ``ct``, ``mri``, ``pet`` or ``us``.
        spatial_size: output size, an int (same on every axis) or one int per axis.
        keys: image keys (other keys of a record, e.g. ``label``, pass through untouched).
        spatial_dims: 2 (images) or 3 (volumes). Taking 2D slices from 3D files is not supported.
        pixdim: target voxel size in mm for 3D volumes (``None`` keeps the native grid).
        resize: ``"pad_crop"`` keeps the pixel scale (centre crop / pad) or ``"resize"`` interpolates to
            ``spatial_size`` (area for 2D, trilinear for 3D).
        intensity_kwargs: arguments of the intensity transform (see :func:`intensity_transform`).
        load: include ``LoadImaged`` + ``EnsureChannelFirstd``; set False when the records already hold arrays.
        intensity: the intensity transform to use, e.g. the one object whose ``inverse`` also exports the generated
            images (a bundle builds it once); ``None`` builds the modality's with ``intensity_kwargs``.

    Returns:
        ``monai.transforms.Compose``.
    """
    mod = get_modality(modality)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if spatial_dims not in mod.spatial_dims:
        raise ValueError(f"{mod.name} supports spatial_dims {list(mod.spatial_dims)}, got {spatial_dims}")
    try:
        resize = look_up_option(resize, RESIZE_MODES)
    except ValueError as e:
        raise ValueError(f"resize: {e}") from None
    if intensity is not None and intensity_kwargs:
        raise ValueError("pass either an intensity transform or intensity_kwargs to build one, not both")
    size = _size_tuple(spatial_size, spatial_dims)
    keys = tuple(keys)
    xforms: list = []
    if load:
        xforms += [
            LoadImaged(keys, reader=FileTypeReader(), image_only=True),
            EnsureChannelFirstd(keys),
        ]
    xforms.append(EnsureSpatialDimsd(keys, spatial_dims))
    if spatial_dims == 3:
        xforms.append(Orientationd(keys, axcodes="RAS"))
        if pixdim is not None:
            if len(pixdim) != 3:
                raise ValueError(f"pixdim must have 3 values for 3D volumes, got {pixdim}")
            xforms.append(Spacingd(keys, pixdim=tuple(float(p) for p in pixdim), mode="bilinear"))
    if intensity is None:
        intensity = intensity_transform(mod.name, **dict(intensity_kwargs or {}))
    xforms.append(IntensityScaled(keys, intensity))
    if resize == "pad_crop":
        xforms.append(ResizeWithPadOrCropd(keys, spatial_size=size, mode="constant", value=BACKGROUND))
    else:
        xforms.append(Resized(keys, spatial_size=size, mode="area" if spatial_dims == 2 else "trilinear"))
    xforms.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(xforms)


def batch_load(
    records: Sequence[Mapping[str, Any]],
    modality: str,
    spatial_size: int | Sequence[int],
    spatial_dims: int = 2,
    **kwargs: Any,
) -> torch.Tensor:
    """Load records' images into one model-space tensor ``(N, 1, *spatial_size)`` (float32, CPU).

    For building privacy indices and evaluation sets; the images go through exactly the chain of
    :func:`modality_transforms` (extra ``kwargs`` are passed to it).

    Args:
        records: datalist records with an ``"image"`` path.
        modality: ``ct``, ``mri``, ``pet`` or ``us``.
        spatial_size: output size per axis (int or tuple).
        spatial_dims: 2 or 3.

    Returns:
        ``torch.Tensor`` of shape ``(N, 1, *spatial)``.
    """
    size = _size_tuple(spatial_size, spatial_dims)
    if len(records) == 0:
        return torch.zeros((0, 1, *size), dtype=torch.float32)
    chain = modality_transforms(modality, size, keys=("image",), spatial_dims=spatial_dims, **kwargs)
    return torch.stack([load_with(chain, rec["image"]) for rec in records])


def load_with(chain: Compose, path: str | os.PathLike) -> torch.Tensor:
    """One image through a :func:`modality_transforms` chain, as a float32 ``(1, *spatial)`` tensor.

    Lets a caller build the chain once and load file by file (e.g. to refuse one unreadable file, not the batch).

    Raises:
        ValueError: if the image does not have exactly one grey channel.
    """
    image = chain({"image": os.fspath(path)})["image"]
    image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    if image.shape[0] != 1:
        raise ValueError(f"{path} loaded with {image.shape[0]} channels; expected one grey channel")
    return image.to(torch.float32)
