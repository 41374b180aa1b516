"""End-to-end tests of the breast-ultrasound bundle: the stage configs as MONAI runs them, with tiny sizes.

One module-scoped run of the quickstart (phantom cohort -> autoencoder -> latent cache -> DiT -> guarded release,
tracked in MLflow) feeds several tests, each checking one property of its outputs. The bad-input tests stop before
any training and check that the error names the problem.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow

from monai_synth import workflows
from monai_synth.data.datalist import DatalistError
from monai_synth.data.preparation import load_splits, prepare_datalist
from monai_synth.engines.checkpoint import CheckpointMetadata, CheckpointMismatchError

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "breast_us_ldit"
LABELS = ["3", "4a", "4b", "4c", "5"]


def _quickstart_overrides(**extra) -> dict:
    """The quickstart's own small sizes, made smaller still so the whole chain runs in seconds."""
    parser = ConfigParser.load_config_file(str(BUNDLE / "configs" / "quickstart.yaml"))
    overrides = dict(parser["overrides"])
    overrides.update(
        phantom_patients=25,
        ae_max_epochs=2,
        ae_warmup_steps=2,  # a warm-up and a decay, so that the saved schedule is not a constant rate
        ae_lr_final=0.5,
        dit_max_epochs=2,
        val_interval=1,
        ckpt_interval=1,
        grid_interval=2,
        grid_per_class=1,
        num_inference_steps=2,
        num_per_class=2,
        calibration_quantile=0.2,
        decoder_noise="fitted",  # not the quickstart's white noise: the chain also covers fitting the noise model
    )
    overrides.update(extra)
    return overrides


def _quickstart_report_settings() -> dict:
    """The quickstart's report settings (its ``report`` key), with budgets cut to a few steps."""
    settings = dict(ConfigParser.load_config_file(str(BUNDLE / "configs" / "quickstart.yaml"))["report"])
    settings.update(utility_steps=3, reid_steps=3, bootstrap=3, permutations=3)
    return settings


def _causes(err: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from (MONAI wraps config errors in RuntimeError)."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _workflow(stage: str, overrides: dict, workflow_type: str | None = "train") -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=workflows.stage_config_files(BUNDLE, stage),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        **overrides,
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run the quickstart once with tiny overrides; MLflow goes to a store inside the run's folder."""
    out = tmp_path_factory.mktemp("quickstart")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        overrides = _quickstart_overrides()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            outputs = workflows.run_quickstart(
                BUNDLE, out, overrides=overrides, threads=1, evaluation=_quickstart_report_settings()
            )
        # a copy of the finished quickstart, for re-running the release stage: the resume below and the tests that
        # re-initialise stages on `out` replace its autoencoder and latent cache
        snapshot = tmp_path_factory.mktemp("quickstart_snapshot")
        shutil.copytree(out, snapshot, dirs_exist_ok=True)
        # then resume the autoencoder stage for one more epoch on the same folder
        resumed = workflows.run_stage(
            BUNDLE,
            "autoencoder",
            overrides={**overrides, "output_dir": str(out), "dataset_dir": None, "ae_max_epochs": 3},
        )
    return {
        "out": out,
        "uri": uri,
        "outputs": outputs,
        "overrides": overrides,
        "resumed": resumed,
        "snapshot": snapshot,
        "printed": printed.getvalue(),
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A small phantom cohort (datalist path) for the bad-input tests."""
    out = tmp_path_factory.mktemp("cohort")
    return prepare_datalist(None, out, "us", phantom_patients=10, phantom_images_per_patient=2, phantom_size=32)


def _mlflow_runs(uri: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("breast_us_ldit")
    assert experiment is not None, "the bundle's experiment was not created"
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_quickstart_writes_the_documented_layout(chain):
    out = chain["out"]
    for what, where in workflows.quickstart_outputs(out).items():
        if what == "MLflow store":
            continue
        assert Path(where).exists(), f"{what} missing at {where}"
    assert (out / "models" / "autoencoder" / "autoencoder.pt").is_file()
    assert (out / "models" / "diffusion" / "diffusion.pt").is_file()
    assert (out / "private_audit.csv").is_file()
    # the private audit names training patients, so it must never be inside the release
    assert not any("audit" in p.name for p in (out / "release").rglob("*"))


@pytest.mark.slow
def test_quickstart_ends_with_its_evaluation_report_and_names_it(chain):
    from monai_synth.evaluation.report import GATE_KEYS

    report_html = chain["out"] / "evaluation" / "report.html"
    assert chain["outputs"]["evaluation report"] == str(report_html) and report_html.is_file()
    report = json.loads((chain["out"] / "evaluation" / "report.json").read_text())
    # against the quickstart's own held-out patients, with its quick settings: PIA only, no restoration
    assert set(GATE_KEYS) <= set(report["gate"]) and report["restoration"] is None
    assert sorted(report["privacy"]["membership_inference"]["attacks"]) == ["pia"]
    assert report["counts"]["synthetic"] == 2 * len(LABELS)
    lines = chain["printed"].strip().splitlines()
    assert "stage evaluation report done in" in chain["printed"]
    assert "left out: restoration" in chain["printed"] and "quickstart_evaluation.py" in chain["printed"]
    assert lines[-1].startswith(f"[quickstart] evaluation report: {report_html}")


def test_quickstart_report_settings_are_ids_of_the_evaluate_stage():
    settings = ConfigParser.load_config_file(str(BUNDLE / "configs" / "quickstart.yaml"))["report"]
    stage_ids = set()
    for path in workflows.stage_config_files(BUNDLE, "evaluate"):
        stage_ids |= set(ConfigParser.load_config_file(path))
    assert settings and not sorted(set(settings) - stage_ids)
    assert all(not str(v).startswith(("$", "@", "%")) for v in settings.values())


@pytest.mark.slow
def test_release_has_every_birads_class_and_a_certificate(chain):
    release = chain["out"] / "release"
    certificate = json.loads((release / "certificate.json").read_text())
    assert certificate["summary"]["released"] == 2 * len(LABELS)
    (specificity,) = {space["specificity"] for space in certificate["spaces"].values()}
    assert 0.0 < specificity <= 0.003  # the gate's default, lowered to its share of the calibration where needed
    with open(release / "certificate.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["condition"] for r in rows}) == sorted(LABELS)
    for row in rows:
        assert (release / row["file"]).is_file()
        assert float(row["distance_pixel"]) >= float(row["threshold_pixel"])
    # no patient id of the phantom cohort ("P0000"-style) leaks into the public certificate
    text = (release / "certificate.json").read_text() + (release / "certificate.csv").read_text()
    assert "P00" not in text


@pytest.mark.slow
def test_stage1_checkpoint_holds_scale_factor_and_metadata(chain):
    ckpt = torch.load(chain["out"] / "models" / "autoencoder" / "autoencoder.pt", weights_only=True)
    scale = float(ckpt["scale_factor"]["scale_factor"])
    assert scale > 0 and scale == scale  # computed (not the NaN "never computed" marker)
    assert ckpt["metadata"]["modality"] == "us"
    assert ckpt["metadata"]["labels"] == LABELS
    cache = torch.load(chain["out"] / "latents" / "train_latents.pt", weights_only=True)
    # 32 x 32 images, two autoencoder levels (one halving): latent_channels x 16 x 16
    assert cache["latents"].shape[1:] == (chain["overrides"]["latent_channels"], 16, 16)
    assert cache["label_names"] == LABELS


@pytest.mark.slow
def test_stage1_checkpoint_carries_the_decoder_noise_fitted_on_the_training_set(chain):
    assert chain["overrides"]["decoder_noise"] == "fitted"  # set by _quickstart_overrides
    ckpt = torch.load(chain["snapshot"] / "models" / "autoencoder" / "autoencoder.pt", weights_only=True)
    weights = ckpt["autoencoder"]
    assert bool(weights["noise_fitted"])
    kernel = weights["noise_kernel"][0, 0]
    assert float(kernel.norm()) == pytest.approx(1.0, abs=1e-4)  # unit energy: the filtered noise keeps unit variance
    assert float(kernel.abs().max()) < 0.999  # fitted, not the white-noise delta it starts as
    assert bool((weights["noise_quantiles"].diff(dim=1) >= 0).all())  # a quantile table is non-decreasing


@pytest.mark.slow
def test_stage1_learning_rate_follows_its_schedule_and_is_saved(chain):
    from monai_synth.engines.diffusion import WarmupCosine

    ckpt = torch.load(chain["snapshot"] / "models" / "autoencoder" / "autoencoder.pt", weights_only=True)
    o = chain["overrides"]
    iterations = ckpt["trainer"]["iteration"]
    schedule = WarmupCosine(o["ae_warmup_steps"], iterations, o["ae_lr_final"])
    # stepped once per iteration (not per epoch) and saved, so a resume continues the same schedule
    assert ckpt["lr_scheduler"]["last_epoch"] == iterations
    lr = ckpt["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(o["ae_lr"] * schedule(iterations)) and lr != pytest.approx(o["ae_lr"])


@pytest.mark.slow
def test_resume_continues_from_the_saved_iteration(chain):
    trainer = chain["resumed"].parser.get_parsed_content("train#trainer")
    iters_per_epoch = trainer.state.epoch_length
    assert trainer.state.epoch == 3
    assert trainer.state.iteration == 3 * iters_per_epoch
    # the resume continued the MLflow run of the checkpoint it resumed: one autoencoder run, each epoch logged
    # once (epochs 1-2 were loaded, not trained again)
    client, runs = _mlflow_runs(chain["uri"])
    ae_runs = [r for r in runs if r.info.run_name.startswith("train_autoencoder-US")]
    assert len(ae_runs) == 1 and ae_runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(ae_runs[0].info.run_id, "epoch_train_loss")]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_mlflow_records_each_stage_with_params_metrics_and_artifacts(chain):
    client, runs = _mlflow_runs(chain["uri"])
    names = [r.info.run_name for r in runs]
    for stage in ("train_autoencoder-US", "train_diffusion-US", "sample-US"):
        assert any(n.startswith(stage) for n in names), f"no {stage} run in {names}"
    by_stage = {r.info.run_name.split("-")[0]: r for r in runs}
    ae = by_stage["train_autoencoder"]
    assert ae.data.params["stage"] == "train_autoencoder"
    assert ae.data.params["labels"] == json.dumps(LABELS)
    assert "epoch_train_loss" in ae.data.metrics and "val_l1" in ae.data.metrics
    dit = by_stage["train_diffusion"]
    assert "val_loss" in dit.data.metrics
    dit_files = [a.path for a in client.list_artifacts(dit.info.run_id)]
    assert "diffusion.pt" in dit_files and "sample_grids" in dit_files
    sample = by_stage["sample"]
    assert sample.data.metrics["released"] == 2 * len(LABELS)
    certificate_files = [a.path for a in client.list_artifacts(sample.info.run_id, "certificate")]
    assert "certificate/certificate.json" in certificate_files


def _files(folder: Path) -> dict[str, float]:
    return {str(f.relative_to(folder)): f.stat().st_mtime for f in folder.rglob("*") if f.is_file()}


@pytest.mark.slow
def test_rerun_of_a_copied_quickstart_logs_into_the_copy_and_adds_no_runs(chain, tmp_path, monkeypatch):
    import hashlib

    run = tmp_path / "copy"
    shutil.copytree(chain["snapshot"], run)  # its MLflow store was made in chain["out"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default store, <output_dir>/mlflow.db
    original = _files(chain["out"] / "mlruns")
    _, before = _mlflow_runs(f"sqlite:///{run / 'mlflow.db'}")
    checkpoints = [run / "models" / s / f"{s}.pt" for s in ("autoencoder", "diffusion")]
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoints]
    uploaded = {k: v for k, v in _files(run / "mlruns").items() if k.endswith(".pt")}

    workflows.run_quickstart(BUNDLE, run, overrides=chain["overrides"], threads=1)
    _, first = _mlflow_runs(f"sqlite:///{run / 'mlflow.db'}")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # `--report False`, as a command line can say it, skips the report
        workflows.run_quickstart(BUNDLE, run, overrides=chain["overrides"], threads=1, evaluation=False)
    assert "stage sample done" in printed.getvalue() and "evaluation report" not in printed.getvalue()

    client, after = _mlflow_runs(f"sqlite:///{run / 'mlflow.db'}")
    # the finished training stages continue their runs; the copy's release is made from the copy's datalist (another
    # path), so it is a release of its own the first time, and the same release the second time
    new = {r.info.run_id: r.info.run_name for r in first}.keys() - {r.info.run_id for r in before}
    assert [{r.info.run_id: r.info.run_name for r in first}[k].split("-")[0] for k in new] == ["sample"]
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in first)
    assert all(r.info.status == "FINISHED" for r in after)
    assert _files(chain["out"] / "mlruns") == original  # nothing logged into the folder it was copied from
    assert client.get_experiment_by_name("breast_us_ldit").artifact_location.endswith(f"{run.name}/mlruns")
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoints] == digests
    assert {k: v for k, v in _files(run / "mlruns").items() if k.endswith(".pt")} == uploaded  # not uploaded again


@pytest.mark.slow
def test_diffusion_stage_has_every_required_bundle_property(chain):
    # (the autoencoder stage is checked with --tracking mlflow below; run_stage checks both before running)
    overrides = {**chain["overrides"], "output_dir": str(chain["out"]), "dataset_dir": None}
    workflow = _workflow("diffusion", overrides)
    workflow.initialize()
    assert workflow.check_properties() == []


def test_quickstart_config_overrides_only_ids_the_stages_define():
    parser = ConfigParser.load_config_file(str(BUNDLE / "configs" / "quickstart.yaml"))
    stage_ids = set()
    for stage in workflows.STAGES:
        for path in workflows.stage_config_files(BUNDLE, stage):
            stage_ids |= set(ConfigParser.load_config_file(path))
    unknown = sorted(set(parser["overrides"]) - stage_ids)
    assert not unknown, f"quickstart overrides ids no stage config defines: {unknown}"
    assert all(not str(v).startswith(("$", "@", "%")) for v in parser["overrides"].values())


def test_metadata_describes_us_and_both_networks():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["modality"] == "US"
    assert meta["schema"].startswith("https://github.com/Project-MONAI/")
    assert meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["inputs"]["context"]["num_channels"] == len(LABELS)
    assert meta["autoencoder_data_format"]["inputs"]["image"]["num_channels"] == 1


def test_unknown_label_stops_before_training(tmp_path, cohort):
    rows = list(csv.DictReader(open(cohort, newline="")))
    rows[3]["label"] = "6"
    bad = tmp_path / "datalist.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            row["image"] = str(Path(cohort).parent / row["image"])
            writer.writerow(row)
    workflow = _workflow(
        "autoencoder", _quickstart_overrides(output_dir=str(tmp_path / "run"), dataset_dir=str(tmp_path))
    )
    with pytest.raises(Exception) as info:
        workflow.initialize()
        workflow.check_properties()
    errors = [e for e in _causes(info.value) if isinstance(e, DatalistError)]
    assert errors and "6" in str(errors[0])
    assert not (tmp_path / "run" / "models").exists()


def test_spatial_size_the_autoencoder_cannot_downsample_is_refused(tmp_path, cohort):
    overrides = _quickstart_overrides(spatial_size=[33, 33], output_dir=str(tmp_path), datalist=cohort)
    workflow = _workflow("autoencoder", overrides)
    with pytest.raises(Exception) as info:
        workflow.initialize()
    messages = [str(e) for e in _causes(info.value) if isinstance(e, ValueError)]
    assert any("spatial_size [33, 33] cannot be used" in m for m in messages), messages


def test_stage2_without_stage1_checkpoint_is_a_clear_error(tmp_path, cohort):
    workflow = _workflow("diffusion", _quickstart_overrides(output_dir=str(tmp_path), datalist=cohort))
    with pytest.raises(Exception) as info:
        workflow.initialize()
    missing = [e for e in _causes(info.value) if isinstance(e, FileNotFoundError)]
    assert missing and "autoencoder stage" in str(missing[0])
    assert not (tmp_path / "latents").exists()


def test_checkpoint_of_another_modality_is_refused_before_training(tmp_path, cohort):
    overrides = _quickstart_overrides(output_dir=str(tmp_path), datalist=cohort)
    parser = _workflow("autoencoder", overrides).parser
    autoencoder = parser.get_parsed_content("autoencoder_def")
    foreign = CheckpointMetadata(
        bundle="chest_ct_ldit", modality="ct", labels=["normal", "nodule"], stage="autoencoder"
    )
    path = tmp_path / "models" / "autoencoder" / "autoencoder.pt"
    path.parent.mkdir(parents=True)
    torch.save({"autoencoder": autoencoder.state_dict(), "metadata": foreign.state_dict()}, path)
    workflow = _workflow("diffusion", overrides)
    with pytest.raises(Exception) as info:
        workflow.initialize()
    mismatch = [e for e in _causes(info.value) if isinstance(e, CheckpointMismatchError)]
    assert mismatch and "modality" in str(mismatch[0])
    assert not (tmp_path / "latents").exists()


@pytest.mark.slow
def test_monai_tracking_option_adds_its_handler_to_the_same_run(chain):
    overrides = {**chain["overrides"], "output_dir": str(chain["out"]), "dataset_dir": None, "ae_max_epochs": 4}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", chain["uri"])
        workflow = ConfigWorkflow(
            config_file=workflows.stage_config_files(BUNDLE, "autoencoder"),
            logging_file=False,
            tracking="mlflow",
            bundle_root=str(BUNDLE),
            **overrides,
        )
        workflow.initialize()
        assert workflow.check_properties() == []
        workflow.run()
        workflow.finalize()
    client, runs = _mlflow_runs(chain["uri"])
    ae_runs = [r for r in runs if r.info.run_name.startswith("train_autoencoder-US")]
    # MONAI's handler logs the loss every iteration, the bundle's own handler the epoch means: one run holds both,
    # the autoencoder run this resume continued
    assert len(ae_runs) == 1, [(r.info.run_name, r.info.status, sorted(r.data.metrics)) for r in ae_runs]
    assert "train_loss" in ae_runs[0].data.metrics and "epoch_train_loss" in ae_runs[0].data.metrics


def _sample_overrides(chain, name: str, **extra) -> dict:
    """Re-run only the release stage on the quickstart's checkpoints, into its own release folder, without MLflow."""
    out = chain["snapshot"]
    return {
        **chain["overrides"],
        "output_dir": str(out),
        "dataset_dir": None,
        "mlflow": False,
        "release_dir": str(out / name),
        "private_audit": str(out / f"{name}_audit.csv"),
        **extra,
    }


@pytest.mark.slow
def test_embedding_space_is_trained_on_the_bundles_train_split(chain):
    from monai_synth.privacy.embedding import EmbeddingSpace

    overrides = _sample_overrides(chain, "release_embedding", privacy_spaces=["pixel:none", "embedding"])
    # the calibration options are config keys: here the holdout alone and no specificity test
    options = {"cross_patient_images": 0, "specificity": 0}
    workflows.run_stage(BUNDLE, "sample", overrides={**overrides, **options, "embedding_epochs": 1})
    release = chain["snapshot"] / "release_embedding"
    certificate = json.loads((release / "certificate.json").read_text())
    for space in certificate["spaces"].values():
        assert space["specificity"] == 0.0 and space["calibration"]["n_cross_patient"] == 0
    weights = chain["snapshot"] / "models" / "embedding.pt"
    # the weights saved at release carry the fingerprint of the very training split the index was built from
    EmbeddingSpace.from_weights(weights, expected_data_fingerprint=certificate["fingerprints"]["datalist"])
    with open(release / "certificate.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(LABELS)
    assert all(float(r["distance_embedding"]) >= float(r["threshold_embedding"]) for r in rows)


@pytest.mark.slow
def test_embedding_weights_trained_on_other_data_are_refused(chain, tmp_path):
    from monai_synth.privacy.embedding import EmbeddingWeightsError, train_embedding

    other = train_embedding(
        torch.rand(8, 1, 32, 32) * 2 - 1,
        [f"X{i // 2}" for i in range(8)],
        spatial_dims=2,
        epochs=1,
        batch_size=8,
        views_per_patient=2,
    )
    other.data_fingerprint = "another-cohort"
    other.save(tmp_path / "other.pt")
    overrides = _sample_overrides(
        chain, "release_other", privacy_spaces=["embedding"], embedding_weights=str(tmp_path / "other.pt")
    )
    with pytest.raises(Exception) as info:
        workflows.run_stage(BUNDLE, "sample", overrides=overrides)
    refused = [e for e in _causes(info.value) if isinstance(e, EmbeddingWeightsError)]
    assert refused and "trained on data with fingerprint" in str(refused[0])
    assert not (chain["snapshot"] / "release_other").exists()


@pytest.mark.slow
def test_evaluate_config_reports_the_bundles_release_and_logs_it_to_mlflow(chain, tmp_path):
    """configs/evaluate.yaml on the quickstart's release: report.json with the gate keys, the same metrics in MLflow."""
    from monai_synth.evaluation.report import GATE_KEYS, OPTIONAL_KEYS

    out = tmp_path / "run"
    shutil.copytree(chain["snapshot"], out)
    overrides = {**chain["overrides"], "output_dir": str(out), "dataset_dir": None, "utility_steps": 5,
                 "reid_steps": 5, "bootstrap": 5, "permutations": 5, "restoration_steps": 5}  # fmt: skip
    workflow = ConfigWorkflow(
        config_file=workflows.stage_config_files(BUNDLE, "evaluate"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(BUNDLE),
        **overrides,
    )
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()
    report = json.loads((out / "evaluation" / "report.json").read_text())
    # the bundle's own checkpoints are attacked, and its default restoration task (denoise) is run
    assert set(report["gate"]) == set(GATE_KEYS) | {k for k in OPTIONAL_KEYS if "superres" not in k}
    mia = report["privacy"]["membership_inference"]
    assert mia["objective"] == "rectified flow" and mia["target"]["weights"] == "EMA"
    assert report["counts"]["synthetic"] == 2 * len(LABELS)
    assert (out / "evaluation.private_report.html").is_file()
    client, runs = _mlflow_runs(os.environ["MLFLOW_TRACKING_URI"])
    metrics = runs[-1].data.metrics
    assert metrics["fidelity.fid"] == pytest.approx(report["fidelity"]["fid"])
    assert "privacy.reid_match_rate" in metrics
    assert metrics["privacy.mia_auc"] == pytest.approx(report["privacy"]["mia_auc"])


@pytest.mark.slow
def test_quickstart_evaluation_benchmark_reports_every_section_at_toy_size(chain, tmp_path):
    """benchmarks/quickstart_evaluation.py on a finished (tiny) quickstart: the full evaluation, every attack."""
    out = tmp_path / "run"
    shutil.copytree(chain["snapshot"], out)
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "quickstart_evaluation.py"
    cmd = [sys.executable, str(script), "--output-dir", str(out), "--utility-steps", "2", "--reid-steps", "2"]
    cmd += ["--bootstrap", "2", "--permutations", "2", "--restoration-steps", "2"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(BUNDLE.parents[1]), os.environ.get("PYTHONPATH", "")])  # this checkout
    printed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True, env=env).stdout
    assert f"report: {out / 'evaluation' / 'report.json'}" in printed
    for task in ("denoise", "superres"):
        assert f"restoration {task} TOST:" in printed
    for attack in ("loss", "pia", "secmi"):
        assert f"membership {attack}: AUC" in printed
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert report["utility"]["budget"]["steps"] == 2 and report["restoration"]["denoise"]["budget"]["steps"] == 2
    assert set(report["cpu_seconds"]) == set(report["timing_seconds"])


@pytest.mark.slow
def test_decoder_noise_benchmark_scores_white_and_fitted_noise_at_toy_size(chain):
    """benchmarks/decoder_noise.py on a finished (tiny) quickstart: both noise models on the same weights."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "decoder_noise.py"
    cmd = [sys.executable, str(script), "--output-dir", str(chain["snapshot"]), "--per-class", "1"]
    cmd += ["--kernel-sizes", "7", "3"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BUNDLE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    printed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True, env=env).stdout
    scores = json.loads(printed.strip().splitlines()[-1])
    # kernel 7 is read from the checkpoint (stage 1 fitted it), kernel 3 is fitted by the benchmark
    assert set(scores) == {"white", "fitted, kernel 7", "fitted, kernel 3 (fitted here)"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


@pytest.mark.slow
def test_checkpoint_realism_benchmark_scores_several_sets_at_toy_size(chain):
    """benchmarks/quickstart_checkpoints.py on a finished (tiny) quickstart: one realism score per set of samples."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "quickstart_checkpoints.py"
    cmd = [sys.executable, str(script), "--output-dir", str(chain["snapshot"]), "--sets", "2", "--per-set", "2"]
    cmd += ["--classifier-per-class", "4"]
    for key, value in chain["overrides"].items():  # the tiny run's settings, so its checkpoints are accepted
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BUNDLE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    printed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True, env=env).stdout
    result = json.loads(printed.strip().splitlines()[-1])
    assert len(result["realism_sets"]) == 2 and all(0.0 <= v <= 1.0 for v in result["realism_sets"])
    assert result["realism_accuracy"] == pytest.approx(sum(result["realism_sets"]) / 2)
    assert result["class_ratio"] >= 0.0


def _rewrite_datalist(cohort: str, dest: Path, replace: dict[str, str]) -> Path:
    """A copy of the cohort's datalist with absolute image paths, some images replaced by other files."""
    rows = list(csv.DictReader(open(cohort, newline="")))
    with open(dest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            image = str(Path(cohort).parent / row["image"])
            writer.writerow({**row, "image": replace.get(image, image)})
    return dest


def test_non_image_dicom_in_the_holdout_stops_stage1_before_training(tmp_path, cohort):
    from pydicom.data import get_testdata_file

    holdout = load_splits(cohort, LABELS)["holdout"][0]["image"]
    dose = tmp_path / "dose.dcm"
    shutil.copy(get_testdata_file("rtdose.dcm"), dose)
    datalist = _rewrite_datalist(cohort, tmp_path / "datalist.csv", {holdout: str(dose)})
    workflow = _workflow("autoencoder", _quickstart_overrides(output_dir=str(tmp_path / "run"), datalist=str(datalist)))
    with pytest.raises(Exception) as info:
        workflow.initialize()
        workflow.check_properties()
    errors = [e for e in _causes(info.value) if isinstance(e, DatalistError)]
    assert errors and "holdout split" in str(errors[0]) and f"{dose} is an RT dose grid" in str(errors[0])
    assert not (tmp_path / "run" / "models").exists()


@pytest.mark.slow
def test_resume_with_a_changed_learning_rate_is_refused_naming_it(chain, tmp_path):
    from monai_synth.engines.resume import ResumeMismatchError

    run = tmp_path / "run"
    shutil.copytree(chain["snapshot"], run)  # a copied output folder resumes like the original
    overrides = {**chain["overrides"], "output_dir": str(run), "dataset_dir": None, "mlflow": False}
    overrides.update(ae_max_epochs=3, ae_lr=5.0e-3)
    iterations = []
    with pytest.raises(Exception) as info:
        workflow = _workflow("autoencoder", overrides)
        workflow.initialize()
        workflow.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.ITERATION_STARTED, lambda e: iterations.append(e.state.iteration)
        )
        workflow.run()
    refused = [e for e in _causes(info.value) if isinstance(e, ResumeMismatchError)]
    assert refused and "ae_lr: checkpoint 0.002, this run 0.005" in str(refused[0])
    assert "--resume_changes apply" in str(refused[0]) and iterations == []


@pytest.mark.slow
def test_release_on_another_dataset_is_refused_naming_both_fingerprints(chain, cohort):
    from monai_synth.data.datalist import content_fingerprint
    from monai_synth.engines.checkpoint import CheckpointMismatchError

    trained = torch.load(chain["snapshot"] / "models" / "autoencoder" / "autoencoder.pt", weights_only=True)
    trained = trained["metadata"]["training_split"]
    other = content_fingerprint(load_splits(cohort, LABELS)["train"])
    overrides = _sample_overrides(chain, "release_other_data", datalist=cohort)
    with pytest.raises(Exception) as info:
        workflows.run_stage(BUNDLE, "sample", overrides=overrides)
    refused = [e for e in _causes(info.value) if isinstance(e, CheckpointMismatchError)]
    assert refused and trained in str(refused[0]) and other in str(refused[0]) and trained != other
    assert not (chain["snapshot"] / "release_other_data").exists()


@pytest.mark.slow
def test_dataset_dir_none_on_the_monai_command_line_trains_on_a_phantom_cohort(tmp_path):
    # `python -m monai.bundle run` drops None-valued overrides, so `--dataset_dir None` must mean what the default means
    small = {
        "spatial_size": "[32,32]",
        "phantom_patients": 10,
        "autoencoder_channels": "[8,16]",
        "autoencoder_norm_groups": 8,
        "autoencoder_res_blocks": 1,
        "latent_channels": 2,
        "patch_size": 4,
        "ae_max_epochs": 1,
        "ae_batch_size": 8,
        "adv_weight": 0.0,
        "mlflow": "false",
        "device": "cpu",
    }
    args = [f"--{k}={v}" for k, v in small.items()]
    # the package under test, also when another copy is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BUNDLE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    # the documented `--config_file "$(python -m monai_synth.configs . autoencoder)"`
    listed = subprocess.run(
        [sys.executable, "-m", "monai_synth.configs", ".", "autoencoder"],
        cwd=BUNDLE,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        listed,
        "--bundle_root",
        ".",
        "--output_dir",
        str(tmp_path),
        "--dataset_dir",
        "None",
        *args,
    ]
    done = subprocess.run(command, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "phantom_cohort" / "datalist.csv").is_file()
    assert (tmp_path / "models" / "autoencoder" / "autoencoder.pt").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_one_multi_gpu_overlay_serves_both_training_stages(chain, tmp_path, monkeypatch):
    # a one-process gloo group on CPU: the overlay's DDP wrapping, samplers and process group, not the speed-up
    import ignite.distributed as idist
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        monkeypatch.setenv(key, value)
    small = {k: v for k, v in chain["overrides"].items() if k != "device"}  # the overlay picks the device
    runs = {
        "autoencoder": {
            **small,
            "output_dir": str(tmp_path),
            "dataset_dir": None,
            "ae_max_epochs": 1,
            "mlflow": False,
        },
        "diffusion": {**small, "output_dir": str(chain["snapshot"]), "dataset_dir": None, "mlflow": False},
    }
    for stage, overrides in runs.items():
        workflow = ConfigWorkflow(
            config_file=workflows.stage_config_files(BUNDLE, stage, multi_gpu=True),
            logging_file=False,
            workflow_type="train",
            bundle_root=str(BUNDLE),
            **overrides,
        )
        workflow.initialize()
        try:
            assert dist.is_initialized()
            assert workflow.check_properties() == []
            trainer = workflow.parser.get_parsed_content("train#trainer")
            assert isinstance(trainer.network, DistributedDataParallel)
            assert isinstance(trainer.data_loader.sampler, DistributedSampler)
            if stage == "autoencoder":
                workflow.run()
                assert (tmp_path / "models" / "autoencoder" / "autoencoder.pt").is_file()
        finally:
            workflow.finalize()
        assert not dist.is_initialized()
        assert idist.model_name() == "serial"  # Ignite's metrics no longer gather across a finished group
