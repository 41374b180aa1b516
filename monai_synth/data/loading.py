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

import importlib.util
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
    "ImageLoadError",
    "GreyPydicomReader",
    "SimpleITKReader",
    "FileTypeReader",
    "reader_for",
    "load_image",
    "is_dicom",
    "dicom_problem",
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


#: DICOM modalities that hold no image a model could learn from (segmentations, dose grids, plans, reports, signals).
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
"""JPEG Extended (12-bit): of the decoders pydicom uses, only pylibjpeg-libjpeg (GPL-3.0, an optional extra) reads it."""

_NON_IMAGE_MODALITIES = {
    "SEG": "a segmentation (SEG)",
    "RTDOSE": "an RT dose grid (RTDOSE)",
    "RTSTRUCT": "an RT structure set (RTSTRUCT)",
    "RTPLAN": "an RT plan (RTPLAN)",
    "RTRECORD": "an RT treatment record (RTRECORD)",
    "SR": "a structured report (SR)",
    "KO": "a key object selection (KO)",
    "PR": "a presentation state (PR)",
    "REG": "a registration (REG)",
    "DOC": "an encapsulated document (DOC)",
    "ECG": "a waveform (ECG)",
    "HD": "a waveform (HD)",
}
#: Words of SOP class names (pydicom's UID names) of the same non-image objects, for files without a Modality tag.
_NON_IMAGE_SOP_WORDS = (
    "Segmentation",
    "RT Dose",
    "RT Structure",
    "RT Plan",
    "RT Beams Treatment",
    " SR ",
    "Waveform",
    "Presentation State",
    "Registration",
    "Key Object",
    "Encapsulated",
    "Raw Data",
    "Spectroscopy",
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class ImageLoadError(ValueError):
    """An image file cannot be used: the message names the file, says what is wrong and how to fix it.

    Readers raise it instead of the decoder's own exception, which (deep inside MONAI's ``LoadImage``) names neither
    the file nor what to do about it.
    """


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


def dicom_problem(ds) -> str | None:
    """Why a pydicom dataset is not an image to train on (non-image object, no pixel data), or ``None``.

    A segmentation, an RT dose grid or a structured report next to the images of a study is common in hospital
    exports; some of them even carry pixel data, so they would otherwise train (a dose grid looks like a blurry
    image) or fail much later.
    """
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in _NON_IMAGE_MODALITIES:
        return f"is {_NON_IMAGE_MODALITIES[modality]}, not an image"
    sop = ds.get("SOPClassUID")
    sop_name = f" {getattr(sop, 'name', '')} " if sop is not None else ""
    for word in _NON_IMAGE_SOP_WORDS:
        if word in sop_name:
            return f"is a{'n' if sop_name.strip()[:1] in 'AEIOU' else ''} {sop_name.strip()} object, not an image"
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        return "holds no pixel data"
    return None


def _refusal(path: str | os.PathLike, what: str, err: BaseException | None = None) -> ImageLoadError:
    detail = f" ({type(err).__name__}: {err})" if err is not None else ""
    return ImageLoadError(
        f"image {os.fspath(path)} {what}{detail}. Replace it with a good copy (a truncated or corrupt file) or remove "
        "its row from the datalist"
    )


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

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """:func:`reader_for` chose this reader from the suffix or the ``DICM`` preamble already."""
        return True

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs):
        """Read like ``PydicomReader``, then refuse non-image objects; every failure names the file."""
        names = [os.fspath(n) for n in ensure_tuple(data)]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                img = super().read(data, **kwargs)
        except Exception as err:
            raise _refusal(", ".join(names), "cannot be read as DICOM", err) from err
        for warning in caught:
            # pydicom reads what it can of a cut file and only warns; the pixel data it dropped would then be missing
            if "End of file reached" in str(warning.message):
                raise _refusal(", ".join(names), f"is truncated ({warning.message})")
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        datasets = img if len(names) > 1 else [img]
        for name, item in zip(self.filenames, datasets):
            for slice_name, ds in zip(ensure_tuple(name), item if isinstance(item, list) else [item]):
                problem = dicom_problem(ds)
                if problem:
                    raise ImageLoadError(
                        f"DICOM {slice_name} {problem}; only image objects can be trained on: remove its row from "
                        "the datalist (or the file from the series folder)"
                    )
        return img

    def _get_array_data(self, img, filename):
        try:
            data = self._grey_array(img, filename)
        except ImageLoadError:
            raise
        except Exception as err:
            uid = getattr(getattr(img, "file_meta", None), "TransferSyntaxUID", None)
            syntax = f" ({uid.name})" if uid is not None else ""
            if uid == JPEG_EXTENDED and importlib.util.find_spec("libjpeg") is None:
                syntax += (
                    "; 12-bit JPEG Extended needs the GPL-3.0 decoder pylibjpeg-libjpeg: "
                    "pip install 'monai_synth[jpeg-extended]'"
                )
            raise _refusal(filename, f"has pixel data{syntax} that cannot be decoded", err) from err
        frames = int(getattr(img, "NumberOfFrames", 1) or 1)
        if frames > 1 and data.ndim == 3:
            # frames first (pydicom) -> last, so MONAI's row/column swap gives (x, y, frame) as for a series folder
            data = np.moveaxis(data, 0, -1)
        return data

    def _grey_array(self, img, filename):
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
        """Read with the chosen reader; return ``(reader, image, names)`` so ``get_data`` uses the same reader."""
        names = ensure_tuple(data)
        reader = reader_for(names[0])
        try:
            return reader, reader.read(data if len(names) > 1 else names[0], **kwargs), names
        except ImageLoadError:
            raise
        except Exception as err:
            raise _refusal(", ".join(map(os.fspath, names)), "cannot be read", err) from err

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Delegate to the reader that read the image; a decoding failure names the file."""
        reader, image, names = img
        try:
            return reader.get_data(image)
        except ImageLoadError:
            raise
        except Exception as err:
            raise _refusal(", ".join(map(os.fspath, names)), "cannot be decoded", err) from err


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
        ImageLoadError: the file cannot be read or decoded, or is a DICOM object that is not an image (SEG, RTDOSE,
            SR, ...); the message names the file.
    """
    from monai.transforms import LoadImage

    if not Path(path).exists():
        raise FileNotFoundError(f"image not found: {path}")
    loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)
    # a runtime reader: LoadImage's own readers would turn a read error into "cannot find a suitable reader"
    image = loader(os.fspath(path), reader=FileTypeReader())
    return np.ascontiguousarray(np.asarray(image.array if hasattr(image, "array") else image, dtype=np.float32))
