"""MLflow tracking of bundle runs: where runs are stored, what they are called, which parameters they record.

The training stages log through MONAI's ``MLFlowHandler`` (configured in the bundle's ``common.yaml``); the release
is not an Ignite run, so :func:`log_release` records it with MLflow's client directly. All three name their runs with
:func:`run_name` and record parameters flattened by :func:`flatten_params`, so the stages of one bundle line up in
one MLflow experiment.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from monai.utils import path_to_sqlite_uri, path_to_uri

__all__ = ["tracking_uri", "run_name", "flatten_params", "log_release"]


def tracking_uri(output_dir: str | os.PathLike) -> str:
    """MLflow tracking URI: ``MLFLOW_TRACKING_URI`` when set (a server, Databricks, a shared database), else an
    embedded SQLite store ``<output_dir>/mlflow.db`` that needs no server (``mlflow ui --backend-store-uri <uri>``).

    MLflow 3 refuses the old file store, hence SQLite rather than a ``mlruns`` folder.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(os.path.join(os.path.abspath(output_dir), "mlflow.db"))


def run_name(stage: str, modality_code: str, bundle: str | None = None) -> str:
    """Run name saying what ran: ``"<stage>-<modality>-<timestamp>"``, e.g. ``"train_autoencoder-US-20250101-120000"``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parts = [stage, str(modality_code).upper()] + ([bundle] if bundle else []) + [stamp]
    return "-".join(parts)


def flatten_params(params: Mapping[str, Any], prefix: str = "", max_len: int = 500) -> dict[str, str]:
    """Flatten a nested dict of resolved config values into MLflow params (``a.b.c`` -> string, cut to ``max_len``).

    Objects that are not plain values (networks, datasets) are recorded by their class name, not their repr.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, prefix=f"{name}.", max_len=max_len))
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            text = str(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            text = json.dumps(list(value))
        elif isinstance(value, os.PathLike):
            text = os.fspath(value)
        else:
            text = type(value).__name__
        out[name] = text[:max_len]
    return out


def log_release(settings: Mapping[str, Any], summary: Mapping[str, Any], release_dir: Any, grid: Any) -> None:
    """Record a release as an MLflow run: parameters, the certificate summary as metrics, certificate + grid files."""
    client = mlflow.MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or settings["tracking_uri"])
    experiment = client.get_experiment_by_name(settings["experiment_name"])
    if experiment is None:
        uri = str(settings["tracking_uri"])
        location = None
        if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
            location = path_to_uri(Path(uri[len("sqlite:///") :]).parent / "mlruns")
        experiment_id = client.create_experiment(settings["experiment_name"], artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=settings.get("run_name"))
    run_id = run.info.run_id
    try:
        params = [mlflow.entities.Param(k, v) for k, v in dict(settings.get("params") or {}).items()]
        metrics = [
            mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
            for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        metrics += [
            mlflow.entities.Metric(f"threshold_{k}", float(v), int(time.time() * 1000), 0)
            for k, v in summary["thresholds"].items()
        ]
        client.log_batch(run_id, metrics=metrics, params=params)
        for name in ("certificate.json", "certificate.csv"):
            path = Path(release_dir) / name
            if path.is_file():
                client.log_artifact(run_id, str(path), "certificate")
        if grid:
            client.log_artifact(run_id, str(grid), "sample_grids")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
