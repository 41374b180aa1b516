"""Phantom cohorts: determinism, patient identity, learnable labels, physical units, on-disk formats, CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import LoadImage
from scipy import ndimage, optimize

from monai_synth.cli import main as cli_main
from monai_synth.data.modalities import get_modality
from monai_synth.data.phantoms import PHANTOMS, generate_cohort, write_cohort
from monai_synth.data.phantoms._base import ANATOMY, LESION, patient_rng

MODALITIES = ("ct", "mri", "pet", "us")


def _stack(records) -> np.ndarray:
    return np.stack([r["image"] for r in records])


# ----------------------------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("modality", MODALITIES)
def test_records_have_contract_keys_and_dtype(modality):
    recs = generate_cohort(modality, 2, 2, spatial_size=(20, 16), seed=1)
    assert len(recs) == 4
    for r in recs:
        assert r["image"].dtype == np.float32 and r["image"].shape == (1, 20, 16)
        assert r["label"] in get_modality(modality).labels
        assert len(r["spacing"]) == 2 and all(s > 0 for s in r["spacing"])
        assert r["lesion_size_mm"] >= 0.0
    assert [r["patient_id"] for r in recs] == ["P0000", "P0000", "P0001", "P0001"]
    assert [r["study"] for r in recs] == [0, 1, 0, 1]


@pytest.mark.parametrize("modality", MODALITIES)
def test_deterministic_from_seed(modality):
    a = _stack(generate_cohort(modality, 3, 2, spatial_size=24, seed=7))
    b = _stack(generate_cohort(modality, 3, 2, spatial_size=24, seed=7))
    c = _stack(generate_cohort(modality, 3, 2, spatial_size=24, seed=8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("modality", MODALITIES)
def test_first_patient_is_the_same_patient_as_in_a_bigger_cohort(modality):
    big = generate_cohort(modality, 6, 2, spatial_size=24, seed=3)
    tail = generate_cohort(modality, 2, 2, spatial_size=24, seed=3, first_patient=4)
    assert [r["patient_id"] for r in tail] == ["P0004", "P0004", "P0005", "P0005"]
    for r_big, r_tail in zip(big[8:], tail):
        assert r_big["label"] == r_tail["label"]
        np.testing.assert_array_equal(r_big["image"], r_tail["image"])


def test_labels_round_robin_or_given():
    labels = [r["label"] for r in generate_cohort("us", 7, 1, spatial_size=16)]
    assert labels == ["3", "4a", "4b", "4c", "5", "3", "4a"]
    assert {r["label"] for r in generate_cohort("ct", 3, 1, spatial_size=16, labels=["nodule"])} == {"nodule"}
    normal = generate_cohort("pet", 2, 1, spatial_size=16, labels=["normal"])
    assert all(r["lesion_size_mm"] == 0.0 for r in normal)
    with pytest.raises(ValueError, match="label"):
        generate_cohort("ct", 1, 1, spatial_size=16, labels=["tumour"])


def test_repeat_studies_share_anatomy_but_differ():
    recs = generate_cohort("ct", 1, 3, spatial_size=32, seed=0, labels=["nodule"])
    sizes = {r["lesion_size_mm"] for r in recs}
    assert len(sizes) == 1 and sizes.pop() > 0  # the nodule belongs to the patient
    imgs = _stack(recs)
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[1], imgs[2])


def test_anatomy_does_not_depend_on_the_label():
    # the same patient index drawn with two labels keeps its body; only the lesion differs
    normal = PHANTOMS["ct"].anatomy(patient_rng(0, 5, ANATOMY), patient_rng(0, 5, LESION), "normal")
    nodule = PHANTOMS["ct"].anatomy(patient_rng(0, 5, ANATOMY), patient_rng(0, 5, LESION), "nodule")
    assert normal["body"] == nodule["body"] and normal["slice_z"] == nodule["slice_z"]
    assert normal["lesion_size_mm"] == 0.0 < nodule["lesion_size_mm"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"modality": "us", "spatial_dims": 3}, "spatial_dims"),
        ({"modality": "xray"}, "modality"),
        ({"modality": "ct", "spatial_size": (32, 32, 32)}, "spatial_size"),
        ({"modality": "ct", "spatial_size": 3}, "spatial_size"),
        ({"modality": "ct", "n_patients": 0}, "n_patients"),
        ({"modality": "ct", "first_patient": -1}, "first_patient"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    args = {"n_patients": 1, "images_per_patient": 1, "spatial_size": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_cohort(**args)


@pytest.mark.parametrize("modality", ["ct", "mri", "pet"])
def test_3d_volumes(modality):
    (rec,) = generate_cohort(modality, 1, 1, spatial_dims=3, spatial_size=(16, 20, 12), seed=0)
    assert rec["image"].shape == (1, 16, 20, 12) and len(rec["spacing"]) == 3
    # a volume is not a stack of identical slices: anatomy changes along every axis
    img = rec["image"][0]
    for axis in range(3):
        assert np.abs(np.diff(img, axis=axis)).mean() > 0


# ------------------------------------------------------------------------------------------------- physical units


def test_ct_hounsfield_units():
    imgs = _stack(generate_cohort("ct", 4, 1, spatial_size=64, seed=0))
    assert imgs.min() >= -1024 and imgs.max() <= 3071
    np.testing.assert_array_equal(imgs, np.round(imgs))  # integer HU, as CT stores them
    for img in imgs[:, 0]:
        assert np.median(img[:4, :4]) == pytest.approx(-1000, abs=5)  # air in the corner
        assert np.sum(img < -700) > 0.05 * img.size  # air and lungs
        assert np.sum((img > -150) & (img < 100)) > 0.1 * img.size  # fat, muscle, soft tissue
        assert img.max() > 400  # bone


def test_pet_suv_units():
    imgs = _stack(generate_cohort("pet", 4, 1, spatial_size=64, seed=0))
    assert imgs.min() >= 0.0
    for img in imgs[:, 0]:
        body = img[img > 0.3]
        assert 0.5 < np.median(body) < 2.0  # soft-tissue background around SUV 1
        assert img.max() > 5.0  # brain / bladder are hot


def test_mri_positive_with_bias_field():
    imgs = _stack(generate_cohort("mri", 2, 2, spatial_size=48, seed=0))
    assert imgs.min() >= 0.0  # Rician magnitude is never negative
    # a smooth multiplicative field: the same tissue differs between the two halves of the image
    assert not np.allclose(imgs[0], imgs[1])


def test_us_grey_levels():
    imgs = _stack(generate_cohort("us", 5, 1, spatial_size=64, seed=0))
    assert imgs.min() >= 0 and imgs.max() <= 255
    np.testing.assert_array_equal(imgs, np.round(imgs))


def test_us_birads_descriptors_follow_the_category():
    """BI-RADS 3 lesions are wider than tall with posterior enhancement; 5 are taller than wide with shadowing."""
    model = PHANTOMS["us"]
    recs = generate_cohort("us", 20, 1, spatial_size=64, seed=2, labels=["3", "5"])
    ratios = {"3": [], "5": []}
    aspects = {"3": [], "5": []}
    spacing = recs[0]["spacing"]
    for i, rec in enumerate(recs):
        anat = model.anatomy(patient_rng(2, i, ANATOMY), patient_rng(2, i, LESION), rec["label"])
        les = anat["lesion"]
        aspects[rec["label"]].append(les["half_w"] / les["half_h"])
        # columns under the lesion vs columns beside it, below the lesion's bottom (image axis 1 is depth)
        cx = int(round((les["centre"][0] + 20.0) / spacing[0]))
        bottom = int(round((les["centre"][1] + 1.2 * max(les["half_h"], les["half_w"])) / spacing[1]))
        half = max(1, int(0.5 * les["half_w"] / spacing[0]))
        img = rec["image"][0].astype(np.float64)
        below = img[cx - half : cx + half + 1, bottom : bottom + 10].mean()
        beside = np.concatenate(
            [
                img[: max(cx - 3 * half, 1), bottom : bottom + 10].ravel(),
                img[cx + 3 * half :, bottom : bottom + 10].ravel(),
            ]
        ).mean()
        ratios[rec["label"]].append(below - beside)
    assert min(aspects["3"]) > 1.0 > max(aspects["5"])  # parallel vs not parallel
    assert np.mean(ratios["3"]) > 0 > np.mean(ratios["5"])  # enhancement vs shadowing
    assert np.mean(ratios["3"]) - np.mean(ratios["5"]) > 20  # visibly, in grey levels


# --------------------------------------------------------------------------------------------- patient identities


@pytest.mark.parametrize("modality", MODALITIES)
def test_patient_identities_are_distinct(modality):
    recs = generate_cohort(modality, 30, 3, spatial_size=32, seed=11)
    x = _stack(recs).reshape(len(recs), -1).astype(np.float64)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    dist = 1.0 - x @ x.T / x.shape[1]  # 1 - Pearson correlation
    pid = np.array([r["patient_id"] for r in recs])
    same = pid[:, None] == pid[None, :]
    off_diagonal = ~np.eye(len(pid), dtype=bool)
    np.fill_diagonal(dist, np.inf)
    nn_same = np.mean(pid[dist.argmin(1)] == pid)
    assert nn_same >= 0.8, f"only {nn_same:.0%} of {modality} images have a same-patient nearest neighbour"
    assert dist[same & off_diagonal].mean() < 0.6 * dist[~same].mean()


# ------------------------------------------------------------------------------------------------ learnable labels


def _features(img: np.ndarray) -> np.ndarray:
    """Generic image descriptors: intensity quantiles, white/black top-hats at three scales (small bright or dark
    structures), gradient anisotropy (orientation) and the spread of column means (posterior shadows)."""
    x = img[0].astype(np.float64)
    x = (x - x.mean()) / (x.std() + 1e-6)
    f = list(np.percentile(x, [1, 5, 25, 50, 75, 90, 95, 97.5, 99, 99.5, 99.9]))
    for s in (3, 5, 9):
        white = x - ndimage.grey_opening(x, size=(s, s))
        black = ndimage.grey_closing(x, size=(s, s)) - x
        f += list(np.percentile(white, [99, 99.9, 100])) + list(np.percentile(black, [99, 99.9, 100]))
    smooth = ndimage.gaussian_filter(x, 1.0)
    g0, g1 = np.abs(np.diff(smooth, axis=0)).mean(), np.abs(np.diff(smooth, axis=1)).mean()
    cols = smooth.mean(axis=1)
    f += [g0, g1, np.log(g0 / g1), cols.std(), cols.min(), cols.max()]
    return np.asarray(f)


def _held_out_accuracy(modality: str, n_train: int, n_test: int, seed: int = 3) -> float:
    """L2-regularised multinomial logistic regression on :func:`_features`, trained on some patients and scored on
    images of patients it never saw."""
    mod = get_modality(modality)

    def data(n, first):
        recs = generate_cohort(modality, n, 2, spatial_size=64, seed=seed, first_patient=first)
        return np.stack([_features(r["image"]) for r in recs]), np.array([mod.label_index(r["label"]) for r in recs])

    x_tr, y_tr = data(n_train, 0)
    x_te, y_te = data(n_test, n_train)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-9
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    n_classes, n_feat = len(mod.labels), x_tr.shape[1]
    onehot = np.eye(n_classes)[y_tr]

    def loss_and_grad(theta):
        w, b = theta[:-n_classes].reshape(n_feat, n_classes), theta[-n_classes:]
        logits = x_tr @ w + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        loss = -np.mean(np.sum(onehot * np.log(p + 1e-12), 1)) + 1e-2 * np.sum(w**2)
        g = (p - onehot) / len(y_tr)
        return loss, np.concatenate([(x_tr.T @ g + 2e-2 * w).ravel(), g.sum(0)])

    theta = optimize.minimize(loss_and_grad, np.zeros(n_feat * n_classes + n_classes), jac=True, method="L-BFGS-B").x
    w, b = theta[:-n_classes].reshape(n_feat, n_classes), theta[-n_classes:]
    return float(np.mean((x_te @ w + b).argmax(1) == y_te))


@pytest.mark.slow
def test_birads_labels_are_learnable_on_held_out_patients():
    acc = _held_out_accuracy("us", n_train=100, n_test=50)
    assert acc >= 0.2 + 0.25, f"BI-RADS accuracy {acc:.2f} is not clearly above chance (0.20)"


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["ct", "pet"])
def test_lesion_labels_are_learnable_on_held_out_patients(modality):
    acc = _held_out_accuracy(modality, n_train=150, n_test=60)
    assert acc >= 0.5 + 0.25, f"{modality} lesion accuracy {acc:.2f} is not clearly above chance (0.50)"


# ------------------------------------------------------------------------------------------------------ on disk

ROUND_TRIPS = [
    ("ct", "dicom", 2, "PydicomReader"),
    ("ct", "dicom", 3, "PydicomReader"),
    ("ct", "nifti", 2, "NibabelReader"),
    ("ct", "nifti", 3, "NibabelReader"),
    ("mri", "nifti", 3, "NibabelReader"),
    ("pet", "nifti", 2, "NibabelReader"),
    ("us", "png", 2, "PILReader"),
    ("us", "dicom", 2, "PydicomReader"),
]


@pytest.mark.parametrize("modality, fmt, dims, reader", ROUND_TRIPS)
def test_write_cohort_round_trips_through_monai_readers(tmp_path, modality, fmt, dims, reader):
    size = (20, 16, 12)[:dims]
    csv_path = write_cohort(tmp_path / "cohort", modality, 2, 2, spatial_dims=dims, spatial_size=size, seed=4, fmt=fmt)
    expected = generate_cohort(modality, 2, 2, spatial_dims=dims, spatial_size=size, seed=4)
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(expected)
    load = LoadImage(image_only=True, ensure_channel_first=True, reader=reader)
    for row, rec in zip(rows, expected):
        img = load(str(csv_path.parent / row["image"]))
        assert tuple(img.shape) == rec["image"].shape
        tol = 1.0 if modality == "ct" else (0.0 if modality == "us" else 1e-5)
        np.testing.assert_allclose(np.asarray(img), rec["image"], atol=tol)
        if fmt != "png":  # spacing travels in the header
            np.testing.assert_allclose(np.asarray(img.pixdim)[:dims], rec["spacing"], rtol=1e-4)


def test_ct_dicom_series_is_one_series_with_geometry(tmp_path):
    import pydicom

    csv_path = write_cohort(tmp_path / "ct", "ct", 1, 1, spatial_dims=3, spatial_size=(16, 16, 6), fmt="dicom")
    folder = csv_path.parent / "images" / "P0000_s0"
    slices = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    assert len(slices) == 6
    assert len({s.SeriesInstanceUID for s in slices}) == 1 and len({s.SOPInstanceUID for s in slices}) == 6
    z = [float(s.ImagePositionPatient[2]) for s in slices]
    np.testing.assert_allclose(np.diff(z), float(slices[0].SliceThickness))
    assert slices[0].Modality == "CT" and float(slices[0].RescaleSlope) == 1.0
    assert float(slices[0].RescaleIntercept) == -1024.0 and slices[0].PatientID == "P0000"


@pytest.mark.parametrize("dims", [2, 3])
def test_ct_dicom_and_nifti_phantoms_are_the_same_anatomy(tmp_path, dims):
    # The same patient written as DICOM and as NIfTI must load, oriented to RAS, as the same array in the same place.
    from monai.transforms import Orientation

    from monai_synth.data.loading import FileTypeReader

    size = (20, 16, 6)[:dims]
    load = LoadImage(reader=FileTypeReader(), image_only=True, ensure_channel_first=True)
    loaded = {}
    for fmt in ("dicom", "nifti"):
        csv_path = write_cohort(tmp_path / fmt, "ct", 1, 1, spatial_dims=dims, spatial_size=size, seed=3, fmt=fmt)
        with open(csv_path, newline="") as fh:
            row = next(csv.DictReader(fh))
        image = load(str(csv_path.parent / row["image"]))
        loaded[fmt] = Orientation("RAS")(image) if dims == 3 else image
    np.testing.assert_allclose(loaded["dicom"].affine.numpy(), loaded["nifti"].affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(loaded["dicom"].numpy(), loaded["nifti"].numpy(), atol=1.0)
    # centred on the scanner's origin: the middle voxel sits at (0, 0, 0) mm
    centre = loaded["nifti"].affine.numpy() @ np.array([*((n - 1) / 2 for n in size), *([0] * (3 - dims)), 1.0])
    np.testing.assert_allclose(centre[:dims], 0.0, atol=1e-6)


def test_datalist_csv_content(tmp_path):
    csv_path = write_cohort(tmp_path / "us", "us", 5, 2, spatial_size=16, seed=0)
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["image", "patient_id", "label", "lesion_size_mm"]
    assert len(rows) == 10 and len({r["image"] for r in rows}) == 10
    assert [r["label"] for r in rows[::2]] == ["3", "4a", "4b", "4c", "5"]
    for row in rows:
        assert not Path(row["image"]).is_absolute() and (csv_path.parent / row["image"]).is_file()
        assert float(row["lesion_size_mm"]) > 0


def test_write_cohort_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        write_cohort(out, "us", 1, 1, spatial_size=16)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="fmt"):
        write_cohort(tmp_path / "mri", "mri", 1, 1, spatial_size=16, fmt="png")


def test_write_cohort_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    from monai_synth.data.phantoms import _io

    calls = []

    def flaky_png(path, image):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        path.write_bytes(b"png")

    monkeypatch.setattr(_io, "write_png", flaky_png)
    with pytest.raises(RuntimeError, match="disk full"):
        write_cohort(tmp_path / "cohort", "us", 2, 2, spatial_size=16)
    assert list(tmp_path.iterdir()) == []  # neither the cohort nor its partial folder


def test_cli_writes_a_cohort(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["phantoms", "--modality", "us", "--patients", "4", "--size", "24", "--out", str(out)]) == 0
    assert (out / "datalist.csv").is_file() and len(list((out / "images").glob("*.png"))) == 12
    assert "datalist" in capsys.readouterr().out
    # a second run into the same folder is refused with a message, not a traceback
    assert cli_main(["phantoms", "--modality", "us", "--patients", "4", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["phantoms", "--modality", "us", "--spatial-dims", "3", "--out", str(tmp_path / "x")]) == 2
