"""Release writers: round trips in physical units, clean DICOM, atomic commits."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from monai_synth.data.export import ReleaseWriter
from monai_synth.data.loading import load_image
from monai_synth.data.modalities import MODALITIES


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name and path.name in p.name)


def test_nifti_round_trip_with_spacing(tmp_path):
    volume = np.random.default_rng(0).normal(0, 3, (1, 6, 5, 4)).astype(np.float32)
    out = tmp_path / "release"
    with ReleaseWriter(out, "nifti", "pet") as writer:
        rel = writer.write_image(torch.from_numpy(volume), "images/pet_0001", spacing=(1.5, 1.5, 3.0))
    assert rel == "images/pet_0001.nii.gz"
    nii = nib.load(str(out / rel))
    assert nii.get_data_dtype() == np.float32
    np.testing.assert_allclose(nii.header.get_zooms(), (1.5, 1.5, 3.0))
    np.testing.assert_array_equal(load_image(out / rel), volume)


def test_png_uint8_clipped_round_trip(tmp_path):
    grey = np.random.default_rng(1).uniform(-20, 280, (1, 9, 7)).astype(np.float32)
    with ReleaseWriter(tmp_path / "r", "png", "us") as writer:
        rel = writer.write_image(grey, "us_0001")
    loaded = load_image(tmp_path / "r" / rel)
    np.testing.assert_array_equal(loaded, np.clip(np.rint(grey), 0, 255))
    assert np.asarray(Image.open(tmp_path / "r" / rel)).dtype == np.uint8


def test_png_refuses_volumes(tmp_path):
    with ReleaseWriter(tmp_path / "r", "png", "us") as writer, pytest.raises(ValueError, match="2D only"):
        writer.write_image(np.zeros((1, 4, 4, 4)), "v")


def test_ct_dicom_series_round_trips_hounsfield_units(tmp_path):
    hu = np.random.default_rng(2).uniform(-1024, 3000, (1, 10, 8, 3)).astype(np.float32)
    with ReleaseWriter(tmp_path / "r", "dicom", "ct") as writer:
        rel = writer.write_image(hu, "ct_0001", spacing=(0.7, 0.8, 2.5))
    series = tmp_path / "r" / rel
    slices = sorted(series.iterdir())
    assert len(slices) == 3
    ds = pydicom.dcmread(slices[0])
    assert ds.pixel_array.dtype == np.int16 and ds.Modality == "CT"
    assert float(ds.RescaleSlope) == 1.0 and ds.RescaleType == "HU"
    loaded = load_image(series)
    assert loaded.shape == hu.shape
    np.testing.assert_allclose(loaded, hu, atol=0.5 + 1e-3)
    from monai.transforms import LoadImage

    from monai_synth.data.loading import FileTypeReader

    meta = LoadImage(reader=FileTypeReader(), image_only=True, ensure_channel_first=True)(str(series))
    np.testing.assert_allclose(meta.pixdim.numpy(), (0.7, 0.8, 2.5), rtol=1e-5)


@pytest.mark.parametrize("modality", sorted(MODALITIES))
def test_dicom_tags_are_synthetic_and_fresh(tmp_path, modality):
    shape = (1, 8, 6)
    image = np.random.default_rng(3).uniform(0, 200, shape).astype(np.float32)
    with ReleaseWriter(tmp_path / "r", "dicom", modality) as writer:
        a, b = writer.write_image(image, "a"), writer.write_image(image, "b")
    ds_a, ds_b = (pydicom.dcmread(tmp_path / "r" / rel) for rel in (a, b))
    assert ds_a.Modality == MODALITIES[modality].dicom_code
    assert ds_a.PatientName == "SYNTHETIC" and ds_a.PatientID != ds_b.PatientID
    assert ds_a.BurnedInAnnotation == "NO" and "SYNTHETIC" in ds_a.DerivationDescription
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert getattr(ds_a, tag) != getattr(ds_b, tag)
    assert ds_a.file_meta.MediaStorageSOPInstanceUID == ds_a.SOPInstanceUID
    np.testing.assert_allclose(load_image(tmp_path / "r" / a), image, atol=0.51)


def test_dicom_carries_nothing_from_a_source_file(tmp_path):
    src_path = get_testdata_file("CT_small.dcm", download=False)
    src = pydicom.dcmread(src_path)
    with ReleaseWriter(tmp_path / "r", "dicom", "ct") as writer:
        rel = writer.write_image(load_image(src_path), "copy_of_source")
    raw = (tmp_path / "r" / rel).read_bytes()
    for value in (str(src.PatientName), src.PatientID, src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID):
        assert value.encode() not in raw
    out = pydicom.dcmread(tmp_path / "r" / rel)
    assert "InstitutionName" not in out and "StudyDate" in out and out.StudyDate == ""
    np.testing.assert_allclose(load_image(tmp_path / "r" / rel), load_image(src_path))  # pixels survive


def test_mr_dicom_uses_rescale_for_continuous_values(tmp_path):
    image = np.random.default_rng(4).uniform(-3.0, 1500.0, (1, 7, 5, 2)).astype(np.float32)
    with ReleaseWriter(tmp_path / "r", "dicom", "mri") as writer:
        rel = writer.write_image(image, "mr")
    np.testing.assert_allclose(load_image(tmp_path / "r" / rel), image, atol=1503 / 65535)


def test_tables(tmp_path):
    with ReleaseWriter(tmp_path / "r", "png", "us") as writer:
        writer.write_json("meta/info.json", {"n": np.int64(3), "x": np.float32(0.5), "t": torch.tensor([1.0, 2.0])})
        writer.write_csv("manifest.csv", [{"image": "a.png", "label": "3"}, {"image": "b.png", "distance": 0.25}])
    assert json.loads((tmp_path / "r" / "meta" / "info.json").read_text()) == {"n": 3, "x": 0.5, "t": [1.0, 2.0]}
    with open(tmp_path / "r" / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"image": "a.png", "label": "3", "distance": ""},
        {"image": "b.png", "label": "", "distance": "0.25"},
    ]


def test_crash_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "release"
    with pytest.raises(RuntimeError, match="simulated crash"):
        with ReleaseWriter(out, "png", "us") as writer:
            writer.write_image(np.zeros((1, 4, 4)), "first")
            assert (writer.staging_dir / "first.png").exists()
            raise RuntimeError("simulated crash")
    assert not out.exists()
    assert _siblings(out) == []


def test_crash_keeps_previous_release(tmp_path):
    out = tmp_path / "release"
    with ReleaseWriter(out, "png", "us") as writer:
        writer.write_csv("manifest.csv", [{"image": "old.png"}])
        writer.write_image(np.full((1, 4, 4), 7.0), "old")
    with pytest.raises(KeyError):
        with ReleaseWriter(out, "png", "us", overwrite=True) as writer:
            writer.write_image(np.zeros((1, 4, 4)), "new")
            raise KeyError("crash")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "old.png"]
    assert load_image(out / "old.png").max() == 7.0
    assert _siblings(out) == []


def test_refuses_non_empty_out_dir_unless_overwrite(tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "someone_elses.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ReleaseWriter(out, "nifti", "ct")
    with ReleaseWriter(out, "nifti", "ct", overwrite=True) as writer:
        writer.write_image(np.zeros((1, 4, 4)), "new")
        assert (out / "someone_elses.txt").exists()  # untouched until the new release is complete
    assert sorted(p.name for p in out.iterdir()) == ["new.nii.gz"]
    assert _siblings(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with ReleaseWriter(empty, "nifti", "ct") as writer:  # an empty folder is fine
        writer.write_image(np.zeros((1, 4, 4)), "x")
    assert (empty / "x.nii.gz").exists()


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        ReleaseWriter(tmp_path / "r", "jpeg", "us")
    with pytest.raises(ValueError, match="unknown modality"):
        ReleaseWriter(tmp_path / "r", "png", "xray")
    writer = ReleaseWriter(tmp_path / "r", "png", "us")
    with pytest.raises(RuntimeError, match="inside its `with` block"):
        writer.write_json("a.json", {})
    with writer:
        with pytest.raises(ValueError, match="relative path inside"):
            writer.write_json("../escape.json", {})
        with pytest.raises(ValueError, match="single-channel"):
            writer.write_image(np.zeros((3, 4, 4)), "rgb")
        with pytest.raises(ValueError, match="NaN"):
            writer.write_image(np.full((1, 4, 4), np.nan), "nan")
        writer.write_image(np.zeros((1, 4, 4)), "same")
        with pytest.raises(FileExistsError, match="already written"):
            writer.write_image(np.zeros((1, 4, 4)), "same")
    assert not (tmp_path / "escape.json").exists()


def test_dicom_and_nifti_declare_the_same_orientation(tmp_path):
    """One array must mean the same anatomy in every format, so 3D presets (Orientationd RAS) agree."""
    from monai.transforms import LoadImage, Orientation

    from monai_synth.data.loading import FileTypeReader

    volume = np.random.default_rng(5).uniform(-1000, 1000, (1, 6, 5, 4)).astype(np.float32)
    loaded = {}
    for fmt in ("dicom", "nifti"):
        with ReleaseWriter(tmp_path / fmt, fmt, "ct") as writer:
            rel = writer.write_image(volume, "v", spacing=(0.5, 0.6, 2.0))
        image = LoadImage(reader=FileTypeReader(), image_only=True, ensure_channel_first=True)(
            str(tmp_path / fmt / rel)
        )
        loaded[fmt] = Orientation("RAS")(image)
    np.testing.assert_allclose(loaded["dicom"].affine.numpy(), loaded["nifti"].affine.numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded["dicom"].numpy(), loaded["nifti"].numpy(), atol=0.5 + 1e-3)
