"""``monai-synth evaluate`` end to end on phantom cohorts: report.json keys, public vs private report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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
    assert report["fidelity"]["overall"]["real_floor"]["fid_ci_resamples"].startswith("patients")
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


TINY_BUNDLE = {"spatial_size": [32, 32], "autoencoder_channels": [8, 8], "autoencoder_norm_groups": 4,
               "autoencoder_res_blocks": 1, "latent_channels": 3, "patch_size": 4, "dit_hidden_size": 32,
               "dit_depth": 1, "dit_num_heads": 2}  # fmt: skip


def _bundle_checkpoints(tmp_path):
    """Checkpoints of the breast-ultrasound bundle's networks at tiny sizes, as its stages write them."""
    import torch
    from monai.bundle import ConfigParser

    from monai_synth.configs import common_files

    bundle = Path(__file__).resolve().parents[2] / "bundles" / "breast_us_ldit"
    parser = ConfigParser()
    parser.read_config(common_files(bundle))
    for k, v in TINY_BUNDLE.items():
        parser[k] = v
    torch.manual_seed(0)
    ae, dit = parser.get_parsed_content("autoencoder_def"), parser.get_parsed_content("network_def")
    torch.save(
        {"autoencoder": ae.state_dict(), "scale_factor": {"scale_factor": torch.tensor(2.0)}}, tmp_path / "ae.pt"
    )
    torch.save({"ema_network": dit.state_dict()}, tmp_path / "dit.pt")
    return bundle, tmp_path / "ae.pt", tmp_path / "dit.pt"


def test_checkpoints_add_membership_inference_to_the_report_and_its_gate(cohorts, tmp_path):
    from monai_synth.evaluation.report import OPTIONAL_KEYS, flat_metrics

    bundle, ae, dit = _bundle_checkpoints(tmp_path)
    out = tmp_path / "report"
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY_BUNDLE.items()]
    argv = ["evaluate", "--train", str(cohorts["train"]), "--holdout", str(cohorts["holdout"]), "--synthetic",
            str(cohorts["synthetic"]), "--modality", "us", "--out", str(out), "--spatial-size", "16",
            "--sections", "privacy", "--reid-steps", "5", "--bootstrap", "20", "--bundle", str(bundle),
            "--autoencoder-ckpt", str(ae), "--diffusion-ckpt", str(dit)]  # fmt: skip
    argv += [a for o in overrides for a in ("--bundle-override", o)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    mia = report["privacy"]["membership_inference"]
    assert set(mia["attacks"]) == {"loss", "pia", "secmi"} and mia["latent_shape"] == [3, 16, 16]
    assert report["privacy"]["mia_auc"] == max(a["auc"] for a in mia["attacks"].values())
    assert mia["attacks"]["pia"]["member_patients"] == 10 and mia["attacks"]["pia"]["nonmember_patients"] == 6
    assert (
        set(report["gate"]) >= {k for k in OPTIONAL_KEYS if k.startswith("privacy.")}
        and flat_metrics(report)["privacy.mia_auc"] == mia["mia_auc"]
    )
    assert mia["target"]["diffusion_sha256"] and "Membership inference" in (out / "report.html").read_text()


def test_membership_inference_needs_both_checkpoints_and_the_bundle(cohorts, tmp_path, capsys):
    argv = ["evaluate", "--train", str(cohorts["train"]), "--holdout", str(cohorts["holdout"]), "--synthetic",
            str(cohorts["synthetic"]), "--modality", "us", "--out", str(tmp_path / "r"), "--diffusion-ckpt", "x.pt"]  # fmt: skip
    assert main(argv) == 2
    assert "--autoencoder-ckpt" in capsys.readouterr().err


def test_restoration_tasks_add_their_psnr_ssim_and_equivalence_test(cohorts, tmp_path):
    out = tmp_path / "report"
    argv = ["evaluate", "--train", str(cohorts["train"]), "--holdout", str(cohorts["holdout"]), "--synthetic",
            str(cohorts["synthetic"]), "--modality", "us", "--out", str(out), "--spatial-size", "32",
            "--sections", "privacy", "--reid-steps", "5", "--bootstrap", "5", "--restoration", "denoise", "superres",
            "--restoration-steps", "5"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    for task in ("denoise", "superres"):
        res = report["restoration"][task]
        assert res["tost"]["psnr"]["margin"] == 0.5 and res["patients"] == 6
        assert report["gate"][f"restoration.{task}_psnr_synthetic"] == res["psnr_synthetic"]
    assert "gamma speckle" in report["restoration"]["denoise"]["degradation"]
    assert "Restoration utility" in (out / "report.html").read_text()
