"""DiscSpace: rotated (and cropped, noised) 2D copies, compared on the central disc a rotation keeps whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_synth.privacy.disc import DiscSpace
from monai_synth.privacy.spaces import DegenerateImageError, NonFiniteImageError, PrivacySpace, embed_variants


def _us_phantoms(n: int = 10) -> torch.Tensor:
    from monai_synth.data.phantoms import generate_cohort

    cohort = generate_cohort("us", n_patients=n, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    return torch.stack([torch.as_tensor(r["image"]) for r in cohort]).float()


def _rotated(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotated about the centre, the corners filled with the background (as a person would rotate a copy)."""
    out = [ndimage.rotate(v[0].numpy(), degrees, reshape=False, order=1, mode="constant", cval=0.0) for v in x]
    return torch.as_tensor(np.stack(out))[:, None]


def _combo(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rotated 10 degrees, cropped to 85% of each side and resized back, multiplicative speckle sd 0.3."""
    side = x.shape[-1]
    m = int(round(side * 0.85))
    s = (side - m) // 2
    crop = _rotated(x, 10.0)[..., s : s + m, s : s + m]
    resized = torch.nn.functional.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    return (resized / 255.0 * (1.0 + 0.3 * torch.randn(resized.shape, generator=g))).clamp(0.0, 1.0) * 255.0


def _copy_and_other_distances(space, x: torch.Tensor, copies: torch.Tensor, n: int = 4):
    """Each copy's distance to its own source, and the nearest distance of the other patients to those sources."""
    train = space.embed(x[:n])
    others = 1.0 - (embed_variants(space, x[n:]) @ train.T).max(axis=1)
    own = 1.0 - np.stack([(embed_variants(space, copies)[i] @ train[i]).max() for i in range(n)])
    return own, others


def test_is_a_privacy_space_of_unit_vectors_with_the_plain_vector_first():
    space = DiscSpace(grid=16)
    assert isinstance(space, PrivacySpace) and space.name == "disc"
    x = torch.rand(2, 1, 40, 40)
    vec = space.embed(x)
    assert vec.shape == (2, space.dim) and space.dim < 16 * 16  # only the cells inside the disc
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    variants = space.embed_variants(x)
    assert variants.shape == (2, len(space.variant_ops), space.dim)
    np.testing.assert_allclose(variants[:, 0], vec, atol=1e-6)
    assert DiscSpace(grid=16, rotations=(-10, 10)).fingerprint() != space.fingerprint()
    assert DiscSpace(grid=16, max_shift=0).fingerprint() != space.fingerprint()
    # (10 zooms + 48 half-cell moves) x 13 angles x 8 symmetries x 2 signs; whole cells: (10 + 8) x 13 x 16
    assert len(DiscSpace(grid=16).variant_ops) == 12928
    assert len(DiscSpace(grid=16, max_shift=1, shift_step=1).variant_ops) == 4608


def test_refuses_what_it_cannot_judge():
    space = DiscSpace(grid=8)
    with pytest.raises(DegenerateImageError):
        space.embed(torch.ones(1, 1, 16, 16))
    bad = torch.rand(1, 1, 16, 16)
    bad[0, 0, 8, 8] = float("nan")
    with pytest.raises(NonFiniteImageError):
        space.embed_variants(bad)
    with pytest.raises(ValueError, match="2D"):
        DiscSpace(spatial_dims=3)
    with pytest.raises(ValueError, match="radius"):
        DiscSpace(radius=0.6)


@pytest.mark.parametrize("degrees", [-25.0, 25.0, 15.0])
def test_rotated_copies_are_much_closer_than_any_other_patient(degrees):
    # rotated back by the pixel space, a 25-degree copy has lost its source's corners: 0.07-0.26 from it against about
    # 0.12 for the nearest other patient; the disc a rotation keeps whole brings it to about 0.01
    x = _us_phantoms()
    own, others = _copy_and_other_distances(DiscSpace(grid=16), x, _rotated(x[:4], degrees))
    assert own.max() < 0.3 * others.min()


def test_a_rotated_cropped_speckled_copy_is_closer_than_any_other_patient():
    x = _us_phantoms()
    own, others = _copy_and_other_distances(DiscSpace(grid=16), x, _combo(x[:4]))
    assert own.max() < 0.6 * others.min()


@pytest.mark.parametrize("degrees", [-25.0, 25.0])
def test_the_default_2d_spaces_catch_rotations_to_25_degrees(degrees):
    # the issue asks for 0 released copies rotated by up to +-25 degrees: some default space (the learned embedding
    # aside) must put each copy well below the nearest other patient
    from monai_synth.privacy.factory import DEFAULT_SPACES, THREE_D_ONLY, make_space

    x = _us_phantoms()
    copies = _rotated(x[:4], degrees)
    ratios = []
    for spec in DEFAULT_SPACES:
        if spec == "embedding" or spec in THREE_D_ONLY:
            continue
        own, others = _copy_and_other_distances(make_space(spec, 2, (64, 64)), x, copies)
        ratios.append(own / others.min())
    assert np.min(ratios, axis=0).max() < 0.5


def test_left_out_for_volumes_and_refused_when_asked_for_in_3d():
    from monai_synth.privacy.factory import DEFAULT_SPACES, TWO_D_ONLY, build_spaces, make_space

    assert "disc" in DEFAULT_SPACES and "disc" in TWO_D_ONLY
    with pytest.raises(ValueError, match="2D"):
        make_space("disc", 3, (16, 16, 16))
    vols = torch.rand(3, 1, 16, 16, 16)
    built = build_spaces(["pixel:none", "disc"], 3, (16, 16, 16), vols, ["a", "b", "c"], "fp")
    assert [s.name for s in built] == ["pixel"]
    assert [s.name for s in build_spaces(["disc"], 2, (32, 32), vols[:, :, 0], ["a", "b", "c"], "fp")] == ["disc"]


def test_the_default_disc_catches_a_copy_rotated_and_moved_by_one_and_a_half_cells():
    # rotation 15 degrees, then moved by 6 px (1.5 cells of the 16-cell grid): whole-cell moves leave half a cell, and
    # such copies passed the whole 2D gate in CT, MRI and PET; the default moves the query in half cells
    x = _us_phantoms()
    moved = torch.full_like(x[:4], 0.0)
    moved[..., 6:] = _rotated(x[:4], 15.0)[..., :-6]
    own, others = _copy_and_other_distances(DiscSpace(grid=16), x, moved)
    assert own.max() < 0.3 * others.min()


def test_the_default_2d_pixel_space_leaves_rotations_to_the_disc():
    # the disc catches rotations to +-30 degrees; the pixel space's 2D angles cost 4.5x its variants for nothing the
    # attack benchmark showed
    from monai_synth.privacy.factory import make_space

    pixel = make_space("pixel", 2, (64, 64))
    assert pixel.rotations == (0.0,) and len(pixel.variant_ops) == 6336
    assert make_space("pixel", 3, (32, 32, 32)).rotations != (0.0,)  # volumes are still rotated about each axis


@pytest.mark.parametrize("degrees", [40.0, 45.0, -45.0])
def test_the_default_disc_catches_copies_rotated_beyond_30_degrees(degrees):
    # angles to +-30 left a gap to the next right angle: copies rotated by 45 degrees sat 0.08-0.13 from their sources
    # (PET threshold 0.012) and passed the six pixel-based spaces 5/5 in PET and ultrasound
    x = _us_phantoms()
    own, others = _copy_and_other_distances(DiscSpace(grid=16), x, _rotated(x[:4], degrees))
    assert own.max() < 0.3 * others.min()
    assert DiscSpace(grid=16).fingerprint() != DiscSpace(grid=16, wide_rotations=()).fingerprint()
