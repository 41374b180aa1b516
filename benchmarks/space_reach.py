"""How far one privacy space alone reaches: each attack's copies against new patients' images, in that space only.

The attack benchmark measures the whole gate; when a copy passes it, this script asks which space could have caught it
and what a change to a space would do. It writes a phantom cohort (``--cohort``: training patients, new patients),
plants ``--attempts`` copies per transform of ``benchmarks/safeguard_attacks.py`` (judged through the release's
intensity views, as a candidate is), and prints per transform the largest copy distance to the nearest training image
over the new patients' 1% quantile, both taken above the space's floor (the distance a slot space cannot go below).
Below 1, that space alone catches every copy at a threshold that refuses about 1% of new patients.

``--project-out 4,16`` adds a column per count of the training rows' top principal directions projected out of every
vector (the population's shared anatomy removed, so that only what sets an image apart is compared); ``--principal
16,32`` a column per count of those directions the space is compared on instead
(:class:`~monai_synth.privacy.principal.PrincipalSpace`, as the default 2D pixel space is), with its search time.

Run: ``python benchmarks/space_reach.py --modality pet2d --space ranks --transforms exact,blend,elastic4``;
``--space embedding`` trains the learned embedding on the cohort first (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safeguard_attacks as sa  # noqa: E402
from safeguard_calibration import _copy_distances  # noqa: E402


class ProjectedOut:
    """A space whose vectors have the directions ``basis`` ``(k, d)`` (orthonormal rows) removed, then renormalised."""

    def __init__(self, space, basis: np.ndarray) -> None:
        self.space, self.basis = space, torch.from_numpy(np.ascontiguousarray(basis, dtype=np.float32))

    def __getattr__(self, name):
        return getattr(self.space, name)

    def _projected(self, v: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
        r = v - (v @ self.basis.T) @ self.basis
        return (r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()

    def embed(self, images) -> np.ndarray:
        return self._projected(self.space.embed(images))

    def embed_variants(self, images) -> np.ndarray:
        return self._projected(self.space.embed_variants(images))


def reach(args) -> None:
    from monai_synth.privacy.calibration import _neighbours, _query_batches
    from monai_synth.privacy.factory import build_spaces
    from monai_synth.privacy.index import TrainingIndex
    from monai_synth.privacy.principal import PrincipalSpace, fit_principal
    from monai_synth.privacy.spaces import distance_floor

    dims = sa.CONFIGS[args.modality][1]
    size = args.size or (64 if dims == 2 else 32)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = sa.make_cohort(args.modality, Path(tmp), size, [*args.cohort, 1], 3, args.seed)
        loaded = sa.load_model_space_cohort(cohort)  # its holdout split holds the new patients here
    train, new = loaded.train, loaded.holdout
    attacks = [a for a in sa.ATTACKS if a.applies("sampler", dims, cohort.fmt)]
    if args.transforms:
        attacks = [a for a in attacks if a.key in args.transforms]
    plants = sa.plant(
        attacks,
        [t[0].numpy() for t in train],
        [u[0].numpy() for u in loaded.unseen],
        [(1.0,) * dims] * len(train),
        args.attempts,
        dims,
        size / 64.0,
        model=True,
        seed=args.seed,
    )
    keys = np.array([p.attack.key for p in plants for _ in p.images])
    copies = torch.stack([torch.as_tensor(img, dtype=torch.float32)[None] for p in plants for img in p.images])
    t0 = time.time()
    stacked = torch.stack(list(train))
    space = build_spaces([args.space], dims, cohort.size, stacked, loaded.train_ids, loaded.train_fingerprint)[0]
    if args.principal and isinstance(space, PrincipalSpace):
        space = space.space  # the columns compare the space on all its values and on each count of directions
    _, _, directions = np.linalg.svd(space.embed(stacked), full_matrices=False)
    floor = float(np.max(distance_floor(space)))
    views = loaded.encoder.model_views
    print(f"{args.modality}, {args.space}: {len(train)} training and {len(new)} new images, {len(copies)} copies")
    columns = {}
    variants = [(f"{k} out", k, ProjectedOut(space, directions[:k]) if k else space) for k in [0, *args.project_out]]
    variants += [(f"on {k}", k, fit_principal(space, stacked, k)) for k in args.principal]
    for label, k, judged in variants:
        index = TrainingIndex.build(judged, train, loaded.train_ids, loaded.train_fingerprint, 64)
        new_d = np.asarray(_neighbours(index, _query_batches(index, new, views, 64), True)[0])
        t1 = time.time()
        copy_d = _copy_distances(index, copies, views)[0]  # a copy it cannot judge counts as caught, as the gate does
        searched = time.time() - t1
        at = 0.0 if k else floor
        q = float(np.quantile(new_d, 0.01)) - at
        columns[label] = (copy_d - at) / q
        print(
            f"  {label}: new patients' 1% quantile {q + at:.4f} (floor {at:.4f}), copies judged in {searched:.1f} s, "
            f"{time.time() - t0:.0f} s"
        )
    print("transform".ljust(20) + "".join(label.rjust(9) for label in columns))
    for key in dict.fromkeys(keys):
        print(key.ljust(20) + "".join(f"{columns[k][keys == key].max():9.2f}" for k in columns))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", default="pet2d", choices=list(sa.CONFIGS))
    p.add_argument("--space", default="pixel", help="a privacy space spec, as `monai-synth guard --spaces` takes")
    p.add_argument("--transforms", type=sa._csv_list, default=None, help="attack keys (default: all)")
    p.add_argument("--project-out", type=lambda s: [int(v) for v in sa._csv_list(s)], default=[])
    p.add_argument("--principal", type=lambda s: [int(v) for v in sa._csv_list(s)], default=[])
    p.add_argument("--cohort", type=lambda s: [int(v) for v in sa._csv_list(s)], default=[80, 60])
    p.add_argument("--attempts", type=int, default=4, help="copies per transform")
    p.add_argument("--size", type=int, default=None, help="default: 64 (2D), 32 (3D)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; 1 for runs side by side)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reach(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
