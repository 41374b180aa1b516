"""Which privacy space catches which near-copy, and what a set of spaces would release, from one build.

The attack benchmark (``safeguard_attacks.py``) measures the gate as configured. Before a space's variants are cut
or changed, this script shows what each space sees: it builds every space named in ``--configs`` once (one index,
the holdout judged once through the release's intensity views), plants the attack benchmark's near-copies and the
unseen patients' images, and then, for each configuration (a list of spaces), calibrates the thresholds jointly as
:func:`~monai_synth.privacy.safeguard.build_safeguard` does and counts what that configuration would release. For
every copy some configuration releases it prints each space's distance against its threshold.

Spaces are the factory's names (``pixel``, ``disc``, ...) or these variants of the 2D spaces, for comparisons:
``pixel_rot`` (the pixel space with rotations of +-10 and +-20 degrees), ``pixel_zoom2`` (no rotations, zooms 0.7
and 1.4 only), ``pixel_gamma2`` (gammas 0.5 and 2 only, not 0.7 and 1.4), ``pixel_wrap2`` (wrapped shifts of up to 2
cells, not 4), ``pixel_nomedian`` (no median-filtered query), ``crops_unmoved`` (crop slots without the moved windows), ``disc_30`` (angles to +-30 only), ``disc_coarse`` (the disc space moved by whole cells only),
``tiles_small`` (2D windows of half and a third of the side only), ``tiles_no9`` (no windows of 0.9), ``tiles_large``
(windows of 0.9, 0.8, 0.5 and a third). The embedding space is left out (its training is most of a build; the attack
benchmark measures the whole gate).

Run: ``python benchmarks/safeguard_space_ablation.py --modality ct2d --configs
"pixel_rot,parts,crops,tiles,texture,disc_coarse" "pixel,parts,crops,tiles,texture,disc"``.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safeguard_attacks as sa  # noqa: E402

from monai_synth.privacy.safeguard import PrivacySafeguard  # noqa: E402

MARGIN = inspect.signature(PrivacySafeguard).parameters["margin"].default  # what the gate adds to every threshold


def make_named_space(name: str, spatial_size: Sequence[int]):
    """A 2D space by factory name or by one of the comparison variants above, named ``name``."""
    from monai_synth.privacy.disc import DiscSpace
    from monai_synth.privacy.factory import _PIXEL_DEFAULTS, make_space
    from monai_synth.privacy.partial import PartSpace, TileSpace
    from monai_synth.privacy.spaces import PixelSpace

    grid = min(16, *spatial_size)
    pixel = {"invariances": ("flip", "transpose", "shift", "zoom", "rotate", "invert"), "max_shift": 2}
    if name == "pixel_rot":
        space = PixelSpace(grid=grid, zooms=(0.7, 0.8, 0.9, 1.1, 1.25, 1.4), rotations=(-20, -10, 10, 20), **pixel)
    elif name == "pixel_zoom2":
        space = PixelSpace(grid=grid, zooms=(0.7, 1.4), rotations=(), gammas=(0.5, 2.0), **pixel)
    elif name == "pixel_nomedian":
        space = PixelSpace(grid=grid, **{**_PIXEL_DEFAULTS[2], "median": 0})
    elif name == "pixel_wrap2":
        space = PixelSpace(grid=grid, **{**_PIXEL_DEFAULTS[2], "wrap_shift": 2})
    elif name == "crops_unmoved":
        space = PartSpace(grid=grid, kind="crops")
    elif name == "disc_30":
        space = DiscSpace(grid=grid, wide_rotations=())
    elif name == "pixel_gamma2":
        space = PixelSpace(grid=grid, **{**_PIXEL_DEFAULTS[2], "gammas": (0.5, 2.0)})
    elif name == "disc_coarse":
        space = DiscSpace(grid=grid, max_shift=1.0, shift_step=1.0)
    elif name == "tiles_small":
        space = TileSpace(grid=grid, spatial_dims=2, scales=(0.5, 1.0 / 3.0))
    elif name == "tiles_no9":
        space = TileSpace(grid=grid, spatial_dims=2, scales=(0.8, 0.5, 1.0 / 3.0))
    elif name == "tiles_large":
        space = TileSpace(grid=grid, spatial_dims=2, scales=(0.9, 0.8, 0.5, 1.0 / 3.0))
    else:
        space = make_space(name, 2, spatial_size)
    space.name = name
    return space


def run(args) -> None:
    import torch

    from monai_synth.privacy.calibration import (
        DUPLICATE_ALPHA,
        DUPLICATE_Z,
        _calibrate,
        joint_space_quantile,
        tail_quantile,
    )
    from monai_synth.privacy.index import TrainingIndex
    from monai_synth.privacy.spaces import embed_variants

    configs = [[s for s in c.split(",") if s] for c in args.configs]
    names = list(dict.fromkeys(s for c in configs for s in c))
    work = Path(args.workdir)
    shutil.rmtree(work / "cohort", ignore_errors=True)  # written afresh (phantoms are seeded)
    cohort = sa.make_cohort(args.modality, work, args.size, args.cohort, args.images_per_patient, args.seed)
    if cohort.spatial_dims != 2:
        raise SystemExit("this ablation compares 2D spaces; pick a 2D modality")
    loaded = sa.load_model_space_cohort(cohort)
    train, holdout, unseen, encoder = loaded.train, loaded.holdout, loaded.unseen, loaded.encoder
    fp, train_ids, holdout_ids = loaded.train_fingerprint, loaded.train_ids, loaded.holdout_ids
    print(
        f"{args.modality}: train {len(train_ids)} images of {len(set(train_ids))} patients, holdout {len(holdout_ids)}, "
        f"unseen {len(unseen)}; {args.attempts} copies per transform",
        flush=True,
    )

    attacks = [a for a in sa.ATTACKS if a.key in args.transforms and a.applies("sampler", 2, cohort.fmt)]
    plants = sa.plant(
        attacks,
        [t[0].numpy() for t in train],
        [u[0].numpy() for u in unseen],
        [(1.0, 1.0)] * len(train),
        args.attempts,
        2,
        cohort.size[0] / 64.0,
        model=True,
        seed=args.seed,
    )
    groups = [(p.attack.key, p.images) for p in plants] + [(sa.CONTROL, [u[0].numpy() for u in unseen])]
    # every candidate as the release judges it: the views of the array its file would hold
    views = [
        [encoder.model_views(torch.as_tensor(img, dtype=torch.float32)[None]) for img in imgs] for _, imgs in groups
    ]

    holdout_d: dict[str, np.ndarray] = {}
    cand_d: dict[str, list[np.ndarray]] = {}
    sizes = {}
    for name in names:
        t0 = time.process_time()
        space = make_named_space(name, cohort.size)
        index = TrainingIndex.build(space, train, train_ids, fp, 64)
        _, holdout_d[name], _, _ = _calibrate(
            index,
            holdout,
            0.01,
            0.0,
            holdout_patient_ids=holdout_ids,
            holdout_vectors=None,
            views=encoder.model_views,
            batch_size=64,
            duplicate_check=False,
            duplicate_z=DUPLICATE_Z,
            duplicate_alpha=DUPLICATE_ALPHA,
            ci_level=0.95,
        )
        cand_d[name] = []
        for per_group in views:
            out = []
            for vs in per_group:
                vec = embed_variants(space, torch.stack(list(vs)))
                d, _, _ = index.nearest(vec)
                out.append(float(d[:, 0].min()))
            cand_d[name].append(np.asarray(out))
        first = embed_variants(space, train[:1])
        sizes[name] = (first.shape[1], first.shape[2])
        print(
            f"  {name}: {sizes[name][0]:,} variants x {sizes[name][1]} = {np.prod(sizes[name]):,} query floats; "
            f"holdout min {holdout_d[name].min():.4f}; {time.process_time() - t0:.0f} CPU-s",
            flush=True,
        )

    thresholds = []
    for config in configs:
        q = joint_space_quantile({n: holdout_d[n] for n in config}, 0.01, margin=MARGIN)
        thresholds.append({n: tail_quantile(np.sort(holdout_d[n]), q) for n in config})
    print("\nconfigurations (query floats = sum over spaces of variants x dim):")
    for k, (config, thr) in enumerate(zip(configs, thresholds)):
        floats = sum(int(np.prod(sizes[n])) for n in config)
        detail = ", ".join(f"{n} {t:.4f}" for n, t in thr.items())
        print(f"  [{k}] {floats:,} query floats; thresholds: {detail}")

    def released(config: list[str], thr: dict, g: int) -> np.ndarray:
        ok = np.ones(len(groups[g][1]), dtype=bool)
        for n in config:
            ok &= cand_d[n][g] >= thr[n] + MARGIN
        return ok

    print("\n| transform | " + " | ".join(f"[{k}]" for k in range(len(configs))) + " |")
    print("|---|" + "---:|" * len(configs))
    details = []
    for g, (key, imgs) in enumerate(groups):
        counts = [released(c, t, g) for c, t in zip(configs, thresholds)]
        print(f"| {key} | " + " | ".join(f"{int(c.sum())}/{len(imgs)}" for c in counts) + " |")
        # copies some configuration releases; unseen patients' images some configuration refuses
        shown = np.any(counts, axis=0) if key != sa.CONTROL else ~np.all(counts, axis=0)
        verb = "released" if key != sa.CONTROL else "refused"
        for i in np.flatnonzero(shown):
            cells = ", ".join(f"{n} {cand_d[n][g][i]:.4f}" for n in names)
            which = [k for k, c in enumerate(counts) if bool(c[i]) == (key != sa.CONTROL)]
            details.append(f"  {key} #{i} {verb} by {which}: {cells}")
    if details:
        print("\ncopies released and unseen images refused, each space's distance (thresholds above):")
        print("\n".join(details))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", default="ct2d", choices=[k for k, v in sa.CONFIGS.items() if v[1] == 2])
    p.add_argument("--configs", nargs="+", required=True, help="comma-separated space lists, one per configuration")
    p.add_argument("--transforms", type=sa._csv_list, default=sa.ATTACK_KEYS)
    p.add_argument("--attempts", type=int, default=5)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--cohort", type=lambda s: [int(v) for v in sa._csv_list(s)], default=[16, 80, 10])
    p.add_argument("--images-per-patient", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", required=True, help="where the cohort is written")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
