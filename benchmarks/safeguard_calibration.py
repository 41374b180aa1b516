"""How many new patients' images the jointly calibrated gate refuses, and how many near-copies it releases, for a
holdout alone and for a holdout joined by cross-patient training samples, over many holdout draws.

One attack benchmark run measures the unseen share on 20 patients, which moves by 5% per refused image. This script
measures each space once (``--spaces``; the embedding is left out, its training is most of a build): the distances of
a pool of new patients' images (``--cohort``: training patients, pool patients), of every training image to the other
training patients (leave one patient out) and of the attack benchmark's near-copies, each judged through the release's
intensity views as a candidate is. It then draws ``--holdout-patients`` of the pool as the holdout ``--draws`` times,
calibrates the spaces jointly as :func:`~monai_synth.privacy.safeguard.build_safeguard` does, once on the holdout alone
and once with the cross-patient samples (as many as ``spaces / quantile`` wants), each both ways: leave-one-out with
the tail model (the gate's rule) and in sample (the rule before it), and counts, for each rule, the share of the rest
of the pool refused (mean and 90th percentile over draws) and the copies released per transform.

Run: ``python benchmarks/safeguard_calibration.py --modality us2d --workdir /tmp/cal``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safeguard_attacks as sa  # noqa: E402

from monai_synth.privacy.safeguard import PrivacySafeguard  # noqa: E402

MARGIN = inspect.signature(PrivacySafeguard).parameters["margin"].default


def measure(args) -> dict:
    """Per space: the pool's and the training images' cross-patient distances, and every copy's distance."""
    import torch

    from monai_synth.privacy.calibration import (
        DUPLICATE_ALPHA,
        DUPLICATE_Z,
        _cross_patient,
        _neighbours,
        _query_batches,
    )
    from monai_synth.privacy.factory import make_space
    from monai_synth.privacy.index import TrainingIndex
    from monai_synth.privacy.spaces import distance_floor

    work = Path(args.workdir)
    shutil.rmtree(work / "cohort", ignore_errors=True)
    size = args.size or (64 if sa.CONFIGS[args.modality][1] == 2 else 32)
    n_train, n_pool = args.cohort
    cohort = sa.make_cohort(args.modality, work, size, [n_train, n_pool, 1], args.images_per_patient, args.seed)
    loaded = sa.load_model_space_cohort(cohort)  # the holdout split is the pool of new patients here
    train, pool, unseen, encoder = loaded.train, loaded.holdout, loaded.unseen, loaded.encoder
    fp, train_ids, pool_ids = loaded.train_fingerprint, loaded.train_ids, loaded.holdout_ids
    dims = cohort.spatial_dims
    attacks = [a for a in sa.ATTACKS if a.applies("sampler", dims, cohort.fmt)]
    plants = sa.plant(
        attacks,
        [t[0].numpy() for t in train],
        [u[0].numpy() for u in unseen],
        [(1.0,) * dims] * len(train),
        args.attempts,
        dims,
        cohort.size[0] / 64.0,  # as the attack benchmark scales its transforms
        model=True,
        seed=args.seed,
    )
    copies = [(p.attack.key, img) for p in plants for img in p.images]
    print(
        f"{args.modality}: train {len(train_ids)} images of {n_train} patients, pool {len(pool_ids)} images of {n_pool} "
        f"patients, {len(copies)} copies",
        flush=True,
    )
    out = {
        "pool_ids": np.asarray(pool_ids),
        "train_ids": np.asarray(train_ids),
        "copy_keys": np.asarray([k for k, _ in copies]),
    }
    for name in args.spaces:
        t0 = time.process_time()
        space = make_space(name, dims, cohort.size)
        index = TrainingIndex.build(space, train, train_ids, fp, 64)
        views = encoder.model_views
        pool_d, _, pool_d2 = _neighbours(index, _query_batches(index, pool, views, 64), True)
        copy_images = torch.stack([torch.as_tensor(img, dtype=torch.float32)[None] for _, img in copies])
        copy_d, copy_d2 = _copy_distances(index, copy_images, views)
        cross = _cross_patient(index, train, len(train_ids), views, 64, (pool_d, pool_d2), DUPLICATE_Z, DUPLICATE_ALPHA)
        out[f"{name}/pool_second"], out[f"{name}/copies_second"] = pool_d2, copy_d2
        out[f"{name}/pool"], out[f"{name}/copies"] = pool_d, np.asarray(copy_d)
        out[f"{name}/cross"], out[f"{name}/flagged"] = cross.distances, cross.flagged  # every training row, in order
        out[f"{name}/floor"] = np.asarray(distance_floor(space))  # where the specificity law measures its ratios from
        print(
            f"  {name}: pool min {pool_d.min():.4f}, cross-patient min {cross.kept.min():.4f} "
            f"({int(cross.flagged.sum())} flagged), {time.process_time() - t0:.0f} CPU-s",
            flush=True,
        )
    return out


def _copy_distances(index, images, views) -> tuple[np.ndarray, np.ndarray]:
    """Each copy's nearest and other-patient distances; a copy the space cannot judge (one of its views is constant,
    say) gets distance 0, refused as the gate refuses it."""
    from monai_synth.privacy.calibration import _neighbours, _query_batches
    from monai_synth.privacy.spaces import DegenerateImageError

    try:
        d, _, d2 = _neighbours(index, _query_batches(index, images, views, 64), True)
        return np.asarray(d), np.asarray(d2)
    except DegenerateImageError:
        pass
    d, d2 = np.zeros(len(images)), np.ones(len(images))
    for i in range(len(images)):
        try:
            near, _, other = _neighbours(index, _query_batches(index, images[i : i + 1], views, 1), True)
            d[i], d2[i] = near[0], other[0]
        except DegenerateImageError:
            pass
    return d, d2


def _specificity(d1: np.ndarray, d2: np.ndarray, median_log_ratio: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """Per image, the least over spaces of the chance that a new patient's image is this much closer to its nearest
    training patient than to the next one: ``2 ** (-log(d2 / d1) / median)``, distances above each space's floor (the
    duplicate screen's TwoNN law, :func:`~monai_synth.privacy.calibration.log_distance_ratio`)."""
    from monai_synth.privacy.calibration import specificity_chance

    return np.stack([specificity_chance(*args) for args in zip(d1, d2, median_log_ratio, floors)]).min(axis=0)


def _in_sample_quantile(d: np.ndarray, quantile: float) -> float:
    """The joint per-space quantile as the twelfth round chose it: the calibration images judged by the thresholds they
    set (``np.quantile``, no tail model), ``d`` of shape ``(spaces, images)``."""
    from monai_synth.privacy.calibration import _largest_quantile_within

    def rejected(q: float) -> float:
        return float((d < np.quantile(d, q, axis=1)[:, None] + MARGIN).any(axis=0).mean())

    return _largest_quantile_within(rejected, quantile, len(d))


def compare(
    measured: dict,
    spaces: Sequence[str],
    holdout_patients: int,
    draws: int,
    quantile: float,
    seed: int,
    alphas: Sequence[float] = (),
):
    """Refused share of the rest of the pool and copies released, per rule, over ``draws`` holdout draws.

    With ``alphas``, each rule also runs with a specificity test on top: a candidate is refused as well when, in some
    space, its chance as a new patient's image (:func:`_specificity`, the law's median estimated on the holdout) is
    below alpha.
    """
    from monai_synth.privacy.calibration import (
        cross_patient_rows,
        joint_space_quantile,
        log_distance_ratio,
        tail_quantile,
        tail_scale,
    )

    def stack(part: str) -> np.ndarray:
        return np.stack([measured[f"{s}/{part}"] for s in spaces])

    pool, pool2, copies, copies2 = stack("pool"), stack("pool_second"), stack("copies"), stack("copies_second")
    cross = stack("cross")  # every training image, in row order
    floors = [float(measured.get(f"{s}/floor", 0.0)) for s in spaces]
    flagged = np.any([measured[f"{s}/flagged"] for s in spaces], axis=0)
    first_seen = {p: i for i, p in reversed(list(enumerate(measured["train_ids"].tolist())))}
    codes = np.unique([first_seen[p] for p in measured["train_ids"].tolist()], return_inverse=True)[1]
    ids, keys = measured["pool_ids"], measured["copy_keys"]
    patients = np.unique(ids)
    rng = np.random.default_rng(seed)
    results: dict[str, dict] = {}
    for _ in range(draws):
        held = np.isin(ids, rng.choice(patients, holdout_patients, replace=False))
        holdout = pool[:, held]
        wanted = max(0, math.ceil(len(spaces) / quantile - 1e-9) - holdout.shape[1])
        rows = cross_patient_rows(codes, wanted)  # the rows build_safeguard takes, less the screen's
        rules = {
            "holdout alone": holdout,
            "holdout + cross-patient": np.concatenate([holdout, cross[:, rows[~flagged[rows]]]], 1),
        }
        median = np.nanmedian(
            np.stack([log_distance_ratio(a, b, f) for a, b, f in zip(holdout, pool2[:, held], floors)]), axis=1
        )
        p_new = _specificity(pool[:, ~held], pool2[:, ~held], median, floors)
        p_copy = _specificity(copies, copies2, median, floors)
        for rule, d in [(f"{r}, {how}", d) for r, d in rules.items() for how in ("in sample", "leave-one-out")]:
            if rule.endswith("in sample"):  # the twelfth round's rule, for comparison
                thresholds = np.quantile(d, _in_sample_quantile(d, quantile), axis=1)[:, None] + MARGIN
            else:
                scales = {s: tail_scale(np.sort(v)) for s, v in zip(spaces, d)}  # as the gate does
                q = joint_space_quantile(dict(zip(spaces, d)), quantile, margin=MARGIN, tail_scales=scales)
                thresholds = [tail_quantile(np.sort(v), q, scales[s]) for s, v in zip(spaces, d)]
                thresholds = np.asarray(thresholds)[:, None] + MARGIN
            refused = (pool[:, ~held] < thresholds).any(axis=0)
            released = (copies >= thresholds).all(axis=0)
            for alpha in (None, *alphas):
                name = rule if alpha is None else f"{rule} + specific match p < {alpha:g}"
                r = results.setdefault(name, {"refused": [], "released": [], "n": d.shape[1]})
                r["refused"].append(float((refused | (p_new < alpha if alpha else False)).mean()))
                r["released"].append(released & (p_copy >= alpha if alpha else True))
    print(
        f"\n{draws} holdouts of {holdout_patients} patients ({int(held.sum())} images), quantile {quantile:g}, "
        f"spaces {', '.join(spaces)}; new patients' images refused (the rest of the pool), copies released:"
    )
    print("| rule | calibration images | new images refused, mean | 90th percentile | copies released |")
    print("|---|---:|---:|---:|---|")
    for rule, r in results.items():
        refused, released = np.asarray(r["refused"]), np.asarray(r["released"])
        per = {k: float(released[:, keys == k].mean()) for k in dict.fromkeys(keys.tolist())}
        leaks = ", ".join(f"{k} {v:.2f}" for k, v in per.items() if v > 0) or "none"
        print(
            f"| {rule} | {r['n']} | {refused.mean():.3f} | {np.quantile(refused, 0.9):.3f} | "
            f"{released.mean():.4f} of {released.shape[1]} ({leaks}) |"
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", default="us2d", choices=list(sa.CONFIGS))
    p.add_argument("--spaces", type=sa._csv_list, default=None, help="default: the 2D or 3D defaults, no embedding")
    p.add_argument("--cohort", type=lambda s: [int(v) for v in sa._csv_list(s)], default=[80, 150])
    p.add_argument("--images-per-patient", type=int, default=3)
    p.add_argument("--holdout-patients", type=int, default=36, help="as the attack benchmark's default 2D cohort")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--attempts", type=int, default=5, help="copies per transform")
    p.add_argument("--size", type=int, default=None, help="default: 64 (2D), 32 (3D)")
    p.add_argument("--quantile", type=float, default=0.01)
    p.add_argument(
        "--alphas",
        type=lambda v: [float(a) for a in sa._csv_list(v)],
        default=[0.001, 0.003],
        help="specificity levels to try on top of each rule (empty: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", required=True, help="where the cohort is written")
    args = p.parse_args(argv)
    import torch

    from monai_synth.privacy.factory import DEFAULT_SPACES, THREE_D_ONLY, TWO_D_ONLY

    torch.set_num_threads(args.threads)
    dims = sa.CONFIGS[args.modality][1]
    left_out = {"embedding"} | (THREE_D_ONLY if dims == 2 else TWO_D_ONLY)
    args.spaces = args.spaces or [s for s in DEFAULT_SPACES if s not in left_out]
    measured = measure(args)
    compare(measured, args.spaces, args.holdout_patients, args.draws, args.quantile, args.seed, args.alphas)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
