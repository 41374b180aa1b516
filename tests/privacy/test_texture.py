"""TextureSpace: the fine texture a copy keeps under noise that hides it from the pixel space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.privacy.spaces import DegenerateImageError, NonFiniteImageError, PrivacySpace, embed_variants
from monai_synth.privacy.texture import TextureSpace


def _us_phantoms(n: int = 8) -> torch.Tensor:
    from monai_synth.data.phantoms import generate_cohort

    cohort = generate_cohort("us", n_patients=n, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    return torch.stack([torch.as_tensor(r["image"]) for r in cohort]).float()


def _speckle(x: torch.Tensor, sd: float = 0.5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x / 255.0 * (1.0 + sd * torch.randn(x.shape, generator=g))).clamp(0.0, 1.0) * 255.0


def test_is_a_privacy_space_of_unit_vectors():
    space = TextureSpace(grid=16)
    assert isinstance(space, PrivacySpace) and space.name == "texture" and space.kernel == 3
    vec = space.embed(torch.rand(3, 1, 32, 32))
    assert vec.shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    variants = space.embed_variants(torch.rand(3, 1, 32, 32))
    assert variants.shape == (3, 16, 256)  # 8 symmetries x 2 signs
    assert TextureSpace(grid=16, kernel=5).fingerprint() != space.fingerprint()


def test_speckled_copies_are_closer_than_any_other_patient():
    # speckle sd 0.5 puts an ultrasound copy as far from its source as a new patient on the pixel space's coarse grid;
    # the texture of its source survives: 0.74-0.77 against at least 0.92 for other patients' images
    x = _us_phantoms()
    space = TextureSpace(grid=64)
    train = space.embed(x[:4])
    others = 1.0 - (embed_variants(space, x[4:]) @ train.T).max(axis=1)
    noisy = _speckle(x[:4])
    mirrored_inverted = 255.0 - noisy.flip(-1)
    for copy in (noisy, mirrored_inverted):
        d = 1.0 - np.stack([(embed_variants(space, copy)[i] @ train[i]).max() for i in range(4)])
        assert d.max() < others.min() - 0.1


def test_texture_is_fingerprinted_by_size_and_refuses_what_it_cannot_judge():
    space = TextureSpace(grid=16)
    with pytest.raises(DegenerateImageError):
        space.embed(torch.ones(1, 1, 32, 32))
    bad = torch.rand(1, 1, 32, 32)
    bad[0, 0, 3, 3] = float("inf")
    with pytest.raises(NonFiniteImageError):
        space.embed_variants(bad)
    with pytest.raises(ValueError, match="kernel"):
        TextureSpace(grid=16, kernel=4)


def test_3d_volumes_and_the_default_spaces():
    from monai_synth.privacy.factory import DEFAULT_SPACES, make_space

    assert "texture" in DEFAULT_SPACES
    space = make_space("texture", 3, (12, 12, 12))
    assert space.grid == 12 and space.spatial_dims == 3
    vec = space.embed_variants(torch.rand(2, 1, 12, 12, 12))
    assert vec.shape == (2, 16, 12**3)  # 8 flips x 2 signs
    assert make_space("texture", 2, (128, 128)).grid == 64


def test_the_box_option_sets_the_local_mean_and_refuses_what_it_does_not_know():
    from monai_synth.privacy.factory import make_space

    assert make_space("texture", 2, (64, 64)).kernel == 9
    assert make_space("texture:box=3", 2, (64, 64)).kernel == 3
    assert make_space("texture:box=3", 3, (32, 32, 32)).kernel == 3
    with pytest.raises(ValueError, match="box=N"):
        make_space("texture:flip", 2, (64, 64))
    with pytest.raises(ValueError, match="kernel"):
        make_space("texture:box=4", 2, (64, 64))
