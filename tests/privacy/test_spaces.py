"""PixelSpace: unit vectors whose dot product is the Pearson correlation; fail-closed on bad images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_synth.privacy.spaces import (
    DegenerateImageError,
    NonFiniteImageError,
    PixelSpace,
    PrivacySpace,
    embed_variants,
    space_distance,
)


def _blob(shape=(16, 16), centre=(6, 9), sigma=2.5) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    return torch.exp(-r2 / (2 * sigma**2))[None]


def _own_and_others(space, x: torch.Tensor, copies: torch.Tensor, n: int):
    """Each of the first ``n`` copies' distance to its own source ``x[i]``, and the other images' (``x[n:]``) nearest
    distances to those sources, over each space's variants."""
    train = space.embed(x[:n])
    others = 1.0 - (space.embed_variants(x[n:]) @ train.T).max(axis=1)
    own = 1.0 - np.stack([(space.embed_variants(copies[i : i + 1])[0] @ train[i]).max() for i in range(n)])
    return own, others


def test_is_a_privacy_space_and_returns_unit_vectors():
    space = PixelSpace(grid=16)
    assert isinstance(space, PrivacySpace)
    vec = space.embed(torch.randn(5, 1, 16, 16))
    assert vec.shape == (5, 256) and vec.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)


def test_distance_is_one_minus_pearson_correlation():
    x = torch.randn(2, 1, 16, 16)
    vec = PixelSpace(grid=16).embed(x)
    pearson = np.corrcoef(x[0].flatten().numpy(), x[1].flatten().numpy())[0, 1]
    assert space_distance(vec[:1], vec[1:])[0, 0] == pytest.approx(1 - pearson, abs=1e-5)


def test_intensity_gain_and_offset_do_not_change_the_vector():
    x = torch.randn(1, 1, 32, 32)
    space = PixelSpace(grid=16)
    assert space_distance(space.embed(x), space.embed(3.0 * x - 0.7))[0, 0] < 1e-5


def test_images_of_any_size_are_resampled_to_the_grid():
    x = _blob((32, 32), centre=(12, 18), sigma=5)[None]
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="area")
    space = PixelSpace(grid=16)
    assert space_distance(space.embed(x), space.embed(small))[0, 0] < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_images_are_refused(bad):
    x = torch.randn(3, 1, 16, 16)
    x[1, 0, 4, 4] = bad
    with pytest.raises(NonFiniteImageError, match=r"\[1\]"):
        PixelSpace(grid=16).embed(x)


def test_constant_images_are_refused():
    with pytest.raises(DegenerateImageError):
        PixelSpace(grid=8).embed(torch.full((1, 1, 16, 16), 0.3))


def test_fingerprint_tracks_every_setting():
    base = PixelSpace(grid=16).fingerprint()
    assert base == PixelSpace(grid=16).fingerprint()
    others = {
        PixelSpace(grid=8).fingerprint(),
        PixelSpace(grid=16, spatial_dims=3).fingerprint(),
        PixelSpace(grid=16, invariances=("flip",)).fingerprint(),
        PixelSpace(grid=16, invariances=("shift",), max_shift=1).fingerprint(),
        PixelSpace(grid=16, invariances=("shift",), max_shift=2).fingerprint(),
    }
    assert base not in others and len(others) == 5


def test_flip_variants_contain_the_unflipped_image():
    x = _blob()[None]
    plain, inv = PixelSpace(grid=16), PixelSpace(grid=16, invariances=("flip",))
    flipped = torch.flip(x, dims=[-1])
    assert space_distance(plain.embed(flipped), plain.embed(x))[0, 0] > 0.3
    variants = inv.embed_variants(flipped)
    assert variants.shape == (1, 4, 256)  # identity, flip x, flip y, flip both
    assert space_distance(variants[0], inv.embed(x)).min() < 1e-5
    np.testing.assert_allclose(variants[:, 0], inv.embed(flipped), atol=1e-6)


def test_shift_variants_undo_a_small_shift():
    x, moved = _blob(centre=(7, 8))[None], _blob(centre=(9, 7))[None]
    plain, inv = PixelSpace(grid=16), PixelSpace(grid=16, invariances=("shift",), max_shift=2)
    assert inv.embed_variants(x).shape == (1, 25 + 24, 256)  # edges replicated, then wrapped around
    d_plain = space_distance(plain.embed(moved), plain.embed(x))[0, 0]
    d_inv = space_distance(inv.embed_variants(moved)[0], inv.embed(x)).min()
    assert d_plain > 0.2 and d_inv < 0.01


def test_embed_variants_falls_back_to_embed_for_spaces_without_variants():
    class Plain:
        name = "plain"

        def fingerprint(self):
            return "x"

        def embed(self, images):
            return PixelSpace(grid=8).embed(images)

    assert embed_variants(Plain(), torch.randn(2, 1, 8, 8)).shape == (2, 1, 64)


def test_3d_volumes():
    vec = PixelSpace(grid=8, spatial_dims=3, invariances=("flip",)).embed_variants(torch.randn(2, 1, 12, 12, 12))
    assert vec.shape == (2, 8, 512)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"grid": 2}, "grid"),
        ({"invariances": ("shear",)}, "unknown invariances"),
        ({"invariances": ("shift",), "max_shift": 0}, "max_shift"),
    ],
)
def test_bad_settings_fail_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PixelSpace(**kwargs)


def test_wrong_image_rank_is_explained():
    with pytest.raises(ValueError, match="spatial_dims=2"):
        PixelSpace(grid=8).embed(torch.randn(2, 16, 16))


def test_3d_transpose_catches_volumes_rotated_by_90_degrees_without_multiplying_the_shifted_variants():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 1, 16, 16, 16, generator=g)
    plain = PixelSpace(grid=8, spatial_dims=3, invariances=("flip", "shift", "invert"), max_shift=1)
    space = PixelSpace(grid=8, spatial_dims=3, invariances=("flip", "transpose", "shift", "invert"), max_shift=1)
    # 40 extra permutations with flips, each also inverted; not 6x the 8 x 27 x 2 shifted ones
    assert len(space.variant_ops) == len(plain.variant_ops) + 80 == space.embed_variants(x).shape[1]
    np.testing.assert_allclose(space.embed_variants(x)[:, 0], space.embed(x), atol=1e-6)
    for copy in (torch.rot90(x, 1, dims=(2, 3)), -x.permute(0, 1, 4, 3, 2), x.permute(0, 1, 3, 4, 2).flip(-1)):
        caught = 1.0 - np.einsum("bvd,bd->bv", space.embed_variants(copy), space.embed(x)).max(axis=1)
        missed = 1.0 - np.einsum("bvd,bd->bv", plain.embed_variants(copy), plain.embed(x)).max(axis=1)
        assert caught.max() < 1e-5 and missed.min() > 0.1
    assert space.fingerprint() != plain.fingerprint()


def test_tiles_catch_one_side_of_a_pair_squeezed_side_by_side():
    from monai_synth.privacy.partial import TileSpace

    g = torch.Generator().manual_seed(6)
    train = torch.nn.functional.avg_pool2d(torch.rand(2, 1, 64, 64, generator=g), 5, 1, 2)  # smooth, image-like
    other = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 64, 64, generator=g), 5, 1, 2)
    squeeze = lambda x: torch.nn.functional.interpolate(x, size=(64, 32), mode="area")  # noqa: E731
    pair = torch.cat([squeeze(other), squeeze(train[:1])], dim=-1)  # the training image squeezed into the right half
    space = TileSpace(grid=16)
    d = 1.0 - (space.embed_variants(pair)[0] @ space.embed(train).T).max(axis=0)
    assert d[0] < 0.02 < d[1]


def _body_volume(side: int = 32, seed: int = 0) -> torch.Tensor:
    """Bright blobs at random places inside a ball on a zero background: rotating it loses nothing at the corners."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(side, dtype=torch.float32) - (side - 1) / 2] * 3, indexing="ij")
    x = (sum(c**2 for c in grids) < (0.42 * side) ** 2).float()
    for _ in range(6):
        centre = (torch.rand(3, generator=g) - 0.5) * 0.5 * side
        x = x + 2.0 * torch.exp(-sum((c - m) ** 2 for c, m in zip(grids, centre)) / (2 * (0.1 * side) ** 2))
    return x[None, None]


def _canvas(volumes: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Three volumes in corners of a canvas three times their size in-plane, the fourth in its centre."""
    n0, n1, n2 = volumes.shape[2:]
    out = torch.zeros(1, 1, 3 * n0, 3 * n1, n2)
    for v, (i, j) in zip(volumes, [(0, 0), (2, 0), (0, 2), (1, 1)]):
        out[0, :, i * n0 : (i + 1) * n0, j * n1 : (j + 1) * n1] = v
    return out if size == tuple(out.shape[2:]) else torch.nn.functional.interpolate(out, size=size, mode="area")


def test_3d_tiles_catch_a_canvas_of_training_volumes_squeezed_to_the_model_size():
    # laid out in-plane and squeezed back to 32^3, each training volume fills a third of two axes and all of the
    # third: no cube window holds it (0.35-0.37 from its source, other volumes 0.14-0.29)
    from monai_synth.privacy.factory import make_space

    vols = torch.cat([_body_volume(seed=s) for s in range(8)])
    canvas = _canvas(vols[:4], (32, 32, 32))
    space = make_space("tiles", 3, (32, 32, 32))
    train = space.embed(vols[:3])
    copies = 1.0 - (space.embed_variants(canvas)[0] @ train.T).max(axis=0)
    others = 1.0 - (space.embed_variants(vols[4:]) @ train.T).max(axis=1)
    assert copies.max() < 0.2 * others.min()


def test_3d_tiles_judge_a_larger_candidate_with_windows_of_the_training_volumes_shape():
    # training volumes of 32 x 32 x 16 on the index; a canvas holding two of them bit-exact. Cubes of the shortest
    # side (16) never hold a whole volume: 0.25-0.28 from the sources, other volumes 0.17-0.35
    from monai_synth.privacy.factory import make_space

    vols = torch.nn.functional.interpolate(
        torch.cat([_body_volume(seed=s) for s in range(6)]), (32, 32, 16), mode="area"
    )
    canvas = _canvas(vols[[0, 1, 4, 5]], (96, 96, 16))
    space = make_space("tiles", 3, (32, 32, 16))
    train = space.embed(vols[:2])
    copies = 1.0 - (space.embed_variants(canvas)[0] @ train.T).max(axis=0)
    others = 1.0 - (space.embed_variants(vols[2:4]) @ train.T).max(axis=1)
    assert copies.max() < 1e-5 and others.min() > 0.1


def test_3d_shift_on_a_background_canvas_is_undone_by_the_wrapped_shift():
    # anatomy up to two cells from the far edge: shifted two cells on a background canvas, the replicated edge puts
    # anatomy where the original had background; wrapping the vacated cells around restores the background exactly
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(1, 1, 16, 16, 16)
    x[:, :, :14] = 1.0 + torch.rand(1, 1, 14, 16, 16, generator=g)
    moved = torch.zeros_like(x)
    moved[:, :, 2:] = x[:, :, :14]
    space = PixelSpace(grid=16, spatial_dims=3, invariances=("shift",), max_shift=2)
    d = 1.0 - space.embed_variants(moved)[0] @ space.embed(x)[0]
    edge_only = d[[k for k, op in enumerate(space.variant_ops) if op[5] == "edge"]]
    assert d.min() < 1e-5 < 0.01 < edge_only.min()
    assert len(space.variant_ops) == space.embed_variants(moved).shape[1] == 125 + 124


@pytest.mark.parametrize("plane", [(2, 3), (2, 4), (3, 4)])
def test_3d_rotations_about_every_axis_are_compared(plane):
    from scipy import ndimage

    x = _body_volume()
    turned = torch.as_tensor(ndimage.rotate(x[0, 0].numpy(), 20.0, axes=(plane[0] - 2, plane[1] - 2), reshape=False))
    turned = turned[None, None].float()
    plain = PixelSpace(grid=16, spatial_dims=3)
    space = PixelSpace(grid=16, spatial_dims=3, invariances=("rotate",), rotations=(-20.0, 20.0))
    assert len(space.variant_ops) == 1 + 3 * 2 == space.embed_variants(x).shape[1]
    missed = 1.0 - float(plain.embed(turned)[0] @ plain.embed(x)[0])
    caught = 1.0 - float((space.embed_variants(turned)[0] @ space.embed(x)[0]).max())
    assert caught < 0.2 * missed and caught < 0.01


def test_3d_zoom_within_one_plane_undoes_an_in_plane_border():
    x = _body_volume(seed=1)
    framed = torch.nn.functional.pad(x, (0, 0, 4, 4, 4, 4))  # 4-voxel border in the first two axes only
    framed = torch.nn.functional.interpolate(framed, size=(32, 32, 32), mode="trilinear", align_corners=False)
    iso = PixelSpace(grid=16, spatial_dims=3, invariances=("zoom",), zooms=(1.25,))
    assert len(iso.variant_ops) == 2 + 3 + 1  # on the grid with every shift; alone within each plane; alone, whole
    d = 1.0 - iso.embed_variants(framed)[0] @ iso.embed(x)[0]
    isotropic, planar = d[1], d[2:5].min()
    assert planar < 0.3 * isotropic and planar < 0.01


def test_3d_default_space_catches_an_in_plane_border_on_ct_phantoms():
    # CT phantom volumes of different patients correlate at about 0.98: a border padded in-plane and resized back,
    # zoomed back on the coarse grid, stayed farther from its source than the nearest other patient
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space

    cohort = generate_cohort("ct", n_patients=8, images_per_patient=1, spatial_dims=3, spatial_size=32, seed=0)
    vols = torch.stack([torch.as_tensor(r["image"]).clamp(-1000.0, 1000.0) for r in cohort])
    framed = torch.nn.functional.pad(vols[:2], (0, 0, 2, 2, 2, 2), value=-1000.0)  # 2 voxels in the first two axes
    framed = torch.nn.functional.interpolate(framed, size=(32, 32, 32), mode="area")
    space = make_space("pixel", 3, (32, 32, 32))
    train = space.embed(vols)
    others = 1.0 - (space.embed_variants(vols[2:]) @ train[:2].T).max(axis=1)  # other patients vs the two sources
    copies = 1.0 - np.stack([space.embed_variants(framed)[i] @ train[i] for i in range(2)]).max(axis=1)
    assert copies.max() < 0.8 * others.min()


def test_3d_default_space_catches_a_mirrored_copy_moved_a_little():
    # mirror + gamma 0.7 + a 2-voxel shift: the 3D flips were compared unshifted only, which left such copies of CT
    # phantoms at 0.03-0.11 from their sources, as far as the nearest other patient (0.032)
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space

    cohort = generate_cohort("ct", n_patients=8, images_per_patient=1, spatial_dims=3, spatial_size=32, seed=0)
    vols = torch.stack([torch.as_tensor(r["image"]).clamp(-1000.0, 1000.0) for r in cohort]).float()
    unit = (vols + 1000.0) / 2000.0
    mirrored = (-1000.0 + 2000.0 * unit**0.7).flip(2)
    moved = torch.full_like(mirrored, -1000.0)
    moved[..., 2:, :] = mirrored[..., :-2, :]
    space = make_space("pixel", 3, (32, 32, 32))
    train = space.embed(vols[:4])
    others = 1.0 - (space.embed_variants(vols[4:]) @ train.T).max(axis=1)
    copies = 1.0 - np.stack([(space.embed_variants(moved[i : i + 1])[0] @ train[i]).max() for i in range(4)])
    assert copies.max() < 0.3 * others.min()


def test_3d_crops_space_catches_a_copy_rotated_cropped_and_speckled():
    # rotation 10 deg, crop to 85% and resize, speckle sd 0.3: the crops space matched the crop but not the rotation,
    # which left such CT phantom copies at 0.679-0.688, the nearest other patient at 0.684 (1 - r / 3: r 0.94-0.96)
    import torch.nn.functional as F
    from scipy import ndimage

    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space

    cohort = generate_cohort("ct", n_patients=8, images_per_patient=1, spatial_dims=3, spatial_size=32, seed=0)
    vols = torch.stack([torch.as_tensor(r["image"]).clamp(-1000.0, 1000.0) for r in cohort]).float()
    g = torch.Generator().manual_seed(0)
    copies = []
    for v in vols[:4]:
        turned = ndimage.rotate(v[0].numpy(), 10.0, axes=(0, 1), reshape=False, order=1, mode="constant", cval=-1000.0)
        c = F.interpolate(torch.as_tensor(turned)[2:30, 2:30, 2:30][None, None], size=(32, 32, 32), mode="trilinear")
        copies.append(-1000.0 + (c[0] + 1000.0) * (1.0 + 0.3 * torch.randn(c[0].shape, generator=g)).clamp_min(0))
    copies = torch.stack(copies)
    space = make_space("crops", 3, (32, 32, 32))
    train = space.embed(vols[:4])
    others = 1.0 - (space.embed_variants(vols[4:]) @ train.T).max(axis=1)
    caught = 1.0 - np.stack([(space.embed_variants(copies[i : i + 1])[0] @ train[i]).max() for i in range(4)])
    assert caught.max() < others.min()


def test_2d_rotations_are_resampled_on_the_fine_grid():
    # rotated on the 16-cell grid itself, bilinear blur left a 20-degree copy of an ultrasound phantom at 0.10-0.23,
    # close to the nearest other patient (0.25); rotated at twice the grid, then reduced, it is at 0.05-0.14
    from scipy import ndimage

    from monai_synth.data.phantoms import generate_cohort

    cohort = generate_cohort("us", n_patients=8, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(r["image"]) for r in cohort]).float()
    turned = [ndimage.rotate(v[0].numpy(), 20.0, reshape=False, order=1, mode="constant", cval=0.0) for v in x[:4]]
    turned = torch.as_tensor(np.stack(turned))[:, None]
    # the default 2D pixel space leaves rotations to the disc space; asked for, they are resampled finely
    invariances = ("flip", "transpose", "shift", "zoom", "rotate", "invert")
    space = PixelSpace(
        grid=16, invariances=invariances, zooms=(0.7, 0.8, 0.9, 1.1, 1.25, 1.4), rotations=(-20, -10, 10, 20)
    )
    train = space.embed(x[:4])
    others = 1.0 - (space.embed_variants(x[4:]) @ train.T).max(axis=1)
    copies = 1.0 - np.stack([(space.embed_variants(turned)[i] @ train[i]).max() for i in range(4)])
    assert copies.max() < 0.7 * others.min()
    assert space.embed_variants(x[:1])[0, 0] == pytest.approx(train[0], abs=1e-6)  # variant 0 is the plain vector


def test_default_2d_pixel_space_undoes_a_gamma_curve():
    # Pearson correlation ignores gain and offset, not gamma: a PET copy with gamma 0.5 on its own range sat 0.08 from
    # its source, three times the nearest other patient, and passed the whole 2D gate 5/5; the power 2 undoes it
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space

    cohort = generate_cohort("pet", n_patients=10, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(r["image"]) for r in cohort]).float()
    lo, hi = x[:4].amin(dim=(1, 2, 3), keepdim=True), x[:4].amax(dim=(1, 2, 3), keepdim=True)
    copies = lo + ((x[:4] - lo) / (hi - lo)) ** 0.5 * (hi - lo)
    space = make_space("pixel", 2, (64, 64))
    assert space.gammas == (0.5, 0.7, 1.4, 2.0) and len(space.variant_ops) == space.embed_variants(x[:1]).shape[1]
    own, others = _own_and_others(space, x, copies, 4)
    assert own.max() < 0.1 * others.min()
    plain = PixelSpace(grid=16, invariances=space.invariances, zooms=space.zooms[1:])
    assert plain.fingerprint() != space.fingerprint()


def test_default_2d_pixel_space_undoes_gamma_on_a_mirrored_copy_moved_on_its_background():
    # PET slices in model space (hot spots saturated), mirrored, gamma 0.7, moved 4 px with background filled in: with
    # the powers 0.5 and 2 only, and the moved powers' vacated cells copied from the edge, they stayed 0.02-0.04 from
    # their sources (the nearest other patient 0.05) and passed the 2D gate in 39% of 200 holdout draws
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("pet")
    cohort = generate_cohort("pet", n_patients=12, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])
    lo = x[:6].amin(dim=(1, 2, 3), keepdim=True)
    unit = (x[:6] - lo) / (x[:6].amax(dim=(1, 2, 3), keepdim=True) - lo)
    mirrored = lo + unit.flip(2) ** 0.7 * (x[:6].amax(dim=(1, 2, 3), keepdim=True) - lo)
    moved = lo.expand_as(mirrored).clone()
    moved[..., 4:] = mirrored[..., :-4]
    space = make_space("pixel", 2, (64, 64))
    own, others = _own_and_others(space, x, moved, 6)
    assert own.max() < 0.3 * others.min()


def test_default_3d_pixel_space_undoes_gamma_curves_also_on_a_mirrored_moved_copy():
    # PET volumes with gamma 0.5 sat 0.095 from their sources, mirrored + gamma 0.7 + moved 2 voxels 0.036, the nearest
    # other patient 0.023: both passed the whole 3D gate 2/2 before the 3D pixel space tried gammas
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space

    cohort = generate_cohort("pet", n_patients=12, images_per_patient=1, spatial_dims=3, spatial_size=32, seed=0)
    x = torch.stack([torch.as_tensor(r["image"]) for r in cohort]).float()
    lo, hi = x.amin(dim=(1, 2, 3, 4), keepdim=True), x.amax(dim=(1, 2, 3, 4), keepdim=True)

    def gamma(g: float) -> torch.Tensor:
        return lo + ((x - lo) / (hi - lo)) ** g * (hi - lo)

    mirrored = gamma(0.7).flip(2)
    moved = lo.expand_as(mirrored).clone()
    moved[..., 2:, :] = mirrored[..., :-2, :]
    space = make_space("pixel", 3, (32, 32, 32))
    assert space.gammas == (0.5, 0.7, 1.4, 2.0) and len(space.variant_ops) == space.embed_variants(x[:1]).shape[1]
    for copies, below in ((gamma(0.5), 0.05), (moved, 0.05), (gamma(0.6), 0.5)):
        own, others = _own_and_others(space, x, copies, 6)
        assert own.max() < below * others.min()


def test_default_2d_pixel_space_catches_a_copy_moved_a_quarter_of_its_side_on_its_background():
    # moved by 16 of 64 px (shifts reached 2 cells, 8 px): PET copies sat 0.26-0.38 from their sources and passed the
    # six pixel-based spaces 5/5; the wrapped shifts now reach 4 cells (the edge-filled ones stay at 2)
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("pet")
    cohort = generate_cohort("pet", n_patients=12, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])
    copies = torch.full_like(x[:6], -1.0)
    copies[..., 16:, :] = x[:6, ..., :-16, :]
    space = make_space("pixel", 2, (64, 64))
    assert space.wrap_shift == 4 and len(space.variant_ops) == space.embed_variants(x[:1]).shape[1]
    own, others = _own_and_others(space, x, copies, 6)
    assert own.max() < 0.3 * others.min()
    assert (
        PixelSpace(grid=16, invariances=space.invariances, wrap_shift=2).fingerprint()
        != PixelSpace(grid=16, invariances=space.invariances, wrap_shift=4).fingerprint()
    )


@pytest.mark.parametrize("modality, size, dims", [("pet", 64, 2), ("us", 128, 2), ("pet", 32, 3)])
def test_default_pixel_space_sees_through_salt_and_pepper_noise(modality, size, dims):
    # 5% of the pixels set to the image's minimum or maximum: PET copies sat 0.03-0.11 from their sources (the nearest
    # other patient 0.05) and passed the six pixel-based spaces 5/5; the median-filtered query finds them
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform(modality)
    cohort = generate_cohort(
        modality, n_patients=12, images_per_patient=1, spatial_dims=dims, spatial_size=size, seed=0
    )
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])
    gen = torch.Generator().manual_seed(0)
    axes = tuple(range(1, x.ndim))
    lo, hi = x[:6].amin(dim=axes, keepdim=True), x[:6].amax(dim=axes, keepdim=True)
    salt = torch.where(torch.rand(x[:6].shape, generator=gen) < 0.5, lo, hi)
    copies = torch.where(torch.rand(x[:6].shape, generator=gen) < 0.05, salt, x[:6])
    space = make_space("pixel", dims, (size,) * dims)
    assert space.median == 3 and len(space.variant_ops) == space.embed_variants(x[:1]).shape[1]
    own, others = _own_and_others(space, x, copies, 6)
    assert own.max() < 0.3 * others.min()


def test_default_2d_tiles_put_a_canvas_of_ct_slices_far_below_other_patients():
    # three CT slices in corners of a 3x canvas, squeezed to the model size: each sits in a window of a third of the
    # side, 0.02-0.03 from its source; windows of 0.8-0.9 of another patient's body outline came as close (0.023) and
    # set the threshold, so 3 of 5 such canvases passed. Those windows are the pixel space's zooms and shifts.
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space

    cohort = generate_cohort("ct", n_patients=12, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    from monai_synth.transforms.presets import intensity_transform

    x = torch.stack([torch.as_tensor(intensity_transform("ct")(r["image"])) for r in cohort]).float()  # model space
    train, others = x[:6], x[6:]
    canvas = torch.full((2, 1, 192, 192), float(x.min()))
    for k in range(2):
        canvas[k, :, :64, :64], canvas[k, :, 128:, :64], canvas[k, :, :64, 128:] = train[3 * k : 3 * k + 3]
        canvas[k, :, 64:128, 64:128] = others[k]
    squeezed = torch.nn.functional.interpolate(canvas, size=(64, 64), mode="area")
    space = make_space("tiles", 2, (64, 64))
    rows = space.embed(train)
    copies = 1.0 - (space.embed_variants(squeezed) @ rows.T).max(axis=(1, 2))
    other = 1.0 - (space.embed_variants(others) @ rows.T).max(axis=(1, 2))
    # a wide margin: six other patients here, 160 holdout images against 32 training images in the benchmark (with
    # windows of 0.8-0.9 the nearest other patient is 0.09 away here, and the copies 0.02-0.03)
    assert copies.max() < 0.25 * other.min()


@pytest.mark.parametrize("modality", ["pet", "ct"])
def test_default_inset_space_catches_a_slice_shrunk_to_80_percent_in_an_unseen_one(modality):
    # a training slice shrunk to 80% and pasted into the centre of a new patient's slice passed the whole gate (PET 3
    # of 5, CT 4 of 5): in the tiles space it sat 1.1-1.2x the nearest other patient's distance, in windows of 0.8
    # 0.04-0.12x
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import DEFAULT_SPACES, TWO_D_ONLY, make_space
    from monai_synth.transforms.presets import intensity_transform

    cohort = generate_cohort(modality, n_patients=16, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    to_model = intensity_transform(modality)
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])
    train, others = x[:8].float(), x[8:].float()
    pasted = others[:4].clone()
    pasted[..., 6:57, 6:57] = torch.nn.functional.interpolate(train[:4], size=(51, 51), mode="area")
    space = make_space("inset", 2, (64, 64))
    assert space.name == "inset" and "inset" in DEFAULT_SPACES and "inset" in TWO_D_ONLY
    rows = space.embed(train)
    copies = 1.0 - (space.embed_variants(pasted) @ rows.T).max(axis=(1, 2))
    other = 1.0 - (space.embed_variants(others) @ rows.T).max(axis=(1, 2))
    assert copies.max() < 0.3 * other.min()


def test_default_crops_space_catches_an_ultrasound_copy_moved_a_quarter_of_its_side_on_a_canvas():
    # a B-mode image has no background: moved by 16 of 64 px, a quarter of the copy is black where its source has
    # tissue, and no shift of the whole image restores it (pixel space 0.18-0.26, threshold 0.093); 2 of 3 passed the
    # whole default gate. The crop slots also hold the candidate's windows at the other corners.
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("us")
    cohort = generate_cohort("us", n_patients=30, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])
    moved = torch.full_like(x[:6], -1.0)
    moved[:3, ..., 16:, :] = x[:3, ..., :-16, :]
    moved[3:, ..., :, :-16] = x[3:6, ..., :, 16:]
    space = make_space("crops", 2, (64, 64))
    assert space.moved and space.embed_variants(x[:1]).shape[1] == 936
    train = space.embed(x[:10])
    others = 1.0 - (space.embed_variants(x[10:]) @ train.T).max(axis=1)
    own = 1.0 - np.stack([(space.embed_variants(moved[i : i + 1])[0] @ train[i]).max() for i in range(6)])
    assert own.max() < others.min() - 0.005
    from monai_synth.privacy.partial import PartSpace

    plain = PartSpace(grid=16, kind="crops")
    assert not plain.moved and plain.fingerprint() != space.fingerprint()


@pytest.mark.parametrize("modality", ["us", "ct"])
def test_default_parts_and_crops_catch_a_quadrant_pasted_elsewhere_and_rearranged_quadrants(modality):
    # a quarter of a training image pasted into another corner of a new patient's image, and a copy whose halves of
    # each axis were swapped (its quadrants moved diagonally), were released 3 of 3 by the whole default gate in
    # ultrasound and CT: the parts compared quadrants in place only, the crops' windows the neighbouring corners only
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform(modality)
    cohort = generate_cohort(modality, n_patients=30, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])
    train, new = x[:10], x[10:]
    pasted = new[:5].clone()
    pasted[..., 32:, 32:] = train[:5, ..., :32, :32]
    swapped = torch.roll(train[5:10], (32, 32), dims=(-2, -1))
    for name, floor in (("parts", 1 - 1 / 5**0.5), ("crops", 1 - 1 / 45**0.5)):
        space = make_space(name, 2, (64, 64))
        assert space.moved and space.embed_variants(x[:1]).shape[1] == {"parts": 424, "crops": 936}[name]
        rows = space.embed(train)
        others = 1.0 - (space.embed_variants(new[5:]) @ rows.T).max(axis=1)
        copies = torch.cat([pasted, swapped])
        own = 1.0 - np.stack([(space.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(10)])
        # one slot of the candidate matches its source's exactly: the space's floor, below every other patient
        assert np.allclose(own, floor, atol=1e-4) and own.max() < others.min(), (name, own, others.min())


def test_default_3d_parts_catch_an_octant_pasted_elsewhere_and_rearranged_octants():
    # the 3D analogue: CT volumes with a quarter (two octants) pasted into another corner of a new patient's volume,
    # or with the halves of the first two axes swapped, were released 2 of 2 by the whole default gate
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("ct")
    cohort = generate_cohort("ct", n_patients=14, images_per_patient=1, spatial_dims=3, spatial_size=32, seed=0)
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])
    train, new = x[:8], x[8:]
    pasted = new[:3].clone()
    pasted[..., 16:, 16:, :] = train[:3, ..., :16, :16, :]
    swapped = torch.roll(train[3:6], (16, 16), dims=(-3, -2))
    space = make_space("parts", 3, (32, 32, 32))
    assert space.moved and space.embed_variants(x[:1]).shape[1] == 144 + 2 * 56  # 8 octants x 7 other places, signed
    rows = space.embed(train)
    others = 1.0 - (space.embed_variants(new[3:]) @ rows.T).max(axis=1)
    copies = torch.cat([pasted, swapped])
    own = 1.0 - np.stack([(space.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(6)])
    assert np.allclose(own, 1 - 1 / 3, atol=1e-4) and own.max() < others.min(), (own, others.min())


def _ct_volumes(n: int) -> torch.Tensor:
    """``(n, 1, 32, 32, 32)`` CT phantom volumes of ``n`` patients in model space."""
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("ct")
    cohort = generate_cohort("ct", n_patients=n, images_per_patient=1, spatial_dims=3, spatial_size=32, seed=0)
    return torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])


def test_default_3d_crops_catch_a_90_degree_rotation_with_a_crop():
    # rot90 about one axis, then the central 80% of each side resized back: the 3D crops were rotated by up to 20
    # degrees and the pixel space compares quarter turns unzoomed, which left such CT copies 5.8-6.2x the nearest new
    # patient's distance from their sources there, and 1 of 2 passed the whole default gate
    from monai_synth.privacy.factory import make_space

    x = _ct_volumes(12)
    train, new = x[:6], x[6:]
    copies = []
    for i, axes in enumerate([(1, 2), (2, 3), (1, 3)] * 2):
        turned = torch.rot90(train[i], 1 + 2 * (i // 3), dims=axes)  # a quarter turn either way
        crop = turned[:, 3:29, 3:29, 3:29]  # 26 of 32: 81%
        copies.append(F.interpolate(crop[None], size=(32, 32, 32), mode="trilinear", align_corners=False)[0])
    copies = torch.stack(copies)
    space = make_space("crops", 3, (32, 32, 32))
    assert 90.0 in space.rotations and space.embed_variants(x[:1]).shape[1] == 8 * 16 * 9 * 2
    rows = space.embed(train)
    others = 1.0 - (space.embed_variants(new) @ rows.T).max(axis=1)
    own = 1.0 - np.stack([(space.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(6)])
    r_own, r_others = (1.0 - own) * 3.0, (1.0 - others) * 3.0  # back to Pearson r (nine crops: 1 - r / 3)
    assert r_own.min() > 0.99 and r_own.min() > r_others.max() + 0.005, (r_own, r_others.max())


def test_default_3d_halves_space_catches_a_half_quadrant_or_octant_blown_up():
    # a corner quadrant of a CT volume (half of two axes, the third whole) resized to the whole: no 3D space compared
    # corner crops (the crops are centred), and 1 of 2 such CT copies and 2 of 2 PET copies passed the whole gate
    from monai_synth.privacy.factory import DEFAULT_SPACES, THREE_D_ONLY, make_space

    x = _ct_volumes(12)
    train, new = x[:6], x[6:]
    pieces = [
        train[0][:, :16, :16, :],  # a quadrant
        train[1][:, 16:, :, 16:],  # another
        train[2][:, :, 16:, :],  # a half
        train[3][:, 16:, :16, 16:],  # an octant
        train[4][:, :16, :16, :].flip(-1),  # a mirrored quadrant
        -train[5][:, :, :, 16:],  # an inverted half
    ]
    copies = torch.stack([F.interpolate(p[None], size=(32, 32, 32), mode="trilinear")[0] for p in pieces])
    space = make_space("halves", 3, (32, 32, 32))
    assert "halves" in DEFAULT_SPACES and "halves" not in THREE_D_ONLY and space.name == "halves"
    # (flips x (halves + 4 corner fractions x 8 corners + 7 slab fractions x 3 axes centred) + 7 x 3 x 2 ends, the
    # candidate's other end + 7 x 3 centred x 2 stretches + 32 corners x 4 stretches) x signs
    assert space.embed_variants(x[:1]).shape[1] == (8 * (26 + 32 + 21) + 42 + 42 + 128) * 2
    rows = space.embed(train)
    others = 1.0 - (space.embed_variants(new) @ rows.T).max(axis=1)
    own = 1.0 - np.stack([(space.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(6)])
    slots = round((1.0 - space.distance_floor) ** -2)  # 26 halves, 32 corners, 63 slabs
    assert slots == 121
    r_own, r_others = (1.0 - own) * slots**0.5, (1.0 - others) * slots**0.5  # back to Pearson r
    assert r_own.min() > 0.99 and r_own.min() > r_others.max() + 0.005, (r_own, r_others.max())
    crops = make_space("crops", 3, (32, 32, 32))  # what caught them before: not the centred crops
    crop_rows = crops.embed(train)
    crop_others = 1.0 - (crops.embed_variants(new) @ crop_rows.T).max(axis=1)
    missed = 1.0 - np.stack([(crops.embed_variants(copies[i : i + 1])[0] @ crop_rows[i]).max() for i in range(6)])
    assert missed.min() > crop_others.min()
    with pytest.raises(DegenerateImageError):
        space.embed_variants(torch.zeros(1, 1, 32, 32, 32))


def test_default_2d_halves_space_catches_a_half_of_one_axis_stretched_to_the_whole():
    # the half of an ultrasound image along one axis, resized to the whole image: the 2D crops have corner crops of
    # half of both sides, none of one; such copies sat beyond the nearest new image in every 2D space
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("us")
    cohort = generate_cohort("us", n_patients=30, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])
    train, new = x[:10], x[10:]
    pieces = [train[0][:, 32:], train[1][:, :, :32], train[2][:, :32, 32:], train[3][:, 32:].transpose(-1, -2)]
    copies = torch.stack([F.interpolate(p[None], size=(64, 64), mode="bilinear")[0] for p in pieces])
    space = make_space("halves", 2, (64, 64))
    # (symmetries x (4 halves + 4 quadrants + 3 slab fractions x 2 axes x 3 anchors) + 18 slabs x 4 stretches) x signs
    assert space.embed_variants(x[:1]).shape[1] == (8 * 26 + 18 * 4) * 2
    rows = space.embed(train)
    others = 1.0 - (space.embed_variants(new) @ rows.T).max(axis=1)
    own = 1.0 - np.stack([(space.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(4)])
    r_own, r_others = (1.0 - own) * 26**0.5, (1.0 - others) * 26**0.5
    assert r_own.min() > 0.99 and r_own.min() > r_others.max() + 0.02, (r_own, r_others.max())


def test_default_2d_halves_space_catches_a_copy_cut_along_one_axis_and_stretched_back():
    # PET slices cut to 80% of the cranio-caudal axis and resized back lose the brain or bladder that dominate their
    # pixel correlation: 3 of 3 passed the whole gate. The slabs of 0.6-0.8 of one axis (centre, either end), the
    # candidate stretched by up to 6% about the slab's anchor, hold them
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.privacy.partial import PartSpace
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("pet")
    cohort = generate_cohort("pet", n_patients=24, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])
    train, new = x[:12], x[12:]

    def cut(img: torch.Tensor, axis: int, fraction: float, anchor: str) -> torch.Tensor:
        n = img.shape[axis + 1]
        side = int(round(n * fraction))
        start = {"low": 0, "centre": (n - side) // 2, "high": n - side}[anchor]
        piece = img.narrow(axis + 1, start, side)
        return F.interpolate(piece[None], size=(64, 64), mode="bilinear", align_corners=False)[0]

    cuts = [(1, 0.8, "centre"), (1, 0.72, "centre"), (1, 0.84, "high"), (0, 0.75, "low"), (1, 0.63, "low")]
    cuts += [(0, 0.58, "centre"), (1, 0.7, "centre")]
    copies = torch.stack([cut(train[i], *c) for i, c in enumerate(cuts)])
    copies[-1] = copies[-1].flip(-2)  # and mirrored: at a slab's fraction (the stretches are tried unturned only)
    n = len(cuts)
    space = make_space("halves", 2, (64, 64))
    assert space.slabs == (0.6, 0.7, 0.8) and space.slab_stretches == (0.94, 0.97, 1.03, 1.06)
    plain = PartSpace(grid=16, spatial_dims=2, kind="halves", invariances=space.invariances)
    assert plain.fingerprint() != space.fingerprint()
    for s, caught in ((space, True), (plain, False)):
        rows = s.embed(train)
        others = 1.0 - (s.embed_variants(new) @ rows.T).max(axis=1)
        own = 1.0 - np.stack([(s.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(n)])
        floor = s.distance_floor  # ratios above the floor, as the specificity test takes them
        ratio = (own - floor) / (others.min() - floor)
        assert (ratio.max() < 0.5) if caught else (ratio.min() > 1.0), (s.slabs, ratio)
    with pytest.raises(ValueError, match="slabs"):
        PartSpace(kind="halves", slabs=(1.0,))


def test_default_3d_halves_space_catches_a_volume_moved_along_one_axis():
    # CT and PET volumes moved by a quarter of the side (the vacated part filled with the background value) passed the
    # whole 3D gate: the 3D crops are centred. Each end slab of a training volume, against the candidate's slab of the
    # same fraction at the other end of that axis, holds a move of 0.1-0.4 of the side
    from monai_synth.privacy.factory import make_space
    from monai_synth.privacy.partial import PartSpace

    x = _ct_volumes(16)
    train, new = x[:8], x[8:]

    def moved(a: torch.Tensor, voxels: int, axis: int) -> torch.Tensor:
        out = torch.full_like(a, float(a.min()))
        n = a.shape[axis + 1]
        out.narrow(axis + 1, voxels, n - voxels).copy_(a.narrow(axis + 1, 0, n - voxels))
        return out

    moves = [(8, 0), (8, 1), (8, 2), (6, 0), (10, 1), (5, 2)]
    copies = torch.stack([moved(train[i], v, axis) for i, (v, axis) in enumerate(moves)])
    copies[0] = -copies[0]  # and inverted
    space = make_space("halves", 3, (32, 32, 32))
    plain = PartSpace(grid=16, spatial_dims=3, kind="halves", invariances=space.invariances)
    assert space.slabs == (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9) and space.slab_anchors == ("low", "centre", "high")
    for s, caught in ((space, True), (plain, False)):
        rows = s.embed(train)
        others = 1.0 - (s.embed_variants(new) @ rows.T).max(axis=1)
        own = 1.0 - np.stack([(s.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(6)])
        ratio = (own - s.distance_floor) / (others.min() - s.distance_floor)
        assert (ratio.max() < 0.05) if caught else (ratio.min() > 1.0), ratio
    with pytest.raises(ValueError, match="slab_anchors"):
        PartSpace(spatial_dims=3, kind="halves", slabs=(0.8,), slab_anchors=("middle",))


def test_default_3d_halves_space_catches_a_volume_cropped_at_a_corner_and_resized_back():
    # CT volumes cropped to 85% of every axis at a corner and resized back passed the whole 3D gate 2 of 2: the 3D crops
    # are centred and a slab holds one axis of such a copy. The corner windows of 0.6-0.9 of every axis at each of the
    # 8 corners, the candidate also magnified by up to 7% about each corner, hold copies cropped to 0.55-0.93
    from monai_synth.privacy.factory import make_space
    from monai_synth.privacy.partial import PartSpace

    x = _ct_volumes(20)
    train, new = x[:10], x[10:]

    def cornered(a: torch.Tensor, fraction: float, ends: str) -> torch.Tensor:
        side = int(round(32 * fraction))
        cut = tuple(slice(0, side) if e == "l" else slice(32 - side, 32) for e in ends)
        return F.interpolate(a[(slice(None), *cut)][None], size=(32,) * 3, mode="trilinear")[0]

    crops = [(0.85, "lll"), (0.7, "hlh"), (0.78, "lhh"), (0.93, "hhl"), (0.64, "llh"), (0.55, "hhh"), (0.88, "hll")]
    copies = torch.stack([cornered(train[i], f, ends) for i, (f, ends) in enumerate(crops)])
    copies[1] = copies[1].flip(-1)  # and mirrored: at a corner's fraction (the stretches are tried unturned only)
    space = make_space("halves", 3, (32, 32, 32))
    assert space.corners == (0.6, 0.7, 0.8, 0.9) and space.corner_stretches == (0.93, 0.97, 1.03, 1.07)
    plain = PartSpace(
        grid=16, spatial_dims=3, kind="halves", invariances=space.invariances, slabs=space.slabs,
        slab_stretches=space.slab_stretches, moved_slabs=True,
    )  # fmt: skip
    assert plain.fingerprint() != space.fingerprint()
    for s, caught in ((space, True), (plain, False)):
        rows = s.embed(train)
        others = 1.0 - (s.embed_variants(new) @ rows.T).max(axis=1)
        own = 1.0 - np.stack([(s.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(len(crops))])
        ratio = (own - s.distance_floor) / (others.min() - s.distance_floor)
        assert (ratio.max() < 0.7) if caught else (ratio.min() > 1.5), ratio
    with pytest.raises(ValueError, match="corners"):
        PartSpace(spatial_dims=3, kind="halves", corners=(1.0,))


def test_default_3d_gate_catches_a_volume_cut_along_one_axis_and_stretched_back():
    # CT volumes whose central 70% of the first axis was resized back to the whole passed the whole 3D gate 2 of 2:
    # that axis's ends hold the anatomy that dominates the correlation, which no stretch of the copy brings back. The
    # halves space's centred slabs compare the cut part itself; the pixel space's 3D stretches take an axis whose ends
    # are background
    from monai_synth.privacy.factory import make_space
    from monai_synth.privacy.partial import PartSpace

    x = _ct_volumes(16)
    train, new = x[:8], x[8:]

    def stretched(a: torch.Tensor, axis: int, fraction: float) -> torch.Tensor:
        keep = int(round(32 * fraction))
        return F.interpolate(a.narrow(axis + 1, (32 - keep) // 2, keep)[None], size=(32,) * 3, mode="trilinear")[0]

    cuts = [(0, 0.7), (0, 0.8), (1, 0.65), (2, 0.9), (0, 0.6), (1, 0.75)]
    copies = torch.stack([stretched(train[i], axis, f) for i, (axis, f) in enumerate(cuts)])
    copies[4] = copies[4].flip(-1)  # and mirrored
    space = make_space("halves", 3, (32, 32, 32))
    ends_only = PartSpace(
        grid=16, spatial_dims=3, kind="halves", invariances=space.invariances, slabs=space.slabs,
        slab_anchors=("low", "high"), moved_slabs=True,
    )  # fmt: skip
    assert space.slab_stretches == (0.97, 1.03) and ends_only.fingerprint() != space.fingerprint()
    for s, caught in ((space, True), (ends_only, False)):
        rows = s.embed(train)
        others = 1.0 - (s.embed_variants(new) @ rows.T).max(axis=1)
        own = 1.0 - np.stack([(s.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(6)])
        ratio = (own - s.distance_floor) / (others.min() - s.distance_floor)
        if caught:
            assert ratio.max() < 0.5, ratio
        else:  # the first axis's cuts: the moved end slabs hold no stretched copy
            assert ratio[[0, 1, 4]].min() > 1.0, ratio
    pixel = make_space("pixel", 3, (32, 32, 32))
    assert pixel.stretches == (0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 1.1, 1.2, 1.3, 1.4)
    unstretched = PixelSpace(
        grid=pixel.grid, spatial_dims=3, invariances=pixel.invariances, zooms=pixel.zooms, plane_zooms=pixel.plane_zooms
    )
    rows = pixel.embed(train[2:3])
    best = int(np.argmax(pixel.embed_variants(copies[2:3])[0] @ rows[0]))
    assert pixel.variant_ops[best][-1] == ("stretch", 1, 0.65)
    assert (1.0 - pixel.embed_variants(copies[2:3])[0] @ rows[0]).min() < 0.2 * (
        1.0 - unstretched.embed_variants(copies[2:3])[0] @ unstretched.embed(train[2:3])[0]
    ).min()


def test_default_2d_pixel_space_undoes_a_shear_along_either_axis():
    # CT slices sheared by 0.15 about the centre sat 0.029-0.080 from their sources (holdout minimum 0.019) and all
    # passed the whole default gate; shears of +-0.1 and +-0.2 along each axis bring them within a third of the others
    from scipy import ndimage

    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("ct")
    cohort = generate_cohort("ct", n_patients=12, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])

    def sheared(img: torch.Tensor, k: float, axis: int) -> torch.Tensor:
        m = np.eye(2)
        m[1 - axis, axis] = k
        centre = (np.asarray(img.shape[1:]) - 1) / 2.0
        a = ndimage.affine_transform(img[0].numpy(), m, offset=centre - m @ centre, order=1, cval=float(img.min()))
        return torch.as_tensor(a)[None].float()

    space = make_space("pixel", 2, (64, 64))
    assert space.shears == (-0.2, -0.1, 0.1, 0.2)
    assert len(space.variant_ops) == space.embed_variants(x[:1]).shape[1]
    plain = PixelSpace(grid=16, invariances=space.invariances, **{k: getattr(space, k) for k in ("zooms", "gammas")})
    for k, axis in [(0.15, 0), (-0.15, 1)]:
        copies = torch.stack([sheared(x[i], k, axis) for i in range(6)])
        own, others = _own_and_others(space, x, copies, 6)
        assert own.max() < 0.5 * others.min(), (k, axis, own, others.min())
        without, _ = _own_and_others(plain, x, copies, 6)
        assert without.max() > own.max()
    assert plain.fingerprint() != space.fingerprint()
    with pytest.raises(ValueError, match="shear"):
        PixelSpace(grid=8, spatial_dims=3, shears=(0.1,))


def test_default_2d_pixel_space_undoes_a_stretch_of_either_axis():
    # MRI slices whose central 80% of one axis was resized back to the whole sat 0.061-0.064 from their sources (new
    # patients' from 0.040) and all passed the whole default gate; stretches of 0.8-1.25 per axis bring them close
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("mri")
    cohort = generate_cohort("mri", n_patients=12, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])
    x = x.float().reshape(-1, 1, 64, 64)

    def stretched(img: torch.Tensor, axis: int) -> torch.Tensor:
        window = [slice(None)] * 3
        window[1 + axis] = slice(6, 57)  # the central 51 of 64 pixels
        return F.interpolate(img[tuple(window)][None], size=(64, 64), mode="bilinear", align_corners=False)[0]

    space = make_space("pixel", 2, (64, 64))
    assert space.stretches == (0.8, 0.9, 1.1, 1.25)
    assert len(space.variant_ops) == space.embed_variants(x[:1]).shape[1]
    plain = PixelSpace(grid=16, **{k: getattr(space, k) for k in ("invariances", "zooms", "gammas", "shears")})
    rows = space.embed(x[:1])
    for axis in (0, 1):
        copies = torch.stack([stretched(x[i], axis) for i in range(6)])
        own, others = _own_and_others(space, x, copies, 6)
        assert own.max() < 0.5 * others.min(), (axis, own, others.min())
        without, _ = _own_and_others(plain, x, copies, 6)
        assert without.max() > 2 * own.max()
        # the variant that undoes it is labelled with the axis it stretches
        best = int(np.argmax(space.embed_variants(copies[:1])[0] @ rows[0]))
        assert space.variant_ops[best][-1] == ("stretch", axis, 0.8)
    assert plain.fingerprint() != space.fingerprint()
    with pytest.raises(ValueError, match="stretch"):
        PixelSpace(grid=8, spatial_dims=3, stretches=(3.0,))


def _pet_slices_pasted_into_others_in_default_2d_tiles(start: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Default 2D ``tiles`` distances of 3 PET training slices shrunk to ``side`` px and pasted at ``start`` px (both
    axes) into other patients' slices, each from its own source, and of 6 other patients' slices from the nearest
    training slice."""
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import make_space
    from monai_synth.transforms.presets import intensity_transform

    cohort = generate_cohort("pet", n_patients=12, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    x = torch.stack([torch.as_tensor(intensity_transform("pet")(r["image"])) for r in cohort]).float()
    train, others = x[:6], x[6:]
    pips = others[:3].clone()
    pips[:, :, start : start + side, start : start + side] = F.interpolate(train[:3], size=(side, side), mode="area")
    space = make_space("tiles", 2, (64, 64))
    rows = space.embed(train)
    own = 1.0 - np.stack([(space.embed_variants(pips[k : k + 1])[0] @ rows[k]).max() for k in range(3)])
    other = 1.0 - (space.embed_variants(others) @ rows.T).max(axis=(1, 2))
    return own, other


def test_default_2d_tiles_catch_a_slice_shrunk_to_70_percent_inside_another_patients_slice():
    # a PET slice shrunk to 70% and pasted into the centre of an unseen patient's slice passed the whole gate 3 of 3:
    # no window of a half or a third holds it, and the pixel space's 1.4x zoom misses its position by half a pixel
    own, other = _pet_slices_pasted_into_others_in_default_2d_tiles(start=9, side=45)
    assert own.max() < 0.25 * other.min()  # 0.006-0.011 against 0.14-0.28 (without the windows of 0.7: 0.33)


def test_default_2d_tiles_catch_a_slice_shrunk_to_60_percent_off_the_windows_quarter_steps():
    # shrunk to 60% and pasted 5 px from the corner of an unseen patient's slice: between two positions of windows
    # slid by a quarter of their side, which misregister it by an eighth of its side; the finer step holds it
    own, other = _pet_slices_pasted_into_others_in_default_2d_tiles(start=5, side=38)
    assert own.max() < 0.25 * other.min(), (own, other.min())  # 0.008-0.020 against 0.14-0.25 (slid by a quarter: 0.25)


def test_tiles_fine_scales_must_be_among_the_scales():
    from monai_synth.privacy.partial import TileSpace

    with pytest.raises(ValueError, match="fine_scales"):
        TileSpace(scales=(0.5,), fine_scales=(0.6,))
