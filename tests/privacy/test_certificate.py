"""Certificate (public, in the release) and audit file (private, outside it) of a guarded run."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from monai_synth.data.export import ReleaseWriter
from monai_synth.privacy.calibration import calibrate_threshold
from monai_synth.privacy.certificate import (
    load_certificate,
    write_certificate,
    write_private_audit,
)
from monai_synth.privacy.index import TrainingIndex
from monai_synth.privacy.safeguard import PrivacySafeguard
from monai_synth.privacy.sampling import guarded_sample
from monai_synth.privacy.spaces import PixelSpace

PATIENTS = [f"PAT-{i:04d}" for i in range(30)]


@pytest.fixture
def run():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(60, 1, 8, 8, generator=g)
    index = TrainingIndex.build(PixelSpace(grid=8), train, [PATIENTS[i // 2] for i in range(60)], "dl-fp")
    cal = calibrate_threshold(
        index, torch.randn(100, 1, 8, 8, generator=g), quantile=0.05, holdout_patient_ids=[f"H{i}" for i in range(100)]
    )
    safeguard = PrivacySafeguard([(index, cal)])

    def generate(n, seed, condition):  # every other call returns copies of training images
        if seed % 2 == 0:
            return train[seed : seed + n] * 0.5
        return torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)

    result = guarded_sample(generate, safeguard, [("3", 2), ("5", 3)], max_retries=3)
    return safeguard, result


def release_images(writer, result, to_physical):
    """Write the released images (as the release path does, record by record) and note each file on its record."""
    files = []
    for i, (image, record) in enumerate(zip(result.images, result.released_records)):
        record.file = writer.write_image(to_physical(image), f"images/synthetic_{i:05d}")
        files.append(record.file)
    return files


def _release(tmp_path, safeguard, result, **kwargs):
    with ReleaseWriter(tmp_path / "release", fmt="png", modality="us") as writer:
        files = release_images(writer, result, to_physical=lambda x: (x + 1) * 127.5)
        cert = write_certificate(writer, result, {"checkpoint": "ckpt-123"}, safeguard=safeguard, **kwargs)
    return files, cert


def test_certificate_summarises_the_run(tmp_path, run):
    safeguard, result = run
    files, cert = _release(tmp_path, safeguard, result, extra={"modality": "us"})
    on_disk = load_certificate(tmp_path / "release")
    assert on_disk["summary"] == cert["summary"]
    s = on_disk["summary"]
    assert (s["generated"], s["rejected"], s["released"]) == (10, 5, 5)
    assert s["rejection_rate"] == pytest.approx(0.5) and s["extra_sampling_cost"] == pytest.approx(1.0)
    pixel = on_disk["spaces"]["pixel"]
    assert pixel["threshold"] == pytest.approx(safeguard.thresholds["pixel"])
    assert pixel["calibration"]["quantile"] == 0.05 and pixel["calibration"]["n_holdout"] == 100
    assert on_disk["fingerprints"] == {"checkpoint": "ckpt-123", "index_pixel": safeguard.fingerprints["pixel"]}
    assert on_disk["min_released_distance"]["pixel"] >= pixel["threshold"]
    assert on_disk["modality"] == "us"
    assert all((tmp_path / "release" / f).is_file() for f in files)


def test_csv_has_one_row_per_released_image(tmp_path, run):
    safeguard, result = run
    files, _ = _release(tmp_path, safeguard, result)
    with open(tmp_path / "release" / "certificate.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == files
    assert [r["condition"] for r in rows] == ["3", "3", "5", "5", "5"]
    threshold = safeguard.thresholds["pixel"]
    for row, rec in zip(rows, result.released_records):
        assert row["passed"] == "True" and int(row["seed"]) == rec.seed and int(row["attempt"]) == rec.attempt
        assert float(row["distance_pixel"]) >= threshold - 1e-6
        assert float(row["threshold_pixel"]) == pytest.approx(threshold, abs=1e-6)


def test_no_patient_id_or_training_pixel_leaves_in_the_release(tmp_path, run):
    safeguard, result = run
    _release(tmp_path, safeguard, result)
    text = "".join(p.read_text() for p in (tmp_path / "release").glob("certificate.*"))
    assert not any(pid in text for pid in PATIENTS)
    assert "nearest_patient" not in text and "PAT-" not in text


def test_private_audit_names_nearest_patients_outside_the_release(tmp_path, run):
    safeguard, result = run
    _release(tmp_path, safeguard, result)
    audit = write_private_audit(tmp_path / "private" / "audit.csv", result, release_dir=tmp_path / "release")
    with open(audit) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10  # every generated image, one space
    rejected = [r for r in rows if r["passed"] == "False"]
    assert len(rejected) == 5 and all(r["nearest_patient"] in PATIENTS for r in rejected)
    with pytest.raises(ValueError, match="must not be written inside the release"):
        write_private_audit(tmp_path / "release" / "audit.csv", result, release_dir=tmp_path / "release")


def test_a_patient_id_used_as_condition_is_refused_and_nothing_is_released(tmp_path, run):
    safeguard, result = run
    result.records[2].condition = PATIENTS[0]
    with pytest.raises(ValueError, match="training patient ids"):
        _release(tmp_path, safeguard, result)
    assert not (tmp_path / "release").exists()  # the writer removed the partial release
    assert json.dumps(result.summary(), default=str)  # the run summary itself stays usable


def test_numeric_patient_ids_equal_to_labels_are_not_taken_for_leaks(tmp_path):
    train = torch.randn(20, 1, 8, 8)
    index = TrainingIndex.build(PixelSpace(grid=8), train, [str(i % 10) for i in range(20)], "dl")  # ids "0".."9"
    safeguard = PrivacySafeguard([(index, 0.05)])
    gen = lambda n, seed, condition: torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    result = guarded_sample(gen, safeguard, [("3", 1), ("5", 1)])
    with ReleaseWriter(tmp_path / "release", fmt="png", modality="us") as writer:
        release_images(writer, result, to_physical=lambda x: (x.clamp(-1, 1) + 1) * 127.5)
        write_certificate(writer, result, safeguard=safeguard, extra={"modality": "us"})  # BI-RADS "3", "5"
    assert load_certificate(tmp_path / "release")["summary"]["released"] == 2
