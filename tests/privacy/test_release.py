"""Safeguard v2 through `monai-synth guard` and the sampler: what is judged is what is written, and the near-copies
an attacker plants (resized, on a canvas, side by side, inverted, half copies, 16-bit, x1e20) are not released."""

from __future__ import annotations

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai_synth.data.datalist import load_datalist
from monai_synth.data.phantoms import write_cohort
from monai_synth.privacy.guard import run_guard
from monai_synth.privacy.release import GuardedRelease, ReleaseEncoder, check_release_paths
from monai_synth.privacy.safeguard import build_safeguard
from monai_synth.privacy.sampling import guarded_sample
from monai_synth.privacy.spaces import PixelSpace

SIZE = 32
SPACES = ("pixel", "parts", "crops", "tiles")


def _grey(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    train = write_cohort(root / "train", "us", 30, 3, spatial_size=SIZE, seed=0)
    holdout = write_cohort(root / "holdout", "us", 34, 3, spatial_size=SIZE, seed=0, first_patient=1000)
    new = write_cohort(root / "new", "us", 8, 1, spatial_size=SIZE, seed=0, first_patient=5000)
    return {
        "root": root,
        "train": str(train),
        "holdout": str(holdout),
        "train_png": [r["image"] for r in load_datalist(train)],
        "new_png": [r["image"] for r in load_datalist(new)],
    }


def _guard(cohort, name, write, **kwargs):
    """Run the guard on the candidates ``write(folder)`` plants; return (summary, released files, audit rows, folder)."""
    cand = cohort["root"] / f"cand_{name}"
    cand.mkdir()
    write(cand)
    out = cohort["root"] / f"out_{name}"
    summary = run_guard(
        cohort["train"], cohort["holdout"], str(cand), str(out), "us", spatial_size=SIZE, spaces=SPACES, **kwargs
    )
    with open(summary["audit"]) as f:
        audit = list(csv.DictReader(f))
    return summary, sorted(p for p in (out / "images").glob("*") if p.is_file()), audit, cand


def _released_sources(audit) -> set[str]:
    return {r["source"] for r in audit if r["passed"] == "True"}


@pytest.fixture(scope="module")
def png_release(cohort):
    """One guard run (PNG release) over resized / composited copies, odd files, a leaky name and new patients."""
    t = [_grey(p) for p in cohort["train_png"][:4]]
    new = [_grey(p) for p in cohort["new_png"]]
    train_ids = sorted({r["patient_id"] for r in load_datalist(cohort["train"])})

    def write(folder):
        up = Image.fromarray(t[0].astype(np.uint8)).resize((4 * SIZE, 4 * SIZE), Image.BILINEAR)
        up.save(folder / "upsampled.png")
        Image.fromarray(t[1].astype(np.uint8)).resize((SIZE // 2, SIZE // 2), Image.BOX).save(folder / "down.png")
        canvas = np.kron(new[0], np.ones((3, 3)))  # a new patient, 3x the size
        canvas[:SIZE, :SIZE], canvas[:SIZE, -SIZE:], canvas[-SIZE:, :SIZE] = t[0], t[1], t[2]
        Image.fromarray(canvas.astype(np.uint8)).save(folder / "canvas.png")
        Image.fromarray(np.concatenate([t[3], new[1]], axis=1).astype(np.uint8)).save(folder / "side_by_side.png")
        Image.fromarray(t[2][: 3 * SIZE // 4, : 3 * SIZE // 4].astype(np.uint8)).save(folder / "crop.png")
        for i, p in enumerate(cohort["new_png"][2:6]):
            shutil.copy(p, folder / f"new_{i}.png")
        shutil.copy(cohort["new_png"][6], folder / f"Doe_Jane_MRN_{train_ids[0]}_synthetic.png")
        np.save(folder / "array.npy", np.zeros((SIZE, SIZE)))
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(folder / "image.tif")
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    return (*_guard(cohort, "png", write), train_ids)


def test_resized_and_composited_copies_are_not_released(png_release):
    summary, files, audit, _, _ = png_release
    released = _released_sources(audit)
    assert not released & {"upsampled.png", "down.png", "canvas.png", "side_by_side.png", "crop.png"}
    assert len(released) >= 4  # new patients still go through
    assert len(files) == summary["released"] == len(released)


def test_intensity_tricks_are_not_released(cohort):
    t = [_grey(p) for p in cohort["train_png"][4:8]]

    def write(folder):
        Image.fromarray((255 - t[0]).astype(np.uint8)).save(folder / "inverted.png")
        Image.fromarray((t[1] * 257).astype(np.uint16)).save(folder / "sixteen_bit.png")
        half = t[2].copy()
        half[SIZE // 2 :] = _grey(cohort["new_png"][0])[SIZE // 2 :]
        Image.fromarray(half.astype(np.uint8)).save(folder / "half.png")
        nib.save(nib.Nifti1Image((t[3] * 1e20).astype(np.float32).T, np.eye(4)), str(folder / "huge.nii.gz"))

    _, files, audit, _ = _guard(cohort, "intensity", write, fmt="nifti")
    assert len(audit) > 0 and _released_sources(audit) == set() and files == []


def test_released_file_holds_exactly_the_judged_array(png_release):
    """A released candidate is written from the one read that was judged: the file holds the candidate's values."""
    _, files, audit, cand, _ = png_release
    by_file = {r["file"]: r["source"] for r in audit if r["passed"] == "True"}
    assert len(files) >= 4
    for f in files:
        np.testing.assert_array_equal(_grey(f), _grey(cand / by_file[f"images/{f.name}"]))


def test_a_png_release_refuses_values_it_would_have_to_clip():
    encoder = ReleaseEncoder("png", "us")
    with pytest.raises(ValueError, match="without clipping"):
        encoder.store(np.full((1, 4, 4), 300.0))
    np.testing.assert_array_equal(encoder.store(np.full((1, 4, 4), 254.6)), np.full((1, 4, 4), 255.0))


def test_a_ct_dicom_release_refuses_a_copy_scaled_beyond_int16():
    """A CT copy x257 stored as int16 HU would be clipped, and the clipped file still shows the training anatomy."""
    encoder = ReleaseEncoder("dicom", "ct")
    hu = np.linspace(-1000, 400, 64).reshape(1, 8, 8)
    np.testing.assert_allclose(encoder.store(hu), np.rint(hu), atol=0.5)
    with pytest.raises(ValueError, match="without clipping"):
        encoder.store(hu * 257)


def test_unsupported_and_unreadable_files_are_refused_with_a_reason(png_release):
    summary, _, audit, _, _ = png_release
    reasons = {r["source"]: r["reason"] for r in audit}
    assert summary["generated"] == 13
    assert "unsupported file type" in reasons["array.npy"] and "unsupported file type" in reasons["image.tif"]
    assert "cannot read candidate" in reasons["broken.png"]


def test_certificate_names_no_source_file(png_release):
    summary, files, audit, _, train_ids = png_release
    out = files[0].parents[1]
    text = (out / "certificate.csv").read_text() + (out / "certificate.json").read_text()
    assert "Doe_Jane" not in text and not any(f'"{pid}"' in text or f",{pid}," in text for pid in train_ids)
    leaky = [r for r in audit if r["source"].startswith("Doe_Jane")]
    assert leaky and leaky[0]["passed"] == "True"  # released, and only the private audit keeps its name


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "old.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_release_paths(tmp_path / "release", tmp_path / "audit.csv")
    with pytest.raises(ValueError, match="inside the release"):
        check_release_paths(tmp_path / "new", tmp_path / "new" / "audit.csv")
    with pytest.raises(FileExistsError, match="--overwrite"):  # before any datalist is even read
        run_guard("missing.csv", "missing.csv", str(tmp_path), str(tmp_path / "release"), "us")


def test_failed_audit_write_leaves_no_release(tmp_path):
    space = PixelSpace(grid=8)
    g = torch.Generator().manual_seed(0)
    train, holdout = torch.rand(20, 1, 8, 8, generator=g), torch.rand(100, 1, 8, 8, generator=g)
    safeguard = build_safeguard(
        [space], train, [f"P{i}" for i in range(20)], holdout, [f"H{i}" for i in range(100)], "dl", quantile=0.05
    )
    (tmp_path / "audit.csv").mkdir()  # a folder where the audit file should go: refused up front
    with pytest.raises(FileExistsError):
        GuardedRelease(tmp_path / "out", "nifti", "ct", audit=tmp_path / "audit.csv")
    release = GuardedRelease(tmp_path / "out", "nifti", "ct", audit=tmp_path / "audit2.csv")
    (tmp_path / "audit2.csv").mkdir()  # taken between the check and the write
    with pytest.raises(OSError), release:
        release.finish(safeguard)
    assert not (tmp_path / "out").exists()


def test_sampler_path_judges_the_stored_image_and_rejects_scaled_copies():
    train = torch.rand(30, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    holdout = torch.rand(120, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    space = PixelSpace(grid=8, invariances=("flip", "transpose", "invert"))
    safeguard = build_safeguard(
        [space], train, [f"P{i}" for i in range(30)], holdout, [f"H{i}" for i in range(120)], "dl", quantile=0.01
    )
    encoder = ReleaseEncoder("nifti", "ct")

    def copies(n, seed, condition):
        return torch.stack([train[0] * 1e20, -train[1], train[2].transpose(-1, -2)])[:n]

    result = guarded_sample(copies, safeguard, [("nodule", 3)], max_retries=0, encoder=encoder)
    assert result.images == [] and all(not r.passed for r in result.records)

    def new(n, seed, condition):
        return holdout[:n]

    result = guarded_sample(new, safeguard, [("nodule", 3)], max_retries=0, encoder=encoder)
    assert len(result.images) >= 2
    for img, rec in zip(result.images, result.released_records):  # released = the array as stored, judged as such
        assert isinstance(img, np.ndarray) and img.shape == (1, 16, 16)
        assert rec.distances["pixel"] >= rec.thresholds["pixel"]


def test_pixel_space_scores_a_huge_copy_as_the_copy():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    space = PixelSpace(grid=8)
    np.testing.assert_allclose(space.embed(x * 1e20), space.embed(x), atol=1e-5)


def test_generated_images_the_physical_transform_would_clip_are_refused_not_binarised():
    encoder = ReleaseEncoder("png", "us")
    image = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with pytest.raises(ValueError, match="outside the model's intensity range"):
        encoder.store_generated(image * 1e20)  # would be stored as the copy's black-and-white silhouette
    overshoot = image.clone()
    overshoot[0, 0, 0] = 1.1  # a decoder's overshoot is clipped to white, as before
    assert encoder.store_generated(overshoot)[0, 0, 0] == 255.0


def test_generated_mri_is_stored_by_the_reference_whatever_its_own_percentiles():
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("mri", reference=(10.0, 410.0))
    encoder = ReleaseEncoder("nifti", "mri", to_model=to_model)
    image = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    for generated in (image, 0.4 * image - 0.5):  # a dim image's own percentiles sit far from -1 and 1
        stored = encoder.store_generated(generated)  # scaling it by its own percentiles would move it by up to 1.1
        np.testing.assert_allclose(stored, (generated.numpy() + 1) / 2 * 400 + 10, rtol=1e-5, atol=1e-3)
    clipped = ReleaseEncoder("nifti", "mri", to_model=intensity_transform("mri", reference=(10.0, 410.0), clip=True))
    with pytest.raises(ValueError, match="outside the model's intensity range"):
        clipped.store_generated(image * 3)  # clipping still refuses
