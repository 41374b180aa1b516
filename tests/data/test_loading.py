"""Loading real DICOM (shipped with pydicom), NIfTI, PNG and ITK files through MONAI readers."""

from __future__ import annotations

import copy
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.data import NibabelReader, PILReader
from monai.transforms import LoadImaged
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale

from monai_synth.data.loading import FileTypeReader, GreyPydicomReader, SimpleITKReader, load_image, reader_for

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _testdata(name):
    return get_testdata_file(name, download=False)


def test_ct_small_in_hounsfield_units():
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = apply_rescale(ds.pixel_array, ds)  # pydicom's own rescaled values
    image = load_image(path)
    assert isinstance(reader_for(path), GreyPydicomReader)
    assert image.dtype == np.float32 and image.shape == (1, 128, 128)
    np.testing.assert_allclose(image[0], hu.T)  # MONAI axis order (x, y) = transposed rows/columns
    assert image.min() < -800  # raw stored values are non-negative; HU shows air / fat


def test_mr_small():
    path = _testdata("MR_small.dcm")
    image = load_image(path)
    assert image.shape == (1, 64, 64)
    np.testing.assert_array_equal(image[0], pydicom.dcmread(path).pixel_array.T.astype(np.float32))


def test_colour_ultrasound_becomes_grey():
    path = _testdata("examples_rgb_color.dcm")  # an RGB ultrasound image shipped with pydicom
    ds = pydicom.dcmread(path)
    assert ds.Modality == "US" and ds.SamplesPerPixel == 3
    image = load_image(path)
    assert image.shape == (1, 320, 240)
    expected = ds.pixel_array.astype(np.float32) @ LUMA
    np.testing.assert_allclose(image[0], expected.T, atol=1e-3)


def test_dicom_series_folder_stacks_slices_by_instance_number(tmp_path):
    src = pydicom.dcmread(_testdata("CT_small.dcm"))
    hu0 = apply_rescale(src.pixel_array, src).T
    series = tmp_path / "series"
    series.mkdir()
    base = src.pixel_array.astype(np.int16)
    for k in (2, 0, 1):  # written out of order; InstanceNumber decides
        ds = copy.deepcopy(src)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.PixelData = (base + 100 * k).astype(np.int16).tobytes()
        ds.save_as(series / f"slice_{5 - k}.dcm")
    volume = load_image(series)
    assert volume.shape == (1, 128, 128, 3)
    for k in range(3):
        np.testing.assert_allclose(volume[0, :, :, k], hu0 + 100 * k)


def test_nifti(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 7, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 2.0, 1.0])), str(tmp_path / "x.nii.gz"))
    assert isinstance(reader_for(tmp_path / "x.nii.gz"), NibabelReader)
    np.testing.assert_array_equal(load_image(tmp_path / "x.nii.gz")[0], data)


def test_png_grey_and_rgb(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)  # rows x columns
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert isinstance(reader_for(tmp_path / "g.png"), PILReader)
    image = load_image(tmp_path / "g.png")
    assert image.shape == (1, 10, 12)
    np.testing.assert_array_equal(image[0], grey.T)

    rgb = np.stack([grey, 255 - grey, np.full_like(grey, 30)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image = load_image(tmp_path / "c.png")
    assert image.shape == (1, 10, 12)
    np.testing.assert_allclose(image[0], (rgb.astype(np.float32) @ LUMA).T, atol=1.0)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_through_simpleitk(tmp_path, suffix):
    data = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)  # SimpleITK order (z, y, x)
    img = sitk.GetImageFromArray(data)
    img.SetSpacing((0.7, 0.8, 3.0))
    path = tmp_path / f"x{suffix}"
    sitk.WriteImage(img, str(path))
    reader = reader_for(path)
    assert type(reader).__name__ in ("ITKReader", "SimpleITKReader")
    np.testing.assert_allclose(load_image(path)[0], data.T)
    loaded = LoadImaged("image", reader=SimpleITKReader(), image_only=True, ensure_channel_first=True)({"image": path})
    np.testing.assert_allclose(loaded["image"].pixdim.numpy(), [0.7, 0.8, 3.0], rtol=1e-5)


def test_file_type_reader_matches_load_image(tmp_path):
    shutil.copy(_testdata("CT_small.dcm"), tmp_path / "ct.dcm")
    nib.save(nib.Nifti1Image(np.ones((3, 4), np.float32), np.eye(4)), str(tmp_path / "x.nii"))
    loader = LoadImaged("image", reader=FileTypeReader(), image_only=True, ensure_channel_first=True)
    for name in ("ct.dcm", "x.nii"):
        out = loader({"image": str(tmp_path / name)})["image"]
        np.testing.assert_array_equal(out.numpy(), load_image(tmp_path / name))


def test_missing_image():
    with pytest.raises(FileNotFoundError):
        load_image("/nonexistent/image.nii.gz")
