"""``monai-synth guard`` on phantom files: copies of training images are held back, new patients released."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from monai_synth.cli import main
from monai_synth.data.datalist import load_datalist
from monai_synth.data.phantoms import write_cohort
from monai_synth.privacy.certificate import load_certificate
from monai_synth.privacy.factory import make_space
from monai_synth.privacy.guard import find_candidates, load_model_space, run_guard
from monai_synth.privacy.safeguard import DEFAULT_SPECIFICITY
from monai_synth.privacy.spaces import space_distance

SIZE = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    train = write_cohort(root / "train", "us", 30, 3, spatial_size=SIZE, seed=0)
    holdout = write_cohort(root / "holdout", "us", 34, 3, spatial_size=SIZE, seed=0, first_patient=1000)
    new = write_cohort(root / "new", "us", 6, 1, spatial_size=SIZE, seed=0, first_patient=5000)
    cand = root / "candidates"
    (cand / "copies").mkdir(parents=True)
    train_records = load_datalist(train)
    for i, rec in enumerate(train_records[:12:3]):  # 4 exact copies
        shutil.copy(rec["image"], cand / "copies" / f"exact_{i}.png")
    for i, rec in enumerate(train_records[1:12:4]):  # 3 mirrored copies
        Image.open(rec["image"]).transpose(Image.FLIP_LEFT_RIGHT).save(cand / "copies" / f"mirror_{i}.png")
    for rec in load_datalist(new):
        shutil.copy(rec["image"], cand / f"new_{rec['patient_id']}.png")
    return {"root": root, "train": train, "holdout": holdout, "candidates": cand}


@pytest.fixture(scope="module")
def guarded(files):
    out = files["root"] / "release"
    summary = run_guard(
        str(files["train"]),
        str(files["holdout"]),
        str(files["candidates"]),
        str(out),
        "us",
        spatial_size=SIZE,
        embedding_epochs=1,  # the default spaces, with the embedding trained briefly on the training images
    )
    return out, summary


def test_copies_are_held_back_and_new_patients_released(files, guarded):
    out, summary = guarded
    assert summary["generated"] == 13
    with open(summary["audit"]) as f:
        audit = {r["source"]: r for r in csv.DictReader(f)}
    assert all(audit[s]["passed"] == "False" for s in audit if s.startswith("copies/"))
    assert sum(audit[s]["passed"] == "True" for s in audit if s.startswith("new_")) >= 5
    assert summary["released"] == len(list((out / "images").glob("*.png")))
    cert = load_certificate(out)
    assert cert["summary"]["released"] == summary["released"] and cert["fingerprints"]["datalist"]
    # the defaults; "ball" and "coarse" judge volumes only
    defaults = {
        "pixel",
        "ranks",
        "localranks",
        "parts",
        "crops",
        "tiles",
        "inset",
        "halves",
        "texture",
        "deblur",
        "disc",
        "aligned",
        "embedding",
    }
    assert set(cert["spaces"]) == defaults
    # by default every training image (90, fewer than the 800 - 102 that eight spaces at 1% want) joins the holdout
    # as a cross-patient calibration sample, and the specificity test is on
    assert {
        s["calibration"]["n_cross_patient"] + s["calibration"]["cross_patient_dropped"] for s in cert["spaces"].values()
    } == {90}
    # the specificity test at its default, lowered where the spaces together refuse more than its share, and the
    # consensus test calibrated on the same images: one setting for every space
    (specificity,) = {s["specificity"] for s in cert["spaces"].values()}
    assert 0.0 < specificity <= DEFAULT_SPECIFICITY
    (consensus,) = {s["consensus"] for s in cert["spaces"].values()}
    assert consensus == 0 or 2 <= consensus <= len(defaults)
    released = {s for s in audit if audit[s]["passed"] == "True"}
    assert released and all(s.startswith("new_") for s in released)
    assert not (out / "private_audit.csv").exists() and out.parent.joinpath("release.private_audit.csv").is_file()


def test_released_files_are_far_from_every_training_image_by_brute_force(files, guarded):
    out, summary = guarded
    records = load_datalist(files["train"])
    train = load_model_space([r["image"] for r in records], "us", SIZE, 2)
    released = load_model_space(sorted((out / "images").glob("*.png")), "us", SIZE, 2)
    space = make_space("pixel", 2, (SIZE, SIZE))
    train_vec = space.embed(train)
    nearest = np.array([space_distance(v, train_vec).min() for v in space.embed_variants(released)])
    assert (nearest >= summary["thresholds"]["pixel"]).all()


def test_candidates_are_found_in_sub_folders(files):
    found = find_candidates(files["candidates"])
    assert len(found) == 13 and sum(p.parent.name == "copies" for p in found) == 7


def test_cli_refuses_a_holdout_that_shares_patients(files, tmp_path, capsys):
    code = main(
        [
            "guard",
            *("--train", str(files["train"]), "--holdout", str(files["train"])),
            *("--candidates", str(files["candidates"]), "--out", str(tmp_path / "r"), "--modality", "us"),
            *("--spatial-size", str(SIZE)),
        ]
    )
    assert code == 2 and "patients in both --train and --holdout" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_sets_the_cross_patient_samples_and_the_specificity_test(files, tmp_path):
    out = tmp_path / "r"
    args = ["guard", "--train", str(files["train"]), "--holdout", str(files["holdout"]), "--out", str(out)]
    args += ["--candidates", str(files["candidates"]), "--modality", "us", "--spatial-size", str(SIZE)]
    assert main([*args, "--spaces", "pixel", "--cross-patient-images", "30", "--specificity", "0.003"]) == 0
    pixel = load_certificate(out)["spaces"]["pixel"]
    calibration = pixel["calibration"]
    assert calibration["n_cross_patient"] == 30 and calibration["n_holdout"] == 102 and pixel["specificity"] == 0.003
    assert pixel["consensus"] == 0  # one space: no consensus to count
    with open(out.parent / "r.private_audit.csv") as f:
        audit = {r["source"]: r for r in csv.DictReader(f)}
    assert all(r["passed"] == "False" for s, r in audit.items() if s.startswith("copies/"))
    assert len(calibration["holdout_distances"]) == 132
    off = tmp_path / "off"
    args[args.index(str(out))] = str(off)
    options = ["--cross-patient-images", "0", "--specificity", "0", "--consensus", "2"]
    assert main([*args, "--spaces", "pixel", "ranks", *options]) == 0
    pixel = load_certificate(off)["spaces"]["pixel"]
    assert pixel["calibration"]["n_cross_patient"] == 0 and pixel["specificity"] == 0.0  # the holdout alone, no test
    assert pixel["consensus"] == 2  # both spaces naming one nearest patient refuse
    with open(off.parent / "off.private_audit.csv") as f:
        reasons = [r.get("reason") or "" for r in csv.DictReader(f)]
    assert any("the same training patient is nearest in 2 of 2 spaces" in r for r in reasons)


def test_unknown_space_and_missing_weights_are_explained():
    with pytest.raises(ValueError, match="unknown privacy space"):
        make_space("ssim", 2, (SIZE, SIZE))
    with pytest.raises(ValueError, match="--embedding-weights"):
        make_space("embedding", 2, (SIZE, SIZE))


@pytest.mark.slow
def test_train_embedding_then_guard_in_two_spaces(tmp_path):
    """The learned embedding space plugs into the same index / calibration / safeguard as the pixel space."""
    train = write_cohort(tmp_path / "train", "us", 8, 2, spatial_size=16, seed=0)
    holdout = write_cohort(tmp_path / "holdout", "us", 50, 2, spatial_size=16, seed=0, first_patient=100)
    new = write_cohort(tmp_path / "new", "us", 3, 1, spatial_size=16, seed=0, first_patient=500)
    cand = tmp_path / "candidates"
    shutil.copytree(new.parent / "images", cand)
    shutil.copy(load_datalist(train)[0]["image"], cand / "copy.png")
    weights = tmp_path / "embedding.pt"
    args = ["--train", str(train), "--modality", "us", "--spatial-size", "16", "--epochs", "1", "--out", str(weights)]
    assert main(["train-embedding", *args]) == 0 and weights.is_file()
    summary = run_guard(
        str(train),
        str(holdout),
        str(cand),
        str(tmp_path / "release"),
        "us",
        spatial_size=16,
        spaces=["pixel:none", "embedding"],
        embedding_weights=str(weights),
        quantile=0.02,
    )
    assert summary["generated"] == 4 and summary["rejected"] >= 1
    cert = load_certificate(tmp_path / "release")
    assert set(cert["spaces"]) == {"pixel", "embedding"}
    with open(summary["audit"]) as f:
        copy_rows = [r for r in csv.DictReader(f) if r["source"] == "copy.png"]
    assert {r["space"] for r in copy_rows} == {"pixel", "embedding"}
    assert all(r["passed"] == "False" and float(r["distance"]) < 1e-3 for r in copy_rows)


@pytest.mark.slow
def test_embedding_weights_of_another_training_set_are_refused(files, tmp_path):
    other = write_cohort(tmp_path / "other", "us", 6, 2, spatial_size=SIZE, seed=3, first_patient=7000)
    weights = tmp_path / "embedding.pt"
    args = ["--train", str(other), "--modality", "us", "--spatial-size", str(SIZE), "--epochs", "1"]
    assert main(["train-embedding", *args, "--out", str(weights)]) == 0
    with pytest.raises(ValueError, match="fingerprint"):
        run_guard(
            str(files["train"]),
            str(files["holdout"]),
            str(files["candidates"]),
            str(tmp_path / "release"),
            "us",
            spatial_size=SIZE,
            spaces=["embedding"],
            embedding_weights=str(weights),
        )
    assert not (tmp_path / "release").exists()
