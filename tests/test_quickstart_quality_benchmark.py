"""Smoke test of ``benchmarks/quickstart_quality.py`` at toy size: it reads a release and prints both measures."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_synth.data.phantoms import generate_cohort

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quickstart_quality.py"


def _fake_release(folder: Path, n_per_class: int, size: int) -> None:
    """A release folder whose images are phantoms of their class (as a perfect generator would write them)."""
    (folder / "images").mkdir(parents=True)
    records = generate_cohort("us", 5 * n_per_class, 1, 2, size, seed=3, first_patient=900_000)
    with open(folder / "certificate.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "condition"])
        for i, r in enumerate(records):
            name = f"images/us_{i:05d}.png"
            # PNG rows are the image's second axis: the transpose is what MONAI's PIL reader turns back
            Image.fromarray(np.clip(np.round(r["image"][0]), 0, 255).astype(np.uint8).T).save(folder / name)
            writer.writerow([name, r["label"]])


def test_scores_a_release_and_writes_json(tmp_path):
    _fake_release(tmp_path / "release", n_per_class=2, size=16)
    out = tmp_path / "scores.json"
    cmd = [sys.executable, str(SCRIPT), "--release", str(tmp_path / "release"), "--seeds", "1"]
    cmd += ["--train-per-class", "4", "--epochs", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "us release: 10 images of 16 x 16 px" in proc.stdout
    scores = json.loads(out.read_text())
    assert scores["n_released"] == 10 and scores["per_class"] == {k: 2 for k in ("3", "4a", "4b", "4c", "5")}
    for key in ("real_accuracy", "synthetic_accuracy", "realism_accuracy", "real_vs_real_accuracy"):
        assert 0.0 <= scores[key] <= 1.0, (key, scores[key])
    assert "real-vs-synthetic accuracy" in proc.stdout


def test_scores_a_ct_release_in_hounsfield_units(tmp_path):
    import nibabel as nib

    release = tmp_path / "release"
    (release / "images").mkdir(parents=True)
    records = generate_cohort("ct", 6, 1, 2, 16, seed=3, first_patient=900_000)
    with open(release / "certificate.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "condition"])
        for i, r in enumerate(records):
            name = f"images/ct_{i:05d}.nii.gz"
            nib.save(nib.Nifti1Image(r["image"][0].astype(np.float32), np.eye(4)), release / name)
            writer.writerow([name, r["label"]])
    out = tmp_path / "scores.json"
    cmd = [sys.executable, str(SCRIPT), "--modality", "ct", "--release", str(release), "--seeds", "1"]
    cmd += ["--train-per-class", "4", "--epochs", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ct release: 6 images of 16 x 16 px" in proc.stdout
    scores = json.loads(out.read_text())
    assert set(scores["per_class"]) == {"normal", "nodule"} and sum(scores["per_class"].values()) == 6


def test_real_phantoms_of_a_cropping_quickstart_are_the_centre_of_the_larger_render(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart_quality", SCRIPT)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    quality.set_modality("ct")
    monkeypatch.setattr(quality, "PHANTOM_SIZE", 32)
    x, y = quality.real_cohort(1, 16, "realism")
    full = generate_cohort("ct", 2, 1, 2, 32, seed=7, first_patient=quality.FIRST_PATIENT["realism"])
    assert x.shape == (2, 1, 16, 16)
    np.testing.assert_allclose(x[0].numpy(), quality.to_model(full[0]["image"][..., 8:24, 8:24]), atol=1e-6)
    monkeypatch.setattr(quality, "PHANTOM_SIZE", 8)
    with pytest.raises(ValueError, match="smaller than the release"):
        quality.real_cohort(1, 16, "realism")
