"""Test-wide settings: small thread pool, fixed seeds, MLflow kept inside the test's temp folder."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_and_isolate(monkeypatch, tmp_path):
    """Fix the torch seed and point MLflow at a per-test store so no test writes to the working tree."""
    torch.manual_seed(0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
