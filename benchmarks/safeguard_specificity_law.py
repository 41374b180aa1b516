"""How often the specificity test refuses new patients' images, per space, with the ratio law taken on the raw
distances and above each space's floor, in one run.

The test refuses an image whose nearest training patient is much nearer than the second: a new patient's image shows
a ratio ``d2 / d1`` that large with chance ``2 ** (-log(d2 / d1) / m)``, ``m`` the holdout's median ``log(d2 / d1)``
(:mod:`monai_synth.privacy.calibration`). The slot spaces (``parts``, ``crops``, ``halves``) score an exact match
``1 - 1 / sqrt(R)``, not 0 (:func:`~monai_synth.privacy.spaces.distance_floor`). This script indexes a phantom
cohort's training patients in each space, measures a holdout's and a pool of new patients' images (nearest and
second-patient distances, every variant of the space, no intensity views), fits ``m`` on the holdout both ways and
prints, per space, the share of the new images whose chance falls below each level. A calibrated law refuses about
the level's share.

Run: ``python benchmarks/safeguard_specificity_law.py --modality pet --size 64``.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from monai_synth.data.phantoms import generate_cohort
from monai_synth.privacy.calibration import _neighbours, _screen_duplicates, specificity_chance
from monai_synth.privacy.factory import make_space
from monai_synth.privacy.index import TrainingIndex
from monai_synth.privacy.spaces import distance_floor, embed_variants
from monai_synth.transforms.presets import intensity_transform

LEVELS = (0.003, 0.01, 0.05)


def _images(modality: str, patients: int, per_patient: int, size: int, seed: int, first: int):
    scale = intensity_transform(modality)
    records = generate_cohort(
        modality, patients, per_patient, spatial_size=(size, size), seed=seed, first_patient=first
    )
    images = torch.stack([torch.as_tensor(np.asarray(scale(r["image"]))) for r in records]).float()
    return images, [r["patient_id"] for r in records]


def _distances(index: TrainingIndex, images: torch.Tensor, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    batches = (embed_variants(index.space, images[i : i + batch]) for i in range(0, len(images), batch))
    d1, _, d2 = _neighbours(index, batches, True)
    return d1, d2


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", default="pet", choices=["us", "ct", "mri", "pet"])
    p.add_argument("--size", type=int, default=64, help="2D image side")
    p.add_argument("--spaces", nargs="+", default=["parts", "crops", "halves", "pixel"])
    p.add_argument("--train-patients", type=int, default=80)
    p.add_argument("--holdout-patients", type=int, default=40)
    p.add_argument("--new-patients", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    train, ids = _images(args.modality, args.train_patients, 3, args.size, args.seed, 0)
    holdout, _ = _images(args.modality, args.holdout_patients, 3, args.size, args.seed, 1000)
    new, _ = _images(args.modality, args.new_patients, 2, args.size, args.seed, 5000)
    print(
        f"{args.modality} 2D {args.size}^2: {len(train)} training images of {args.train_patients} patients, holdout "
        f"{len(holdout)}, new {len(new)}; share of new images whose chance is below each level:"
    )
    header = " | ".join(f"< {level:g}" for level in LEVELS)
    print(f"{'space':8s} | floor | law on | {header}")
    for spec in args.spaces:
        space = make_space(spec, 2, (args.size, args.size))
        index = TrainingIndex.build(space, train, ids, "law")
        h1, h2 = _distances(index, holdout)
        n1, n2 = _distances(index, new)
        floor = distance_floor(space)
        for label, f in (("raw", 0.0), ("floor", floor)) if floor else (("raw", 0.0),):
            _, screen = _screen_duplicates(h1, h2, 5.0, 0.01, f)
            chance = specificity_chance(n1, n2, screen["median_log_ratio"], f)
            shares = " | ".join(f"{np.mean(chance < level):7.2%}" for level in LEVELS)
            print(f"{space.name:8s} | {floor:.3f} | {label:6s} | {shares}", flush=True)


if __name__ == "__main__":
    main()
