"""Smoke test of ``benchmarks/space_reach.py`` at toy size: it runs, an exact copy is at 0, a blurred one is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "space_reach.py"


def test_one_space_reach_puts_exact_copies_at_zero_and_projection_columns_side_by_side():
    cmd = [sys.executable, str(SCRIPT), "--modality", "us2d", "--size", "32", "--cohort", "6,10", "--attempts", "2"]
    cmd += ["--space", "pixel", "--transforms", "exact,blur", "--project-out", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in proc.stdout.splitlines()[-2:]}
    assert rows["exact"] == [0.0, 0.0]
    assert min(rows["blur"]) > 0.0
