"""Load images through MONAI readers, choosing the reader from the file type.

MONAI's ``LoadImage`` picks a reader by trying the registered ones in order, which depends on which optional
packages happen to be installed. Here the choice is explicit and the same everywhere (``load_image``, the
``LoadImaged`` of the presets, the privacy index), so a given file is always read the same way:

* DICOM file, or a folder holding a DICOM series -> :class:`GreyPydicomReader` (MONAI ``PydicomReader``);
* ``.nii`` / ``.nii.gz`` -> MONAI ``NibabelReader``;
* ``.png`` / ``.jpg`` / ``.bmp`` -> MONAI ``PILReader`` (colour converted to grey);
* ``.npy`` / ``.npz`` -> MONAI ``NumpyReader``;
* anything else (``.mha``, ``.mhd``, ``.nrrd``, ...) -> MONAI ``ITKReader`` when ``itk`` is installed, otherwise
  :class:`SimpleITKReader`. MONAI ships no SimpleITK reader and ``itk`` is a heavy optional package, while
  SimpleITK is a dependency of this project, so a small reader implementing ``monai.data.ImageReader`` on top of
  SimpleITK lives here.

The models work on single-channel grey images, so colour inputs (RGB ultrasound DICOM, palette images, RGB PNG)
are converted to luminance (ITU-R BT.601 weights) by the readers themselves.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, NibabelReader, NumpyReader, PILReader, PydicomReader
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple, optional_import

__all__ = [
    "GreyPydicomReader",
    "SimpleITKReader",
    "FileTypeReader",
    "reader_for",
    "load_image",
    "is_dicom",
]

_itk, _has_itk = optional_import("itk")

# MONAI's LoadImage builds every reader it knows, including the optional GPU (nvImageCodec) DICOM decoder, which
# then warns on every load on a machine without it. Its absence is the normal case here: pydicom decodes instead.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*nvImageCodec decoder plugin did not register.*", category=UserWarning)

#: ITU-R BT.601 luma weights, used to turn colour images into the grey images the models expect.
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_NUMPY_SUFFIXES = (".npy", ".npz")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _full_suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_dicom(path: str | os.PathLike) -> bool:
    """``True`` for a DICOM file (by suffix or the ``DICM`` preamble) or a folder (a DICOM series)."""
    path = Path(path)
    if path.is_dir():
        return True
    if _full_suffix(path) in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _pil_to_grey(image):
    """PILReader converter: colour and palette images -> 8-bit luminance; grey images (8/16/32 bit) unchanged."""
    if image.mode in ("RGB", "RGBA", "P", "PA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
        return image.convert("L")
    return image


class GreyPydicomReader(PydicomReader):
    """MONAI ``PydicomReader`` that returns single-channel grey images.

    Ultrasound DICOM is often stored as RGB, YBR or palette colour. ``PydicomReader`` keeps the colour samples as
    a trailing axis that ``EnsureChannelFirst`` then mistakes for a spatial axis; this reader converts colour
    samples to luminance first, so every DICOM gives one channel. Rescale slope / intercept (e.g. Hounsfield
    units) are applied as in ``PydicomReader``. Arguments are those of ``PydicomReader``.
    """

    def _get_array_data(self, img, filename):
        photometric = str(getattr(img, "PhotometricInterpretation", "")).upper()
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            data = apply_color_lut(img.pixel_array, img)
            if data.dtype == np.uint16:  # 16-bit LUT entries -> the 8-bit grey range of other colour images
                data = data.astype(np.float32) / 257.0
        else:
            data = super()._get_array_data(img, filename)
        if int(getattr(img, "SamplesPerPixel", 1)) > 1 or photometric == "PALETTE COLOR":
            data = np.asarray(data[..., :3], dtype=np.float32) @ _LUMA
        return data


class SimpleITKReader(ImageReader):
    """Read ITK formats (``.mha``, ``.mhd``, ``.nrrd``, ...) with SimpleITK, following MONAI's ``ITKReader``.

    MONAI has no SimpleITK reader; this one mirrors ``ITKReader``'s conventions so it can stand in for it when
    the ``itk`` package is not installed: spatial axes in (x, y[, z]) order (the reverse of SimpleITK's numpy
    view), the affine built from direction, spacing and origin and converted from LPS to RAS, multi-component
    pixels returned channel-last with ``original_channel_dim = -1``. A folder is read as a DICOM series through
    ``sitk.ImageSeriesReader``.

    Args:
        channel_dim: channel axis of the returned data; ``None`` infers ``no_channel`` or ``-1``.
        affine_lps_to_ras: convert the affine from ITK's LPS to RAS, as the other MONAI readers do.
    """

    def __init__(self, channel_dim: str | int | None = None, affine_lps_to_ras: bool = True, **kwargs):
        super().__init__()
        self.channel_dim = float("nan") if channel_dim == "no_channel" else channel_dim
        self.affine_lps_to_ras = affine_lps_to_ras
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """SimpleITK reads most medical formats; defer to it rather than keep a suffix list."""
        return True

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs):
        """Read one file / series folder (returns a ``SimpleITK.Image``) or several (returns a list)."""
        import SimpleITK as sitk

        images = []
        for name in ensure_tuple(data):
            name = os.fspath(name)
            if Path(name).is_dir():
                reader = sitk.ImageSeriesReader()
                files = reader.GetGDCMSeriesFileNames(name)
                if not files:
                    raise ValueError(f"no DICOM series found in folder {name}")
                reader.SetFileNames(files)
                images.append(reader.Execute())
            else:
                images.append(sitk.ReadImage(name))
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Return ``(array, meta)`` like ``ITKReader.get_data``; several images are stacked as channels."""
        import SimpleITK as sitk

        arrays, meta = [], {}
        # a SimpleITK image is iterable (over its pixels), so do not use ensure_tuple here
        for image in img if isinstance(img, (list, tuple)) else [img]:
            array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) -> MONAI order (x, y, z[, c])
            n_spatial = image.GetDimension()
            if image.GetNumberOfComponentsPerPixel() > 1:
                array = np.moveaxis(array.T, 0, -1)
            else:
                array = array.T
            spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
            direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(n_spatial, n_spatial)
            origin = np.asarray(image.GetOrigin(), dtype=np.float64)
            sr = min(n_spatial, 3)
            affine = np.eye(sr + 1)
            affine[:sr, :sr] = direction[:sr, :sr] @ np.diag(spacing[:sr])
            affine[:sr, -1] = origin[:sr]
            if self.affine_lps_to_ras:
                affine = orientation_ras_lps(affine)
            header: dict[str, Any] = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
            header["spacing"] = spacing
            header[MetaKeys.ORIGINAL_AFFINE] = affine
            header[MetaKeys.AFFINE] = affine.copy()
            header[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
            header[MetaKeys.SPATIAL_SHAPE] = np.asarray(image.GetSize()[:sr])
            if self.channel_dim is None:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if array.ndim == sr else -1
            else:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
            arrays.append(array)
            if not meta:
                meta = header
        if len(arrays) == 1:
            return arrays[0], meta
        if isinstance(meta[MetaKeys.ORIGINAL_CHANNEL_DIM], int):
            return np.concatenate(arrays, axis=meta[MetaKeys.ORIGINAL_CHANNEL_DIM]), meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta


def reader_for(path: str | os.PathLike) -> ImageReader:
    """A fresh MONAI reader for ``path``, chosen by file type (see the module docstring for the table).

    Args:
        path: image file, or a folder holding one DICOM series.

    Returns:
        An ``ImageReader`` instance (a new one per call: MONAI's DICOM reader keeps per-read state).
    """
    suffix = _full_suffix(path)
    if suffix in _NIFTI_SUFFIXES:
        return NibabelReader()
    if suffix in _PIL_SUFFIXES:
        return PILReader(converter=_pil_to_grey)
    if suffix in _NUMPY_SUFFIXES:
        return NumpyReader()
    if is_dicom(path):
        return GreyPydicomReader()
    if _has_itk:
        from monai.data import ITKReader

        return ITKReader()
    return SimpleITKReader()


class FileTypeReader(ImageReader):
    """A reader for ``LoadImage`` / ``LoadImaged`` that dispatches each file to :func:`reader_for`'s choice.

    ``LoadImaged`` takes one reader for every file; cohorts may mix formats (e.g. ultrasound PNG and DICOM), so this
    reader picks per file and keeps no state between reads (safe in multi-worker data loaders).
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """Every file type has a reader (ITK/SimpleITK take the rest)."""
        return True

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs):
        """Read with the chosen reader and return ``(reader, image)`` so ``get_data`` can use the same reader."""
        names = ensure_tuple(data)
        reader = reader_for(names[0])
        return reader, reader.read(data if len(names) > 1 else names[0], **kwargs)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Delegate to the reader that read the image."""
        reader, image = img
        return reader.get_data(image)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Load one image as a float32 channel-first array ``(C, *spatial)`` in its physical units.

    Uses MONAI ``LoadImage(ensure_channel_first=True)`` with :func:`reader_for`'s reader, so the array is in MONAI's
    axis convention (x, y[, z]; for DICOM and PNG the transpose of the row-major pixel array).

    Args:
        path: image file, or a folder holding a DICOM series.

    Returns:
        ``np.ndarray`` of dtype float32 (DICOM rescale slope / intercept applied, e.g. Hounsfield units for CT).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    from monai.transforms import LoadImage

    if not Path(path).exists():
        raise FileNotFoundError(f"image not found: {path}")
    loader = LoadImage(reader=reader_for(path), image_only=True, ensure_channel_first=True, dtype=np.float32)
    image = loader(os.fspath(path))
    return np.ascontiguousarray(np.asarray(image.array if hasattr(image, "array") else image, dtype=np.float32))
