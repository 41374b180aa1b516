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


def _pasted(volume: torch.Tensor, into: torch.Tensor, frac: float, at: float) -> torch.Tensor:
    """``volume`` shrunk to ``frac`` of its side and pasted into ``into``, ``at`` of the free margin along every axis."""
    side = round(volume.shape[-1] * frac)
    start = int((volume.shape[-1] - side) * at)
    out = into.clone()
    sl = (slice(None), slice(None), *[slice(start, start + side)] * 3)
    out[sl] = F.interpolate(volume, size=(side,) * 3, mode="trilinear", align_corners=False)
    return out


def test_3d_tiles_catch_a_volume_shrunk_inside_another_patients():
    # a training volume shrunk to 70% in the centre of a new patient's volume, or to 60% near a corner: with cubes of
    # 0.8 and 0.5 only they sat 0.17-0.26 and 0.08-0.22 from their sources, farther than other patients' volumes (from
    # 0.048), and passed the whole 3D gate; with the windows of 0.7 and 0.6 at 0.014-0.03
    from monai_synth.privacy.factory import make_space

    vols = _ct_phantoms(10)
    space = make_space("tiles", 3, (32, 32, 32))
    train = space.embed(vols[:4])
    others = 1.0 - (space.embed_variants(vols[6:]) @ train.T).max(axis=1)
    for frac, at in [(0.7, 0.5), (0.6, 0.2)]:
        copies = torch.cat([_pasted(vols[i : i + 1], vols[4 + i % 2 : 5 + i % 2], frac, at) for i in range(4)])
        own = 1.0 - np.einsum("qvd,qd->qv", space.embed_variants(copies), train).max(axis=1)
        assert own.max() < 0.7 * others.min(), (frac, at, own, others.min())
