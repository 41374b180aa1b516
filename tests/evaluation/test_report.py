"""``monai-synth evaluate`` end to end on phantom cohorts: report.json keys, public vs private report."""

from __future__ import annotations

import csv
import json

import pytest

from monai_synth.cli import main
from monai_synth.data.phantoms import write_cohort
from monai_synth.evaluation.report import GATE_KEYS, load_synthetic


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts")
    kw = dict(modality="us", images_per_patient=2, spatial_size=32, seed=0)
    return {
        "train": write_cohort(root / "train", n_patients=10, **kw),
        "holdout": write_cohort(root / "holdout", n_patients=6, first_patient=10, **kw),
        "synthetic": write_cohort(root / "synthetic", n_patients=8, first_patient=100, **kw),
    }


def test_evaluate_writes_every_gate_metric_and_keeps_patients_out_of_the_public_report(cohorts, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["evaluate", "--train", str(cohorts["train"]), "--holdout", str(cohorts["holdout"]), "--synthetic",
            str(cohorts["synthetic"]), "--modality", "us", "--out", str(out), "--spatial-size", "32",
            "--utility-steps", "10", "--reid-steps", "10", "--bootstrap", "10", "--permutations", "10"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    for key in GATE_KEYS:
        section, name = key.split(".")
        assert isinstance(report[section][name], float), key
    assert set(report["gate"]) == set(GATE_KEYS)
    assert report["fidelity"]["space"]["weights_sha256"] and set(report["timing_seconds"]) >= {"fidelity", "total"}
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3
    with open(cohorts["train"], newline="") as f:
        train_ids = {row["patient_id"] for row in csv.DictReader(f)}
    public = page + (out / "report.json").read_text()
    assert not [p for p in train_ids if p in public]
    private = tmp_path / "report.private_report.html"
    assert any(p in private.read_text() for p in train_ids)
    assert "fidelity.fid =" in capsys.readouterr().out
    assert main(argv) == 2  # a non-empty report folder is not overwritten silently


def test_private_report_inside_the_public_folder_is_refused(cohorts, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["evaluate", "--train", str(cohorts["train"]), "--holdout", str(cohorts["holdout"]), "--synthetic",
            str(cohorts["synthetic"]), "--modality", "us", "--out", str(out), "--private-report", str(out / "p.html")]  # fmt: skip
    assert main(argv) == 2
    assert "must not be written inside" in capsys.readouterr().err


def test_release_folder_conditions_are_labels_or_class_ids(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "certificate.csv").write_text("file,condition,seed\na.png,4b,1\nb.png,4,2\n")
    recs = load_synthetic(tmp_path, ["3", "4a", "4b", "4c", "5"])
    assert [r["label"] for r in recs] == [2, 4]
    (tmp_path / "certificate.csv").write_text("file,condition,seed\na.png,7b,1\n")
    with pytest.raises(ValueError, match="not a label"):
        load_synthetic(tmp_path, ["3", "4a", "4b", "4c", "5"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no certificate.csv"):
        load_synthetic(tmp_path / "empty", ["3"])


def test_user_feature_weights_are_named_with_their_hash(cohorts, tmp_path):
    from monai_synth.evaluation.features import random_feature_space

    weights = random_feature_space(2, seed=7).save(tmp_path / "my_features.pt")
    out = tmp_path / "report"
    argv = ["evaluate", "--train", str(cohorts["train"]), "--holdout", str(cohorts["holdout"]), "--synthetic",
            str(cohorts["synthetic"]), "--modality", "us", "--out", str(out), "--spatial-size", "32",
            "--sections", "fidelity", "--feature-space", "weights", "--feature-weights", str(weights),
            "--bootstrap", "5", "--permutations", "5"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity"]["space"]["name"] == "weights(my_features.pt)"
    assert report["fidelity"]["space"]["weights_sha256"] == random_feature_space(2, seed=7).weights_hash
    assert report["utility"] is None and set(report["gate"]) == {"fidelity.fid", "fidelity.fid_real_floor"}
