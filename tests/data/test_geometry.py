"""Released NIfTI / DICOM keep the voxel size and orientation of the training images in model space, read back."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.data import Dataset
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage

from monai_synth.data.export import ReleaseWriter
from monai_synth.data.geometry import model_direction, model_spacing
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


def _oblique_volume(path, shape=(16, 16, 8), spacing=(0.8, 0.8, 2.5), degrees=30.0):
    """A volume whose rows run 30 degrees off the R axis in the axial plane (an oblique acquisition)."""
    a = np.deg2rad(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = (-20.0, 10.0, 5.0)
    data = np.random.default_rng(0).uniform(-1000, 500, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return {"image": str(path)}


def test_model_direction_is_the_training_images_orientation(tmp_path):
    train = Dataset([_oblique_volume(tmp_path / "ob.nii.gz")], modality_transforms("ct", (16, 16, 8), spatial_dims=3))
    affine = np.asarray(train[0]["image"].affine, dtype=np.float64)[:3, :3]
    direction = np.asarray(model_direction(train))
    np.testing.assert_allclose(direction, affine / np.linalg.norm(affine, axis=0), atol=1e-6)
    assert np.abs(direction - np.eye(3)).max() > 0.1  # still oblique after the RAS reorientation


def test_plain_arrays_have_no_orientation():
    with pytest.raises(ValueError, match="no affine"):
        model_direction([{"image": np.zeros((1, 4, 4))}])


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_release_files_read_back_with_the_training_orientation(tmp_path, fmt):
    train = Dataset([_oblique_volume(tmp_path / "ob.nii.gz")], modality_transforms("ct", (16, 16, 8), spatial_dims=3))
    spacing, direction = model_spacing(train), np.asarray(model_direction(train))
    with ReleaseWriter(tmp_path / "release", fmt, "ct") as writer:
        rel = writer.write_image(np.full((1, 16, 16, 8), 40.0, np.float32), "ct_0001", spacing, direction)
    written = tmp_path / "release" / rel
    if fmt == "nifti":
        affine = nib.load(str(written)).affine[:3, :3]
    else:
        slices = [pydicom.dcmread(f) for f in sorted(written.iterdir())]
        lps = np.diag([-1.0, -1.0, 1.0])
        iop = np.asarray([float(v) for v in slices[0].ImageOrientationPatient])
        np.testing.assert_allclose(iop, np.concatenate([lps @ direction[:, 0], lps @ direction[:, 1]]), atol=1e-6)
        step = np.subtract(*[np.asarray([float(v) for v in s.ImagePositionPatient]) for s in slices[1::-1]])
        np.testing.assert_allclose(step, lps @ direction[:, 2] * spacing[2], atol=1e-6)  # slices stacked along z
        affine = np.asarray(LoadImage(image_only=True)(str(written), reader=FileTypeReader()).affine)[:3, :3]
    np.testing.assert_allclose(affine / np.linalg.norm(affine, axis=0), direction, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(affine, axis=0), spacing, rtol=1e-5)


def test_a_direction_that_is_not_a_rotation_is_refused(tmp_path):
    with ReleaseWriter(tmp_path / "release", "nifti", "ct") as writer:
        with pytest.raises(ValueError, match="orthonormal"):
            writer.write_image(np.zeros((1, 4, 4, 4), np.float32), "v", (1.0, 1.0, 1.0), np.diag([1.0, 2.0, 1.0]))
