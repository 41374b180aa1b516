"""How often the ``tiles`` space's seam windows hold a pasted picture (or volume) exactly: per modality and attack,
the copies whose own window (the picture's position and size) is among the windows :func:`seam_windows` cuts.

The attack benchmark counts released copies through the whole gate; this counts the cause: a picture whose window is
found is registered to the pixel, one whose seams do not show is left to the regular window steps.

Run: ``python benchmarks/seam_windows.py --modalities ct2d,us2d,pet2d,mri2d --copies 40`` (volumes: ``ct3d``, ``mri3d``,
``pet3d``, at 32^3, with the 3D limit).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safeguard_attacks as sa  # noqa: E402

# the off-centre pictures in a picture: attack key -> (fraction of the side, place in the free margin)
PASTED = {key: sa.PASTED_PICTURES[key] for key in ("pip70_off", "pip60_off", "pip65_odd")}


def main(argv: Sequence[str] | None = None) -> int:
    from monai_synth.privacy.factory import _TILE_SEAM_SCALES, _TILE_SEAM_WINDOWS, _TILE_SEAM_WINDOWS_3D
    from monai_synth.privacy.seams import seam_windows
    from monai_synth.privacy.spaces import scaled_batch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modalities", type=sa._csv_list, default=["ct2d", "us2d", "pet2d", "mri2d"])
    p.add_argument("--copies", type=int, default=40, help="copies per attack")
    p.add_argument("--limit", type=int, default=None, help="seam windows per image (default: the factory's, 2D or 3D)")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    print(f"seam windows: sides {list(_TILE_SEAM_SCALES)}; {args.copies} copies each")
    for modality in args.modalities:
        dims = sa.CONFIGS[modality][1]
        size = 64 if dims == 2 else 32
        limit = args.limit or (_TILE_SEAM_WINDOWS if dims == 2 else _TILE_SEAM_WINDOWS_3D)
        with tempfile.TemporaryDirectory() as tmp:
            cohort = sa.make_cohort(modality, Path(tmp), size, [80, 36, 20], 3, 0)
            loaded = sa.load_model_space_cohort(cohort)
        train = [t[0].numpy() for t in loaded.train]
        unseen = [u[0].numpy() for u in loaded.unseen]
        cells = []
        for key, (frac, at) in PASTED.items():
            side = int(round(size * frac))
            start = int((size - side) * at)
            target = (slice(start, start + side),) * dims
            attack = [a for a in sa.ATTACKS if a.key == key]
            plants = sa.plant(
                attack, train, unseen, [(1.0,) * dims] * len(train), args.copies, dims, size / 64.0, True, args.seed
            )
            found, counts = 0, []
            for img in plants[0].images:
                x = scaled_batch(torch.as_tensor(img, dtype=torch.float32)[None, None], dims)[0]
                windows = seam_windows(x, _TILE_SEAM_SCALES, limit)
                counts.append(len(windows))
                found += target in windows
            cells.append(f"{key} {found}/{len(counts)} (windows {np.mean(counts):.0f})")
        print(f"{modality} (up to {limit} windows): " + ", ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
