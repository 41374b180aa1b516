"""How a privacy space's distances move when a new patient's image is smoother than the data: false refusals ahead.

A generative model whose images are smoother than the training images (an autoencoder that drops fine speckle) is
judged against thresholds calibrated on real, unsmoothed holdout images. A space whose distances fall as an image is
smoothed then refuses more of such a model's images than of new patients' (the ``deblur`` space by design: it
sharpens the candidate to bring a blurred copy back to its source). This script writes a phantom cohort (the attack
benchmark's), smooths each unseen patient's image with a Gaussian of several widths, and prints, per space, the
nearest distance to the training set of the holdout (what calibration sees) next to the smoothed unseen images,
with the share of them below the holdout's smallest distance (about where the threshold sits).

Run: ``python benchmarks/safeguard_smoothness.py --modality us2d --size 32 --workdir /tmp/smooth`` (add ``--release
quickstart_output/release`` to see how detailed a release's images are next to real ones).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safeguard_attacks as sa  # noqa: E402


def nearest_distances(space, train: np.ndarray, queries: np.ndarray, batch: int = 8) -> np.ndarray:
    """Each query's smallest distance over its variants and every training row."""
    from monai_synth.privacy.spaces import embed_variants, space_distance

    rows = np.asarray(space.embed(train))
    out = []
    for i in range(0, len(queries), batch):
        v = embed_variants(space, queries[i : i + batch])
        out.append(space_distance(v.reshape(-1, v.shape[-1]), rows).reshape(len(v), -1).min(axis=1))
    return np.concatenate(out)


def laplacian_sd(images: np.ndarray) -> float:
    """How much fine detail (speckle, noise, edges) images keep: the mean over images of their Laplacian's SD."""
    from scipy import ndimage

    return float(np.mean([np.std(ndimage.laplace(a[0])) for a in images]))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", default="us2d", choices=[k for k, v in sa.CONFIGS.items() if v[1] == 2])
    p.add_argument("--spaces", type=sa._csv_list, default=["pixel", "tiles", "texture", "deblur", "disc"])
    p.add_argument("--sigmas", type=lambda s: [float(v) for v in sa._csv_list(s)], default=[0.0, 0.5, 0.8, 1.2])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--cohort", type=lambda s: [int(v) for v in sa._csv_list(s)], default=[80, 40, 40])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", required=True, help="where the cohort is written")
    p.add_argument(
        "--release", help="a release folder (its images/): print how detailed its images are next to real ones"
    )
    args = p.parse_args(argv)

    from scipy import ndimage

    from monai_synth.privacy.factory import make_space

    cohort = sa.make_cohort(args.modality, Path(args.workdir), args.size, args.cohort, 2, args.seed)
    data = sa.load_model_space_cohort(cohort)
    train = np.stack([t.numpy() for t in data.train])
    holdout = np.stack([t.numpy() for t in data.holdout])
    unseen = np.stack([t.numpy() for t in data.unseen])
    if args.release:
        images = sorted(p for p in (Path(args.release) / "images").iterdir() if p.is_file())
        released = np.stack([t.numpy() for t in sa._model_space(images, cohort)])
        print(
            f"fine detail (per-image SD of the Laplacian, mean): real {laplacian_sd(unseen):.3f}, "
            f"{len(released)} released {laplacian_sd(released):.3f}"
        )
    print(
        f"{args.modality} {args.size} px: {len(train)} training, {len(holdout)} holdout, {len(unseen)} unseen "
        "images; distances to the nearest training image"
    )
    print(
        f"{'space':8s} {'holdout min / 10% / median':>28s}   "
        + "   ".join(f"unseen smoothed sd {s:g} px" for s in args.sigmas)
    )
    for name in args.spaces:
        space = make_space(name, 2, (args.size, args.size))
        held = nearest_distances(space, train, holdout)
        cells = []
        for sigma in args.sigmas:
            x = unseen if sigma == 0 else ndimage.gaussian_filter(unseen, (0, 0, sigma, sigma))
            d = nearest_distances(space, train, x)
            cells.append(f"median {np.median(d):.3f}, below {100 * np.mean(d < held.min()):4.1f}%")
        lo, q10, med = held.min(), np.quantile(held, 0.1), np.median(held)
        print(f"{name:8s} {lo:8.3f} / {q10:.3f} / {med:.3f}        " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
