"""Smoke tests of the benchmark scripts at toy sizes, so that they keep running as the code they measure changes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_dit_throughput_runs_and_splits_the_step():
    cmd = [sys.executable, str(BENCHMARKS / "dit_throughput.py"), "--presets", "tiny", "--latent", "8"]
    cmd += ["--batch", "2", "--rounds", "1", "--steps", "1", "--threads", "1", "--no-diffusers", "--no-unet", "--no-3d"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "fp32 large-matmul ceiling" in out
    split = out.split("Where a training step goes")[1]
    step, gemm, optim, other, n_gemm, floor = re.search(
        r"^ours\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\S+)", split, re.M
    ).groups()
    # A DiT training step runs matmuls (patch embedding is a conv; every linear layer is one) and an optimizer step,
    # both of which take time (printed with enough digits to be non-zero at toy size). At toy size the parts timed
    # alone are within timer noise of the whole step, so only a gross mismatch (parts far slower than the step) fails.
    assert int(n_gemm) > 0 and float(gemm) > 0 and float(optim) > 0
    assert float(floor) > 0 and float(gemm) + float(optim) < 3 * float(step)


def test_evaluation_speed_runs_every_section_at_toy_size():
    cmd = [sys.executable, str(BENCHMARKS / "evaluation_speed.py"), "--real", "40", "--synthetic", "20", "--size", "32"]
    cmd += ["--threads", "1", "--utility-steps", "3", "--reid-steps", "3", "--bootstrap", "3", "--permutations", "3"]
    cmd += ["--restoration", "denoise", "--restoration-steps", "3", "--membership"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, env=env).stdout
    for section in ("loading", "fidelity", "utility", "privacy", "restoration", "membership", "total"):
        assert re.search(rf"^{section}\s+\d+\.\d\s+\d+\.\d$", out, re.M), section  # wall and CPU seconds
    assert "20 synthetic vs 20 training + 20 holdout images" in out
    assert re.search(r"process CPU \(user \+ sys\) \d+ s", out) and "load average (1, 5, 15 min) before" in out


def test_diffusion_recipe_trains_a_laplace_autoencoder_at_toy_size(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "diffusion_recipe.py"), "--size", "16", "--patients", "10"]
    cmd += ["--ae-epochs", "1", "--likelihood", "laplace", "--ae-only", "--cache", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, env=env).stdout
    assert re.search(r'"psnr": \d', out) and list(tmp_path.glob("ae_*.pt"))
    assert re.search(r'"recon_drawn_realism": [01]', out)  # the drawn noise's worth, scored as a release is


def test_safeguard_calibration_compares_both_rules_at_toy_size(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "safeguard_calibration.py"), "--modality", "us2d", "--size", "32"]
    cmd += ["--cohort", "6,12", "--attempts", "1", "--spaces", "pixel,parts", "--draws", "5", "--holdout-patients", "6"]
    cmd += ["--quantile", "0.05", "--alphas", "0.001", "--workdir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, env=env).stdout
    rows = dict(re.findall(r"^\| (holdout[^|]*?) \| (\d+) \|", out, re.M))
    # 2 spaces at 5% want 40 samples: the 18 holdout images and all 18 training images, one patient at a time
    assert rows == {
        f"{rule}, {how}{alpha}": n
        for rule, n in (("holdout alone", "18"), ("holdout + cross-patient", "36"))
        for how in ("in sample", "leave-one-out")
        for alpha in ("", " + specific match p < 0.001")
    }
    assert not re.search(r"[(, ]exact \d", out)  # exact copies are never released
    assert re.search(r"^\| holdout alone, leave-one-out \| 18 \| 0\.\d+ \| 0\.\d+ \| ", out, re.M)


def test_safeguard_smoothness_prints_every_space_and_smoothing_lowers_deblur_distances(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "safeguard_smoothness.py"), "--modality", "us2d", "--size", "32"]
    cmd += ["--cohort", "8,6,6", "--spaces", "pixel,deblur", "--sigmas", "0,1.2", "--workdir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, env=env).stdout
    rows = {m[0]: m[1:] for m in re.findall(r"^(\w+)\s+\S+ / \S+ / \S+\s+median (\S+), .*median (\S+),", out, re.M)}
    assert set(rows) == {"pixel", "deblur"}
    # sharpening amplifies a real image's fine speckle; a smoothed image has less of it and comes nearer the training set
    assert float(rows["deblur"][1]) < float(rows["deblur"][0]) - 0.05


def test_safeguard_specificity_law_prints_both_laws_per_slot_space():
    cmd = [sys.executable, str(BENCHMARKS / "safeguard_specificity_law.py"), "--modality", "us", "--size", "32"]
    cmd += ["--train-patients", "6", "--holdout-patients", "6", "--new-patients", "5", "--spaces", "parts", "pixel"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, env=env).stdout
    rows = [[c.strip() for c in line.split("|")] for line in out.splitlines() if line.count("|") == 5]
    assert rows[0] == ["space", "floor", "law on", "< 0.003", "< 0.01", "< 0.05"]
    assert [(r[0], r[2]) for r in rows[1:]] == [("parts", "raw"), ("parts", "floor"), ("pixel", "raw")]
    assert float(rows[1][1]) == 0.553 and float(rows[3][1]) == 0.0
    assert all(0.0 <= float(v.rstrip("%")) <= 100.0 for r in rows[1:] for v in r[3:])


def test_safeguard_scaling_extrapolates_a_single_size_in_proportion_to_n():
    """One measured size is no line: the cost at a larger N is scaled with N (an upper bound), never reported as the
    smaller size's own figure."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from safeguard_scaling import extrapolate
    finally:
        sys.path.remove(str(BENCHMARKS))
    one = [{"space": "pixel", "N": 20_000, "s": 0.2}]
    assert abs(extrapolate(one, 100_000, "s")["pixel"] - 1.0) < 1e-9
    assert extrapolate(one, 20_000, "s")["pixel"] == 0.2
    two = [{"space": "disc", "N": 10_000, "s": 0.3}, {"space": "disc", "N": 20_000, "s": 0.5}]
    assert abs(extrapolate(two, 100_000, "s")["disc"] - 2.1) < 1e-9
