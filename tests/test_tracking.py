"""MLflow tracking helpers: where runs are stored, what they are called, how parameters are recorded."""

from __future__ import annotations

import re

import torch

from monai_synth.tracking import flatten_params, run_name, tracking_uri


def test_flatten_params_records_plain_values_and_names_objects():
    params = flatten_params(
        {"stage": "sample", "net": {"depth": 2, "channels": [8, 16]}, "model": torch.nn.Linear(1, 1), "x": None}
    )
    assert params == {
        "stage": "sample",
        "net.depth": "2",
        "net.channels": "[8, 16]",
        "model": "Linear",
        "x": "None",
    }
    assert len(flatten_params({"long": "a" * 900})["long"]) == 500


def test_run_name_says_stage_modality_and_time():
    assert re.fullmatch(r"train_diffusion-US-\d{8}-\d{6}", run_name("train_diffusion", "us"))


def test_tracking_uri_prefers_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri(tmp_path) == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = tracking_uri(tmp_path / "run")
    assert uri.startswith("sqlite:///") and uri.endswith("run/mlflow.db")
    assert (tmp_path / "run").is_dir()
