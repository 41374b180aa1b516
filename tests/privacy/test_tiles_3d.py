"""TileSpace in 3D: training volumes laid out on a canvas and squeezed to the model size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _ct_phantoms(n: int = 8) -> torch.Tensor:
    from monai_synth.data.phantoms import generate_cohort

    cohort = generate_cohort("ct", n_patients=n, images_per_patient=1, spatial_dims=3, spatial_size=32, seed=0)
    return torch.stack([torch.as_tensor(r["image"]).clamp(-1000.0, 1000.0) for r in cohort]).float()


def test_3d_tiles_catch_a_squeezed_canvas_of_ct_phantoms():
    # three training volumes in the corners of a canvas 3x their size in-plane (another patient in its centre),
    # squeezed to 32^3: each keeps 10.67 voxels in-plane. Windows cut at whole voxels (10 or 11) misregistered it by
    # a twentieth of its side, which left such copies at 0.046-0.06 from their sources, as far as other patients
    from monai_synth.privacy.factory import make_space

    vols = _ct_phantoms()
    canvas = torch.full((1, 1, 96, 96, 32), -1000.0)
    for v, (i, j) in zip(vols[:4], [(0, 0), (2, 0), (0, 2), (1, 1)]):
        canvas[0, :, i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32] = v
    squeezed = F.interpolate(canvas, size=(32, 32, 32), mode="area")
    space = make_space("tiles", 3, (32, 32, 32))
    train = space.embed(vols[:3])
    copies = 1.0 - (space.embed_variants(squeezed)[0] @ train.T).max(axis=0)
    others = 1.0 - (space.embed_variants(vols[4:]) @ train.T).max(axis=1)
    assert copies.max() < 0.9 * others.min()


def test_3d_fraction_windows_are_cut_where_the_fraction_falls():
    from monai_synth.privacy.partial import TileSpace

    space = TileSpace(grid=8, spatial_dims=3, scales=(0.5,), invariances=(), reference=(32, 32, 32), fractions=(1 / 3,))
    windows = space.fraction_windows((32, 32, 32))
    thirds = {round(a, 3) for w in windows for a, side in w if side < 32}
    assert {0.0, round(32 / 3, 3), round(64 / 3, 3)} <= thirds  # the canvas's thirds, unrounded
    x = torch.rand(1, 1, 32, 32, 32)
    exact = space._resampled_exact(x, [((0.0, 16.0), (0.0, 32.0), (8.0, 16.0))])[0, 0]
    np.testing.assert_allclose(exact, F.interpolate(x[..., :16, :, 8:24], size=(8, 8, 8), mode="area")[0], atol=1e-5)
