"""Seams of a picture pasted into an image (2D) or a volume (3D), and the ``tiles`` windows cut at them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F


def _ct_slices(n: int) -> torch.Tensor:
    from monai_synth.data.phantoms import generate_cohort

    cohort = generate_cohort("ct", n_patients=n, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    return torch.stack([torch.as_tensor(r["image"]).clamp(-1000.0, 1000.0) for r in cohort]).float()


def _pasted(image: torch.Tensor, into: torch.Tensor, side: int, start: int) -> torch.Tensor:
    """``image`` ``(1, 1, H, W)`` shrunk to ``side`` pixels and pasted into ``into`` at ``start`` on both axes."""
    out = into.clone()
    out[..., start : start + side, start : start + side] = F.interpolate(image, size=(side, side), mode="area")
    return out


def test_seams_of_a_picture_pasted_off_the_window_steps_bound_its_window():
    from monai_synth.privacy.seams import seam_windows, seams

    slices = _ct_slices(2)
    copy = _pasted(slices[:1], slices[1:2], 45, 3)[0]  # 3 px from the origin: between windows of 45 px at 0 and 6
    assert 48 in seams(copy, 0) and 48 in seams(copy, 1)  # the far edges cross the other patient's body
    windows = seam_windows(copy, (0.7,), limit=64)
    assert (slice(3, 48), slice(3, 48)) in windows  # ends at the seam, 45 px long
    assert len(windows) <= 64 and seam_windows(copy, (0.7,), limit=2) == windows[:2]


def test_seam_windows_of_an_image_with_nothing_to_find_are_few_and_valid():
    from monai_synth.privacy.seams import seam_windows

    assert seam_windows(torch.zeros(1, 32, 32), (0.7, 0.5), limit=16) == []  # a flat image has no seam
    assert seam_windows(torch.rand(1, 3, 40), (0.5,), limit=4) == []  # too small for any seam
    noise = torch.rand(1, 48, 40, generator=torch.Generator().manual_seed(0))
    for y, x in seam_windows(noise, (0.8, 0.6), limit=32):
        assert 0 <= y.start < y.stop <= 48 and 0 <= x.start < x.stop <= 40


def test_tiles_catch_a_picture_pasted_off_the_window_steps_only_with_seam_windows():
    # a CT slice shrunk to 70% and pasted 3 px from the origin of another patient's slice: windows of 0.7 start at
    # 0, 6, 9, 12, 18 and 19 px, 3 px off in both axes (about a cell of the grid), where the copy sat as far from its
    # source as other patients' slices do, and passed the whole gate in every 2D modality
    from monai_synth.privacy.factory import make_space
    from monai_synth.privacy.partial import TileSpace

    slices = _ct_slices(20)
    train, new = slices[:8], slices[16:]
    copies = torch.cat([_pasted(train[i : i + 1], slices[8 + i : 9 + i], 45, 3) for i in range(8)])
    seamed = make_space("tiles", 2, (64, 64))
    assert seamed.seam_limit > 0
    settings = dict(grid=seamed.grid, scales=seamed.scales, fine_scales=seamed.fine_scales)
    plain = TileSpace(spatial_dims=2, **settings)

    def own(space) -> np.ndarray:  # each copy's distance to its own source
        return 1.0 - np.einsum("qvd,qd->qv", space.embed_variants(copies), space.embed(train)).max(axis=1)

    others = 1.0 - (seamed.embed_variants(new) @ seamed.embed(train).T).max(axis=(1, 2))
    # a seam hidden where both pictures are background cuts no window: the regular windows remain
    assert (own(seamed) < 0.25 * others.min()).sum() >= 6, (own(seamed), others.min())
    assert (own(plain) > 0.5 * others.min()).all(), (own(plain), others.min())  # the steps alone misregister all
    assert seamed.fingerprint() != plain.fingerprint()


def test_a_picture_whose_edges_show_weakly_is_windowed_by_its_four_edges_together(monkeypatch):
    # an MRI slice shrunk to 65% and pasted 8 px from the origin: the picture's edges rarely rank among each axis's
    # four strongest seams (the phantoms' own anatomy outranks them), but its four edges together rank its window early
    import monai_synth.privacy.seams as seams_module
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import _TILE_SEAM_SCALES, _TILE_SEAM_WINDOWS

    cohort = generate_cohort("mri", n_patients=24, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    slices = torch.stack([torch.as_tensor(r["image"]) for r in cohort]).float()
    copies = [_pasted(slices[i : i + 1], slices[12 + i : 13 + i], 42, 8)[0] for i in range(12)]
    target = (slice(8, 50), slice(8, 50))

    def found(limit: int) -> int:
        return sum(target in seams_module.seam_windows(c, _TILE_SEAM_SCALES, limit) for c in copies)

    assert found(_TILE_SEAM_WINDOWS) >= 9
    monkeypatch.setattr(seams_module, "PAIRED_SHARE", 0.0)  # each axis's strongest seams only
    assert found(_TILE_SEAM_WINDOWS) <= 3


def test_seam_settings_are_checked():
    from monai_synth.privacy.partial import TileSpace

    with pytest.raises(ValueError, match="seam_limit"):
        TileSpace(spatial_dims=3, scales=(0.5,), seam_limit=-1, seam_scales=(0.5,))
    with pytest.raises(ValueError, match="seam_scales"):
        TileSpace(spatial_dims=2, scales=(0.5,), seam_limit=8, seam_scales=())


def _ct_volumes(n: int) -> torch.Tensor:
    from monai_synth.data.phantoms import generate_cohort

    cohort = generate_cohort("ct", n_patients=n, images_per_patient=1, spatial_dims=3, spatial_size=32, seed=0)
    return torch.stack([torch.as_tensor(r["image"]).reshape(1, 32, 32, 32).clamp(-1000.0, 1000.0) for r in cohort])


def test_a_volume_whose_faces_show_along_one_axis_only_is_cut_at_that_axis_side():
    # the pasted volume's faces across the first axis do not rank among that axis's strongest planes (the phantom's
    # own anatomy does), but both faces show along the last: that span gives the side, and the other axes' starts are
    # where two planes that far apart score highest together
    from monai_synth.privacy.seams import seam_windows, seams

    vols = _ct_volumes(13).float()
    copy = vols[12].clone()
    copy[:, 1:23, 1:23, 1:23] = F.interpolate(vols[:1], size=(22, 22, 22), mode="area")[0]
    assert 1 not in seams(copy, 0) and 23 not in seams(copy, 0)
    assert {1, 23} <= set(seams(copy, 2))
    assert (slice(1, 23),) * 3 in seam_windows(copy, (0.7,), limit=64)


def test_tiles_catch_a_volume_pasted_a_voxel_off_the_cube_steps_only_with_seam_cubes():
    # a CT volume shrunk to 70% (22 voxels) and pasted 1 voxel from the origin of another patient's volume: the cubes
    # of 0.7 start at 0 and 3 voxels, where the copy sat 1.9-4x farther from its source than new patients' volumes from
    # theirs (the twenty-eighth round's gap); the cube cut at its seam planes registers it to the voxel
    from monai_synth.privacy.factory import make_space
    from monai_synth.privacy.partial import TileSpace
    from monai_synth.privacy.seams import seam_windows

    assert make_space("tiles", 3, (32, 32, 32)).seam_limit > 0
    vols = _ct_volumes(14).float()
    train, new = vols[:4], vols[12:]
    copies = vols[8:12].clone()
    copies[..., 1:23, 1:23, 1:23] = F.interpolate(train, size=(22, 22, 22), mode="area")
    assert sum((slice(1, 23),) * 3 in seam_windows(c, (0.7,), limit=64) for c in copies) >= 3
    settings = dict(spatial_dims=3, scales=(0.7,), fine_scales=(0.7,), invariances=())
    seamed, plain = TileSpace(seam_limit=32, seam_scales=(0.7,), **settings), TileSpace(**settings)

    def own(space) -> np.ndarray:  # each copy's distance to its own source
        return 1.0 - np.einsum("qvd,qd->qv", space.embed_variants(copies), space.embed(train)).max(axis=1)

    others = 1.0 - (seamed.embed_variants(new) @ seamed.embed(train).T).max(axis=(1, 2))
    assert (own(seamed) < 0.7 * others.min()).sum() >= 3, (own(seamed), others.min())
    assert (own(plain) > 1.5 * others.min()).all(), (own(plain), others.min())  # the steps alone misregister all
