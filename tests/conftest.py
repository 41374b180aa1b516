"""Test-wide settings: small thread pool, fixed seeds, MLflow kept inside the test's temp folder."""

from __future__ import annotations

import pytest
import torch

# One thread: the networks in tests are tiny, and extra threads only add synchronisation cost.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_isolate(monkeypatch, tmp_path):
    """Fix the torch seed and point MLflow at a per-test store so no test writes to the working tree."""
    torch.manual_seed(0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
