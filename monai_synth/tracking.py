"""MLflow tracking of bundle runs: where runs are stored, what they are called, which parameters they record.

The training stages log through MONAI's ``MLFlowHandler`` (configured in the bundle's ``common.yaml``); the release
is not an Ignite run, so :func:`log_release` records it with MLflow's client directly. All three name their runs with
:func:`run_name` and record parameters flattened by :func:`flatten_params`, so the stages of one bundle line up in
one MLflow experiment.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import mlflow
from monai.utils import path_to_sqlite_uri, path_to_uri

__all__ = ["tracking_uri", "relocate_store", "run_name", "flatten_params", "log_release"]

logger = logging.getLogger(__name__)

#: Tag of a release's MLflow run: the digest of what the release was made from (see :func:`log_release`).
RELEASE_KEY_TAG = "monai_synth.release_key"


def tracking_uri(output_dir: str | os.PathLike) -> str:
    """MLflow tracking URI: ``MLFLOW_TRACKING_URI`` when set (a server, Databricks, a shared database), else an
    embedded SQLite store ``<output_dir>/mlflow.db`` that needs no server (``mlflow ui --backend-store-uri <uri>``).

    MLflow 3 refuses the old file store, hence SQLite rather than a ``mlruns`` folder.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    db = os.path.join(os.path.abspath(output_dir), "mlflow.db")
    relocate_store(db)
    return path_to_sqlite_uri(db)


def relocate_store(db: str | os.PathLike) -> bool:
    """Point the artifact locations of a copied output folder's MLflow store at the copy's own ``mlruns``.

    MLflow stores absolute artifact URIs (``file:///<first output_dir>/mlruns/...``) in the database, so a copied
    (or moved) output folder would keep uploading artifacts into the original folder. Locations that name the
    ``mlruns`` folder next to another ``mlflow.db`` are rewritten to the ``mlruns`` next to this one; a store that
    is already in place is only read.

    Returns:
        Whether anything was rewritten.
    """
    import sqlite3

    db = Path(db).absolute()
    if not db.is_file():
        return False
    here = path_to_uri(db.parent / "mlruns")
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            locations = [row[0] for row in conn.execute("SELECT artifact_location FROM experiments")]
        except sqlite3.DatabaseError:  # not (yet) an MLflow store
            return False
    stale = {loc for loc in locations if loc and loc.endswith("/mlruns") and loc != here and loc.startswith("file:")}
    if not stale:
        return False
    with closing(sqlite3.connect(db)) as conn, conn:
        for old in stale:
            conn.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?", (here, old))
            conn.execute(
                "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE substr(artifact_uri, 1, ?) = ?",
                (here, len(old) + 1, len(old), old),
            )
    logger.info(f"MLflow store {db} was copied from {sorted(stale)}: its artifacts now go to {here}")
    return True


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


def log_release(
    settings: Mapping[str, Any],
    summary: Mapping[str, Any],
    release_dir: Any,
    grid: Any,
    fingerprints: Mapping[str, Any] | None = None,
) -> None:
    """Record a release as an MLflow run: parameters, the certificate summary as metrics, certificate + grid files.

    The run is tagged with a digest of its parameters and input ``fingerprints`` (checkpoints, training data): a
    release made again from the same inputs with the same settings (a quickstart run again) logs into that run
    instead of adding another.
    """
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
    params = dict(settings.get("params") or {})
    key = hashlib.sha256(
        json.dumps({"params": params, "inputs": dict(fingerprints or {})}, sort_keys=True, default=str).encode()
    ).hexdigest()[:32]
    same = client.search_runs([experiment_id], filter_string=f"tags.`{RELEASE_KEY_TAG}` = '{key}'", max_results=1)
    if same:
        run_id = same[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(
            experiment_id, run_name=settings.get("run_name"), tags={RELEASE_KEY_TAG: key}
        ).info.run_id
    try:
        logged = client.get_run(run_id).data.params
        params = [mlflow.entities.Param(k, v) for k, v in params.items() if k not in logged]
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
