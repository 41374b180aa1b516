"""The whole bundle under ``torchrun --nproc_per_node=2`` (gloo, CPU) at tiny size: what CI runs for multi-GPU.

Stage 1 and stage 2 train with DistributedDataParallel (``multi_gpu.yaml``) and the release is sharded
(``multi_gpu_sample.yaml``). Checked: a final checkpoint per training stage (stage 2 with a sample grid on its last
epoch), one complete certificate whose images are all there exactly once and were drawn from disjoint seeds, one
MLflow run per stage, and not one file written by rank 1 (recorded by Python's audit hooks, see ``ddp_launch.py``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "breast_us_ldit"
LAUNCH = Path(__file__).resolve().parent / "ddp_launch.py"
LABELS = ["3", "4a", "4b", "4c", "5"]
STAGE_FILES = {
    "autoencoder": ["common.yaml", "train_autoencoder.yaml", "multi_gpu.yaml"],
    "diffusion": ["common.yaml", "train_diffusion.yaml", "multi_gpu.yaml"],
    "sample": ["common.yaml", "sample.yaml", "multi_gpu_sample.yaml"],
}
NUM_PER_CLASS = 3  # odd: the ranks' shares of a class differ
TINY = {
    "spatial_size": "[32,32]",
    "phantom_patients": 20,
    "autoencoder_channels": "[8,16]",
    "autoencoder_norm_groups": 8,
    "autoencoder_res_blocks": 1,
    "latent_channels": 2,
    "adv_weight": 0,
    "ae_max_epochs": 1,
    "ae_batch_size": 8,
    "patch_size": 4,
    "dit_hidden_size": 32,
    "dit_depth": 1,
    "dit_num_heads": 2,
    "dit_max_epochs": 2,
    "dit_batch_size": 8,
    "dit_warmup_steps": 0,
    "grid_interval": 2,  # a sample grid on the last epoch, on rank 0 only
    "grid_per_class": 1,
    "val_interval": 1,
    "ckpt_interval": 1,
    "num_workers": 0,
    "num_inference_steps": 2,
    "num_per_class": NUM_PER_CLASS,
    "sample_batch_size": 4,
    "calibration_quantile": 0.2,
    "privacy_spaces": "[pixel]",
}


def _torchrun(stage: str, out: Path, writes: Path) -> None:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    files = "[" + ",".join(f"'configs/{name}'" for name in STAGE_FILES[stage]) + "]"
    command = [
        torchrun, "--standalone", "--nnodes=1", "--nproc_per_node=2", str(LAUNCH), "run",
        "--config_file", files, "--bundle_root", ".", "--output_dir", str(out), "--dataset_dir", "None",
        *[f"--{key}={value}" for key, value in TINY.items()],
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(BUNDLE.parents[1]), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "WATCH_DIR": str(out.parent),
        "WRITES_DIR": str(writes),
    }
    done = subprocess.run(command, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{stage} failed under torchrun:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    rank1 = json.loads((writes / "rank1.json").read_text())
    assert rank1 == [], f"rank 1 wrote during the {stage} stage: {rank1}"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    out, writes = root / "watched" / "out", root / "writes"
    out.mkdir(parents=True)
    writes.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        for stage in STAGE_FILES:
            _torchrun(stage, out, writes)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_each_training_stage_leaves_its_final_checkpoint(ddp_run):
    assert (ddp_run / "models" / "autoencoder" / "autoencoder.pt").is_file()
    assert (ddp_run / "models" / "diffusion" / "diffusion.pt").is_file()
    assert (ddp_run / "samples" / f"samples_epoch{TINY['dit_max_epochs']:04d}.png").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_release_has_one_complete_certificate(ddp_run):
    release = ddp_run / "release"
    certificate = json.loads((release / "certificate.json").read_text())
    assert certificate["summary"]["requested"] == NUM_PER_CLASS * len(LABELS)
    with open(release / "certificate.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    released = [r for r in rows if r["passed"] == "True"]
    # every released class complete, every image written once and listed once
    assert sorted(r["condition"] for r in released) == sorted(LABELS * NUM_PER_CLASS)
    files = sorted(r["file"] for r in released)
    assert files == sorted(set(files))
    assert files == sorted(p.relative_to(release).as_posix() for p in (release / "images").iterdir())
    # candidates of both ranks, each drawn from a seed no other candidate used
    draws = [(r["seed"], r["batch_index"]) for r in rows]
    assert len(draws) == len(set(draws))
    assert min(int(r["seed"]) for r in rows) == 0 and max(int(r["seed"]) for r in rows) >= len(LABELS)
    assert not list(ddp_run.glob(".release*"))  # nothing half-written beside the release


@pytest.mark.slow
@pytest.mark.distributed
def test_one_mlflow_run_per_stage(ddp_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ddp_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("breast_us_ldit")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name.split("-")[0] for r in runs) == ["sample", "train_autoencoder", "train_diffusion"]
    assert all(r.info.status == "FINISHED" for r in runs)
