"""DeblurSpace: a blurred or pixelated copy, sharpened, comes back to its source; a new patient's image does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from monai_synth.privacy.deblur import DeblurSpace
from monai_synth.privacy.spaces import (
    DegenerateImageError,
    NonFiniteImageError,
    PixelSpace,
    PrivacySpace,
    embed_variants,
)


def _ct(n_train: int, n_new: int, dims: int = 2, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    from monai_synth.data.phantoms import generate_cohort

    def images(n: int, first: int) -> np.ndarray:
        cohort = generate_cohort("ct", n, 1, dims, size, seed=0, first_patient=first)
        return np.stack([r["image"] for r in cohort]).astype(np.float32)

    return images(n_train, 0), images(n_new, 1000)


def _pixelated(x: np.ndarray, factor: int) -> np.ndarray:
    t = torch.from_numpy(x)
    small = F.interpolate(t, size=[n // factor for n in x.shape[2:]], mode="area")
    return F.interpolate(small, size=x.shape[2:], mode="bilinear", align_corners=False).numpy()


def _distances(space: DeblurSpace, train: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``(queries, train)`` distances, each the smallest over the query's variants."""
    return 1.0 - (embed_variants(space, queries) @ space.embed(train).T).max(axis=1)


def test_is_the_pixel_grid_for_training_rows_and_a_sharpened_query():
    space = DeblurSpace(grid=16)
    assert isinstance(space, PrivacySpace) and space.name == "deblur"
    x = torch.rand(3, 1, 64, 64)
    plain = PixelSpace(grid=16, invariances=("flip", "transpose", "shift", "invert"), max_shift=1)
    np.testing.assert_array_equal(space.embed(x), plain.embed(x))  # one training row serves both kinds of query
    variants = space.embed_variants(x)
    # (8 symmetries x 9 shifts + 8 x 8 wrapped) x 3 sharpenings (both axes, each alone) x 2 signs
    assert variants.shape == (3, 816, 256) and len(space.variant_ops) == 816
    np.testing.assert_allclose(np.linalg.norm(variants, axis=2), 1.0, atol=1e-5)
    assert not np.allclose(variants[:, 0], plain.embed(x), atol=1e-3)  # the query is sharpened
    fingerprints = {
        space.fingerprint(),
        DeblurSpace(grid=16, sigma=0.1).fingerprint(),
        DeblurSpace(grid=16, amount=2.0).fingerprint(),
        DeblurSpace(grid=16, axes=False).fingerprint(),
        plain.fingerprint(),
    }
    assert len(fingerprints) == 5
    assert DeblurSpace(grid=16, axes=False).embed_variants(x).shape[1] == 272


def test_blurred_and_pixelated_ct_copies_are_closer_than_every_new_patient():
    # on 64 px CT slices these copies sit as close to their sources as new patients come to the training set in the
    # spaces that compare images as they are (the pixel space: blur sd 3 px 0.027-0.047, new patients from 0.019);
    # sharpened (a motion-blurred copy along its axis), the copies come back within 0.05 and the new patients stay
    # beyond 0.12
    train, new = _ct(24, 16)
    space = DeblurSpace(grid=16)
    others = _distances(space, train, new).min()
    src = np.arange(8)
    copies = {
        "blur sd 3": ndimage.gaussian_filter(train[src], (0, 0, 3, 3)),
        "box 7": ndimage.uniform_filter(train[src], (1, 1, 7, 7), mode="nearest"),
        "pixelated 4x": _pixelated(train[src], 4),
        "mirrored, blurred sd 2": ndimage.gaussian_filter(train[src, :, ::-1].copy(), (0, 0, 2, 2)),
        "motion blur 8 px": ndimage.uniform_filter1d(train[src], 8, axis=3, mode="nearest"),
    }
    for name, copy in copies.items():
        own = _distances(space, train, copy)[src, src]
        assert own.max() < 0.5 * others, (name, own.max(), others)


def test_a_blurred_ct_volume_is_closer_than_every_new_patient():
    train, new = _ct(6, 4, dims=3, size=32)
    space = DeblurSpace(grid=16, spatial_dims=3, invariances=("flip", "shift", "invert"))
    others = _distances(space, train, new).min()
    copy = ndimage.gaussian_filter(train[:3], (0, 0, 1.5, 1.5, 1.5))  # 3 px at 64 voxels
    own = _distances(space, train, copy)[np.arange(3), np.arange(3)]
    assert own.max() < 0.6 * others, (own, others)


def test_refuses_what_it_cannot_judge_and_settings_it_does_not_take():
    space = DeblurSpace(grid=8)
    with pytest.raises(DegenerateImageError):
        space.embed_variants(torch.ones(1, 1, 32, 32))
    bad = torch.rand(1, 1, 32, 32)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteImageError):
        space.embed_variants(bad)
    for kwargs in ({"sigma": 0.0}, {"sigma": 0.5}, {"amount": 0.0}, {"invariances": ("zoom",)}):
        with pytest.raises(ValueError):
            DeblurSpace(grid=8, **kwargs)


def test_a_default_space_for_images_and_volumes():
    from monai_synth.privacy.factory import DEFAULT_SPACES, THREE_D_ONLY, make_space

    assert "deblur" in DEFAULT_SPACES
    flat = make_space("deblur", 2, (64, 64))
    assert isinstance(flat, DeblurSpace) and flat.grid == 16 and "transpose" in flat.invariances
    volume = make_space("deblur", 3, (32, 32, 32))
    assert volume.spatial_dims == 3 and "transpose" not in volume.invariances
    assert volume.embed_variants(torch.rand(1, 1, 32, 32, 32)).shape[2] == 16**3
    assert volume.half_steps and not flat.half_steps  # slices are not moved by half a pixel (4 px cells)
    coarse = make_space("coarse", 3, (32, 32, 32))
    assert isinstance(coarse, DeblurSpace) and coarse.name == "coarse" and coarse.grid == 8
    assert "coarse" in DEFAULT_SPACES and "coarse" in THREE_D_ONLY
    with pytest.raises(ValueError, match="judges volumes"):
        make_space("coarse", 2, (64, 64))


def test_volumes_pixelated_to_an_eighth_of_their_side_are_caught_on_the_coarse_grid():
    # 32^3 CT volumes reduced to 8^3 (area) and brought back (trilinear, or blocks of 4 voxels) lost what the 16-cell
    # grid compares: 0.6-1.8 of the nearest new patient in the deblur space, 2.3-3.6 in the pixel space; on the
    # 8-cell grid, 0.12-0.20
    from monai_synth.privacy.factory import make_space

    train, new = _ct(8, 8, dims=3, size=32)
    src = np.arange(4)
    small = F.interpolate(torch.from_numpy(train[src]), size=(8, 8, 8), mode="area")
    copies = {
        "pixelated 4x": F.interpolate(small, size=(32, 32, 32), mode="trilinear", align_corners=False).numpy(),
        "blocks of 4": small.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4).numpy(),
    }
    for name in ("deblur", "coarse"):
        space = make_space(name, 3, (32, 32, 32))
        others = _distances(space, train, new).min()
        worst = max((_distances(space, train, c)[src, src] / others).max() for c in copies.values())
        best = min((_distances(space, train, c)[src, src] / others).min() for c in copies.values())
        assert (worst < 0.3) if name == "coarse" else (best > 0.55), (name, best, worst)


def test_volumes_moved_by_half_a_voxel_and_blurred_come_back_with_the_half_steps():
    # a box filter of even width (4 voxels) moves each voxel by half a voxel as it blurs; on 32^3 CT phantoms the
    # copies sat at 0.59-0.67 of the nearest new patient without the half steps, 0.42-0.47 with them
    train, new = _ct(8, 8, dims=3, size=32)
    src = np.arange(4)
    box = ndimage.uniform_filter(train[src], (1, 1, 4, 4, 4), mode="nearest")
    ratio = {}
    for half_steps in (False, True):
        space = DeblurSpace(grid=16, spatial_dims=3, invariances=("flip", "shift", "invert"), half_steps=half_steps)
        ratio[half_steps] = _distances(space, train, box)[src, src] / _distances(space, train, new).min()
    assert ratio[True].max() < 0.5 and ratio[False].min() > 0.55, ratio


def test_half_steps_are_the_sharpened_query_moved_by_half_a_sample_once_per_sign():
    x = torch.rand(2, 1, 16, 16, 16)
    plain = DeblurSpace(grid=8, spatial_dims=3, invariances=("flip", "shift", "invert"))
    moved = DeblurSpace(grid=8, spatial_dims=3, invariances=("flip", "shift", "invert"), half_steps=True)
    a, b = plain.embed_variants(x), moved.embed_variants(x)
    half, moves = a.shape[1] // 2, len(moved.half_moves)
    assert moves == 26 and b.shape[1] == a.shape[1] + 2 * moves == len(moved.variant_ops)
    np.testing.assert_allclose(b[:, :half], a[:, :half], atol=1e-6)  # every earlier variant, in the same order
    np.testing.assert_allclose(b[:, half + moves : -moves], a[:, half:], atol=1e-6)
    np.testing.assert_allclose(b[:, -moves:], -b[:, half : half + moves], atol=1e-6)  # then negated
    # the move (+1, 0, 0): the query sharpened along all axes, each voxel averaged with its next neighbour on axis 0
    sharp = moved.sharpened(x)[:, 0]
    expected = moved.embed(0.5 * (sharp + torch.cat([sharp[:, :, 1:], sharp[:, :, -1:]], dim=2)))
    k = moved.half_moves.index((1, 0, 0))
    np.testing.assert_allclose(b[:, half + k], expected, atol=1e-5)
    assert moved.variant_ops[half + k][-1] == ("half", (1, 0, 0))
    assert plain.fingerprint() != moved.fingerprint()
    flat = torch.rand(1, 1, 32, 32)
    count = DeblurSpace(grid=8).embed_variants(flat).shape[1]
    assert DeblurSpace(grid=8, half_steps=True).embed_variants(flat).shape[1] == count + 2 * 8
