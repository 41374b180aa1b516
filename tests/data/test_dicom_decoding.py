"""Compressed DICOM (every compressed transfer syntax pydicom ships a test file of) and the files that must be refused."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale
from pydicom.uid import SegmentationStorage

from monai_synth.data.loading import JPEG_EXTENDED, ImageLoadError, dicom_problem, load_image

LUMA = np.array([0.299, 0.587, 0.114], np.float32)

# pydicom's own test data marks these as corrupt on purpose: JPGExtended.dcm is the repaired JPEG-lossy.dcm (invalid
# SOS parameters), and the other J2K stream holds a sequence delimiter; no decoder reads them, so they are refused.
CORRUPT = ("JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm")
# the files of the issue, and one file per compressed transfer syntax, must be among those that load
NAMED = (
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "GDCMJ2K_TextGBR.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
)


def _compressed_images() -> list[str]:
    """Names of pydicom's test files that hold an image in a compressed transfer syntax.

    Only the files its wheel ships: ``get_testdata_files`` would also try to download its external test files, which
    makes the covered set depend on the network (and nothing may download at test time).
    """
    names = []
    for path in sorted(Path(get_testdata_file("CT_small.dcm")).parent.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # pydicom ships deliberately broken files too
            continue
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None or not syntax.is_compressed or Path(path).name in CORRUPT:
            continue
        full = pydicom.dcmread(path)
        if dicom_problem(full) is None:
            names.append(Path(path).name)
    return sorted(set(names))


COMPRESSED = _compressed_images()


def _expected(ds) -> np.ndarray:
    """pydicom's own decode, made grey and put in MONAI's (x, y[, frame]) order."""
    pixels = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        pixels = pixels.astype(np.float32) @ LUMA
    else:
        pixels = apply_rescale(pixels, ds).astype(np.float32)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return np.moveaxis(pixels, 0, -1).swapaxes(0, 1)
    return pixels.T


def test_every_compressed_transfer_syntax_is_covered():
    assert set(NAMED) <= set(COMPRESSED)
    syntaxes = {
        pydicom.dcmread(get_testdata_file(n), stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        for n in COMPRESSED
    }
    for kind in (
        "JPEG Baseline",
        "JPEG Extended",
        "JPEG Lossless",
        "JPEG-LS Lossless",
        "JPEG-LS Lossy",
        "JPEG 2000",
        "RLE",
    ):
        assert any(s.startswith(kind) for s in syntaxes), kind


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_dicom_loads_as_pydicom_decodes_it(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID == JPEG_EXTENDED and importlib.util.find_spec("libjpeg") is None:
        # the one syntax only the GPL-3.0 decoder reads: without the optional extra, a refusal that says what to install
        with pytest.raises(ImageLoadError, match=r"monai_synth\[jpeg-extended\]"):
            load_image(path)
        return
    image = load_image(path)
    expected = _expected(ds)
    assert image.dtype == np.float32 and image.shape == (1, *expected.shape)
    assert image.shape[1:3] == (ds.Columns, ds.Rows)
    np.testing.assert_allclose(image[0], expected, rtol=1e-5, atol=1e-3)


def test_multi_frame_ultrasound_is_x_y_frame():
    path = get_testdata_file("examples_ybr_color.dcm")  # 30-frame colour ultrasound clip, JPEG baseline
    ds = pydicom.dcmread(path)
    image = load_image(path)
    assert image.shape == (1, ds.Columns, ds.Rows, 30)
    np.testing.assert_allclose(image[0, :, :, 7], (ds.pixel_array[7].astype(np.float32) @ LUMA).T, atol=1e-3)


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_codestream_is_refused_naming_the_file(name):
    path = get_testdata_file(name)
    with pytest.raises(ImageLoadError, match=rf"{name}.*cannot be decoded"):
        load_image(path)


@pytest.mark.parametrize(
    ("name", "what"), [("rtdose.dcm", "RT dose"), ("rtdose_rle.dcm", "RT dose"), ("test-SR.dcm", "structured report")]
)
def test_non_image_objects_are_refused(name, what):
    with pytest.raises(ImageLoadError, match=rf"{name} is an? {what}.*not an image"):
        load_image(get_testdata_file(name))


def test_segmentation_is_refused(tmp_path):
    ds = copy.deepcopy(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    ds.SOPClassUID = SegmentationStorage
    ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.Modality = "SEG"
    ds.save_as(tmp_path / "seg.dcm")
    with pytest.raises(ImageLoadError, match=r"seg\.dcm is a segmentation"):
        load_image(tmp_path / "seg.dcm")


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "GDCMJ2K_TextGBR.dcm", "CT_small.dcm"])
def test_truncated_dicom_is_refused_naming_the_file(tmp_path, name):
    data = Path(get_testdata_file(name)).read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ImageLoadError, match=rf"cut_{name}.*(truncated|cannot be)"):
        load_image(cut)


def test_pydicom_truncated_file_is_refused():
    with pytest.raises(ImageLoadError, match=r"MR_truncated\.dcm.*cannot be decoded"):
        load_image(get_testdata_file("MR_truncated.dcm"))


def test_truncated_png_is_refused_naming_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.png cannot be decoded.*truncated"):
        load_image(tmp_path / "cut.png")
