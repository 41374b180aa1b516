"""Per-modality loading chains: shapes, model-space range, invertibility."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from monai_synth.data.loading import load_image
from monai_synth.transforms import (
    CTWindow,
    MRIPercentileScale,
    PETSUVScale,
    UltrasoundGreyScale,
    batch_load,
    intensity_transform,
    modality_transforms,
)


@pytest.mark.parametrize(
    "modality,cls", [("ct", CTWindow), ("mri", MRIPercentileScale), ("pet", PETSUVScale), ("us", UltrasoundGreyScale)]
)
def test_intensity_transform_per_modality(modality, cls):
    assert type(intensity_transform(modality)) is cls


def test_intensity_kwargs_reach_the_transform():
    assert intensity_transform("CT", window_min=-200).window_min == -200.0
    assert intensity_transform("mri", reference=(5.0, 50.0)).reference == (5.0, 50.0)


def test_us_png_padded_with_model_background(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)  # rows x columns
    Image.fromarray(grey).save(tmp_path / "us.png")
    out = modality_transforms("us", 32)({"image": str(tmp_path / "us.png"), "label": "4a"})
    image = out["image"]
    assert out["label"] == "4a"
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    # (x, y) = (24, 20) image centred in 32 x 32: 4 pixels padding on x, 6 on y
    np.testing.assert_allclose(image[0, 4:28, 6:26].numpy(), grey.T / 127.5 - 1.0, atol=1e-6)
    assert torch.all(image[0, :4] == -1.0) and torch.all(image[0, :, :6] == -1.0)


def test_resize_mode_interpolates(tmp_path):
    grey = np.full((40, 40), 255, np.uint8)
    Image.fromarray(grey).save(tmp_path / "us.png")
    image = modality_transforms("us", 16, resize="resize")({"image": str(tmp_path / "us.png")})["image"]
    assert image.shape == (1, 16, 16)
    np.testing.assert_allclose(image.numpy(), 1.0, atol=1e-6)  # no padding: the whole field is the image


def test_ct_volume_with_spacing_and_inverse(tmp_path):
    hu = np.random.default_rng(1).uniform(-1000, 1000, (10, 12, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.diag([1.0, 1.0, 2.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    resampled = modality_transforms("ct", 16, spatial_dims=3, pixdim=(2.0, 2.0, 2.0))(
        {"image": str(tmp_path / "ct.nii.gz")}
    )
    assert resampled["image"].shape == (1, 16, 16, 16)
    np.testing.assert_allclose(resampled["image"].pixdim.numpy(), (2.0, 2.0, 2.0))

    chain = modality_transforms("ct", (16, 16, 8), spatial_dims=3)
    out = chain({"image": str(tmp_path / "ct.nii.gz")})
    assert out["image"].shape == (1, 16, 16, 8)
    back = chain.inverse(out)["image"]
    assert back.shape == (1, 10, 12, 6)
    np.testing.assert_allclose(back.numpy()[0], hu, atol=0.05)  # physical HU again


def test_mri_chain_inverts_with_recorded_percentiles(tmp_path):
    signal = np.random.default_rng(2).gamma(2.0, 150.0, (16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(signal, np.eye(4)), str(tmp_path / "mr.nii.gz"))
    chain = modality_transforms("mri", 16)
    out = chain({"image": str(tmp_path / "mr.nii.gz")})
    assert abs(float(out["image"].median())) < 1.0
    np.testing.assert_allclose(chain.inverse(out)["image"].numpy()[0], signal, rtol=1e-4, atol=1e-2)


def test_batch_load_real_dicom_in_model_space(tmp_path):
    ct = get_testdata_file("CT_small.dcm", download=False)
    hu = np.random.default_rng(3).uniform(-500, 500, (20, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    records = [{"image": ct, "patient_id": "A", "label": "normal"}, {"image": str(tmp_path / "ct.nii.gz")}]
    batch = batch_load(records, "ct", 32, spatial_dims=2)
    assert batch.shape == (2, 1, 32, 32) and batch.dtype == torch.float32
    expected = np.clip(load_image(ct)[0, 48:80, 48:80], -1000, 1000) / 1000.0  # centre crop, window [-1000, 1000]
    np.testing.assert_allclose(batch[0, 0].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(batch[1, 0, 6:26, 6:26].numpy(), hu / 1000.0, atol=1e-6)
    assert batch_load([], "ct", 8).shape == (0, 1, 8, 8)


def test_argument_checks():
    with pytest.raises(ValueError, match="us supports spatial_dims"):
        modality_transforms("us", 16, spatial_dims=3)
    with pytest.raises(ValueError, match="spatial_size"):
        modality_transforms("ct", (16, 16, 16), spatial_dims=2)
    with pytest.raises(ValueError, match="resize"):
        modality_transforms("ct", 16, resize="stretch")
    with pytest.raises(ValueError, match="unknown modality"):
        intensity_transform("xray")


def test_wrong_dimensionality_is_a_clear_error(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), str(tmp_path / "vol.nii.gz"))
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps the transform's error
        modality_transforms("ct", 8)({"image": str(tmp_path / "vol.nii.gz")})
    assert "expected 2D images" in str(err.value.__cause__) and "vol.nii.gz" in str(err.value.__cause__)
    nib.save(nib.Nifti1Image(np.ones((8, 6, 1), np.float32), np.eye(4)), str(tmp_path / "slice.nii.gz"))
    assert modality_transforms("ct", 8)({"image": str(tmp_path / "slice.nii.gz")})["image"].shape == (1, 8, 8)
