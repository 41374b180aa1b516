"""Released NIfTI / DICOM keep the voxel size of the training images in model space, read back from the files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.data import Dataset
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage

from monai_synth.data.export import ReleaseWriter
from monai_synth.data.geometry import model_spacing
from monai_synth.data.loading import FileTypeReader
from monai_synth.transforms.presets import modality_transforms


def _volume(path, shape, spacing):
    data = np.random.default_rng(0).uniform(-1000, 500, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, *([1.0] * (4 - len(spacing)))])), str(path))
    return {"image": str(path)}


def test_volumes_keep_their_slice_spacing(tmp_path):
    records = [_volume(tmp_path / f"ct{i}.nii.gz", (16, 16, 8), (0.8, 0.8, 12.5)) for i in range(2)]
    train = Dataset(records, modality_transforms("ct", (16, 16, 8), spatial_dims=3))
    assert model_spacing(train) == pytest.approx((0.8, 0.8, 12.5))


def test_resized_images_get_the_resized_spacing(tmp_path):
    records = [_volume(tmp_path / "a.nii.gz", (64, 48), (0.5, 0.5))]
    train = Dataset(records, modality_transforms("ct", (32, 32), spatial_dims=2, resize="resize"))
    assert model_spacing(train) == pytest.approx((1.0, 0.75))


def test_mixed_spacings_give_the_median(tmp_path, caplog):
    records = [_volume(tmp_path / f"m{i}.nii.gz", (16, 16), (s, s)) for i, s in enumerate((0.5, 0.6, 0.9))]
    train = Dataset(records, modality_transforms("ct", (16, 16), spatial_dims=2))
    assert model_spacing(train) == pytest.approx((0.6, 0.6))
    assert "different voxel sizes" in caplog.text


def test_plain_arrays_are_refused():
    with pytest.raises(ValueError, match="no affine"):
        model_spacing([{"image": np.zeros((1, 4, 4))}])


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_release_files_read_back_with_the_training_spacing(tmp_path, fmt):
    records = [_volume(tmp_path / "ct.nii.gz", (16, 16, 8), (0.8, 0.8, 12.5))]
    spacing = model_spacing(Dataset(records, modality_transforms("ct", (16, 16, 8), spatial_dims=3)))
    with ReleaseWriter(tmp_path / "release", fmt, "ct") as writer:
        rel = writer.write_image(np.full((1, 16, 16, 8), 40.0, np.float32), "ct_0001", spacing)
    written = tmp_path / "release" / rel
    image = LoadImage(image_only=True)(str(written), reader=FileTypeReader())
    np.testing.assert_allclose(affine_to_spacing(image.affine, r=3), (0.8, 0.8, 12.5), rtol=1e-5)
    if fmt == "dicom":
        ds = pydicom.dcmread(sorted(written.iterdir())[1])
        assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.8] and float(ds.SliceThickness) == 12.5
