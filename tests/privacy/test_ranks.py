"""The ranks space: copies under a monotone intensity curve are their sources' rank images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.privacy.factory import DEFAULT_SPACES, make_space
from monai_synth.privacy.ranks import LocalRankSpace, RankSpace, intensity_ranks, local_ranks
from monai_synth.privacy.spaces import DegenerateImageError, NonFiniteImageError, PixelSpace


def _pet_slices(n: int) -> torch.Tensor:
    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.transforms.presets import intensity_transform

    to_model = intensity_transform("pet")
    cohort = generate_cohort("pet", n_patients=n, images_per_patient=1, spatial_dims=2, spatial_size=64, seed=0)
    return torch.stack([torch.as_tensor(np.asarray(to_model(np.asarray(r["image"], np.float32)))) for r in cohort])


def _equalised(img: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation (the empirical CDF of the image's own values), as an image editor does it."""
    a = img.numpy()
    values, counts = np.unique(a, return_counts=True)
    cdf = np.cumsum(counts) / a.size
    return torch.as_tensor(np.interp(a, values, cdf).astype(np.float32))


def test_ranks_are_kept_by_any_monotone_curve_and_ties_share_their_mean_rank():
    x = torch.tensor([[[[0.0, 0.0, 1.0, 5.0]]]])
    assert intensity_ranks(x).flatten().tolist() == pytest.approx([0.25, 0.25, 0.625, 0.875])
    img = torch.rand(2, 1, 16, 16) * 10
    for curve in (torch.sqrt, torch.log1p, lambda t: torch.sigmoid(t - 5) * 255):
        assert torch.equal(intensity_ranks(curve(img)), intensity_ranks(img))
    assert torch.allclose(intensity_ranks(-img), 1.0 - intensity_ranks(img))  # inversion reverses them


def test_ranks_space_holds_histogram_equalised_pet_copies_that_the_pixel_space_misses():
    # PET slices: a few hot organs carry the pixel correlation, and an equalised copy sat 12x the pixel space's
    # threshold from its source (a new patient at 1-2x), so such copies passed the whole gate
    x = _pet_slices(24)
    train, new = x[:12], x[12:]
    copies = torch.stack([_equalised(train[i]) for i in range(6)])
    copies[1] = copies[1].flip(-1)  # and mirrored
    copies[2] = 1.0 - copies[2]  # and inverted
    for space, caught in ((make_space("ranks", 2, (64, 64)), True), (make_space("pixel", 2, (64, 64)), False)):
        rows = space.embed(train)
        others = 1.0 - (space.embed_variants(new) @ rows.T).max(axis=1)
        own = 1.0 - np.stack([(space.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(6)])
        if caught:
            assert own.max() < 1e-3 < others.min(), (own, others.min())
        else:
            assert own.min() > others.min(), (own, others.min())


def test_ranks_space_settings_fingerprint_and_bad_images():
    assert "ranks" in DEFAULT_SPACES
    flat = make_space("ranks", 2, (64, 64))
    vol = make_space("ranks", 3, (32, 32, 32))
    assert isinstance(flat, RankSpace) and flat.name == "ranks" and flat.max_shift == 2
    assert vol.max_shift == 1 and "transpose" not in vol.invariances
    # the pixel space of the same settings compares intensities, not ranks: another index
    plain = PixelSpace(grid=16, spatial_dims=2, invariances=flat.invariances, max_shift=2)
    assert plain.fingerprint() != flat.fingerprint() and plain.name == "pixel"
    img = torch.rand(1, 1, 64, 64)
    assert np.allclose(flat.embed_variants(img)[:, 0], flat.embed(img))
    assert vol.embed_variants(torch.rand(1, 1, 32, 32, 32)).shape[-1] == 16**3
    with pytest.raises(DegenerateImageError):
        flat.embed(torch.full((1, 1, 64, 64), 3.0))  # one rank everywhere: no correlation to take
    with pytest.raises(NonFiniteImageError):
        flat.embed(torch.full((1, 1, 64, 64), float("inf")))


def _equalised_per_half(img: torch.Tensor) -> torch.Tensor:
    """Each half of each axis (each quadrant) histogram-equalised on its own."""
    out = img.clone()
    h, w = img.shape[-2] // 2, img.shape[-1] // 2
    for a in (slice(0, h), slice(h, None)):
        for b in (slice(0, w), slice(w, None)):
            out[..., a, b] = _equalised(img[..., a, b])
    return out


def test_local_ranks_count_darker_neighbours_and_survive_a_curve_that_varies_over_the_image():
    x = torch.tensor([[[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]]])
    assert float(local_ranks(x)[0, 0, 1, 1]) == 0.5  # 4 of 8 neighbours below the centre
    assert float(local_ranks(x)[0, 0, 0, 0]) == pytest.approx(1.5 / 8)  # 3 replicated neighbours tie with itself
    img = torch.rand(1, 1, 16, 16) + 0.1
    curved = img.clone()  # a different monotone curve in each quadrant
    curved[..., :8, :8], curved[..., :8, 8:], curved[..., 8:, :8] = (
        img[..., :8, :8] ** 3,
        img[..., :8, 8:].log(),
        1 / -img[..., 8:, :8],
    )
    inside = torch.ones(16, 16, dtype=torch.bool)
    inside[7:9, :] = inside[:, 7:9] = False  # pixels whose neighbourhood spans two quadrants
    assert torch.equal(local_ranks(curved)[0, 0][inside], local_ranks(img)[0, 0][inside])
    assert not torch.equal(intensity_ranks(curved), intensity_ranks(img))  # the global ranks are lost
    vol = torch.rand(1, 1, 6, 6, 6)
    assert torch.equal(local_ranks(vol * 3 + 1), local_ranks(vol)) and local_ranks(vol).shape == vol.shape


def test_local_ranks_space_holds_pet_copies_equalised_per_half_that_the_ranks_space_misses():
    # each quadrant equalised on its own keeps no global ranks: such PET copies sat 19x the ranks space's new
    # patients' 1% quantile from their sources and passed the whole gate 3 times of 3
    x = _pet_slices(24)
    train, new = x[:12], x[12:]
    copies = torch.stack([_equalised_per_half(train[i]) for i in range(6)])
    for name, caught in (("localranks", True), ("ranks", False)):
        space = make_space(name, 2, (64, 64))
        rows = space.embed(train)
        others = 1.0 - (space.embed_variants(new) @ rows.T).max(axis=1)
        own = 1.0 - np.stack([(space.embed_variants(copies[i : i + 1])[0] @ rows[i]).max() for i in range(6)])
        if caught:
            assert own.max() < others.min(), (name, own, others.min())
        else:
            assert own.max() > others.min(), (name, own, others.min())


def test_local_ranks_space_is_a_default_space_with_its_own_index():
    assert "localranks" in DEFAULT_SPACES
    flat, vol = make_space("localranks", 2, (64, 64)), make_space("localranks", 3, (32, 32, 32))
    assert isinstance(flat, LocalRankSpace) and flat.name == "localranks" and flat.radius == 1
    assert vol.max_shift == 1 and "transpose" not in vol.invariances
    assert flat.fingerprint() != make_space("ranks", 2, (64, 64)).fingerprint()
    assert flat.fingerprint() != LocalRankSpace(radius=2, invariances=flat.invariances).fingerprint()
    assert vol.embed_variants(torch.rand(1, 1, 32, 32, 32)).shape[-1] == 16**3
    with pytest.raises(ValueError, match="radius"):
        LocalRankSpace(radius=0)
