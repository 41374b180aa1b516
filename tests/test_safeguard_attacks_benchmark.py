"""Smoke tests of ``benchmarks/safeguard_attacks.py`` at toy size: it runs, its tables parse, exact copies stay out."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "safeguard_attacks.py"
# the smallest cohort the guard accepts: its 1% threshold needs >= 100 holdout images (34 patients x 3)
TOY = ["--modalities", "us2d", "--attempts", "3", "--cohort-2d", "10,34,4", "--size", "32"]


def _module():
    spec = importlib.util.spec_from_file_location("safeguard_attacks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _parse_tables(text: str) -> list:
    return _module().parse_tables(text)


def _run(args: list[str]) -> str:
    cmd = [sys.executable, str(SCRIPT), *TOY, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_both_entry_points_print_parseable_tables_and_release_no_exact_copy(tmp_path):
    # plain correlation keeps this fast; an exact copy is at distance 0 in any space, so it must never get out
    out_json = tmp_path / "attacks.json"
    text = _run(["--transforms", "exact,mirror", "--spaces", "pixel:none", "--json", str(out_json)])
    tables = _parse_tables(text)
    assert len(tables) == 2, text  # guard, then sampler
    for table in tables:
        rows = {label: (released, attempted) for label, released, attempted in table}
        assert set(rows) == {"exact copy", "mirror", "unseen patient images (control)"}, rows
        assert rows["exact copy"] == (0, 3)
        assert rows["mirror"][1] == 3
        released, attempted = rows["unseen patient images (control)"]
        assert attempted == 12 and 0 <= released <= attempted
    assert "us2d wall time:" in text and "s/image" in text
    # the sampler path says how many spaces name one nearest training patient (one space here: 1 for every image)
    assert "spaces naming one training patient as nearest" in text and "  exact copy: 1: 3 (0)" in text
    assert "specificity level" in text and "consensus 0 of 1 spaces" in text
    saved = json.loads(out_json.read_text())
    paths = saved["results"][0]["paths"]
    assert set(paths) == {"guard", "sampler"}
    for path, table in zip(("guard", "sampler"), tables):
        assert [(r["label"], r["released"], r["attempted"]) for r in paths[path]["rows"]] == table
        exact = next(r for r in paths[path]["rows"] if r["transform"] == "exact")
        assert sum(exact["reasons"].values()) == 3  # every refusal says why


def test_gate_with_its_default_pixel_space_releases_no_exact_copy():
    tables = _parse_tables(_run(["--transforms", "exact", "--paths", "guard", "--spaces", "pixel"]))
    assert len(tables) == 1
    rows = {label: (released, attempted) for label, released, attempted in tables[0]}
    assert rows["exact copy"] == (0, 3)


def test_mri_volumes_are_judged_with_the_training_percentiles_not_refused_unjudged():
    """MRI is scaled per image: without the training images' reference every candidate was refused before judging."""
    text = _run(
        ["--modalities", "mri3d", "--paths", "sampler", "--transforms", "exact", "--spaces", "pixel:none"]
        + ["--size-3d", "16", "--cohort-3d", "8,34,4", "--attempts-3d", "2"]
    )
    rows = {label: (released, attempted) for label, released, attempted in _parse_tables(text)[0]}
    assert rows["exact copy"] == (0, 2)
    released, attempted = rows["unseen patient images (control)"]
    assert attempted == 12 and released >= 10, text


def test_every_attack_makes_a_finite_copy_that_differs_from_its_source_in_2d_and_3d():
    """An attack that silently returned its source unchanged (or NaN) would count as a caught copy in every table."""
    import numpy as np
    from scipy import ndimage

    sa = _module()
    rng = np.random.default_rng(0)
    for dims, shape, scale in ((2, (64, 64), 1.0), (3, (32, 32, 32), 0.5)):  # the benchmark's sizes
        train = [100.0 * ndimage.gaussian_filter(rng.random(shape), 2) for _ in range(3)]
        unseen = [50.0 * ndimage.gaussian_filter(rng.random(shape), 2) for _ in range(2)]
        for attack in sa.ATTACKS:
            if dims not in attack.dims or attack.key in ("exact", "x257"):
                continue
            out = np.asarray(attack.fn(train, unseen, sa.Ctx(np.random.default_rng(1), dims, scale)), dtype=float)
            assert out.ndim == dims and np.isfinite(out).all(), attack.key
            if out.shape == shape:
                assert not np.allclose(out, train[0]), f"{attack.key} returned its source unchanged"


def test_near_misses_are_ranked_above_each_space_floor():
    """A slot space's exact match scores ``1 - 1 / sqrt(R)``: a copy at 1.02 of its threshold from 0 can sit far above
    that floor, and ranking it as the nearest miss would point at the wrong space."""
    from types import SimpleNamespace

    sa = _module()
    record = SimpleNamespace(distances={"crops": 0.87, "tiles": 0.09}, thresholds={"crops": 0.852, "tiles": 0.065})
    assert sa._closest_spaces([record])[0].startswith("crops 1.02")  # from 0: the slot space looks nearest
    above = sa._closest_spaces([record], {"crops": 0.85, "tiles": 0.0})[0]
    assert above.startswith("tiles 1.38") and "crops 10.00" in above
