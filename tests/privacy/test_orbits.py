"""Flipped variants screened as one orbit: the parity components are an orthonormal basis in which a flip only changes
signs, and the orbit screen finds exactly the rows the dense product finds, whatever a space states about its orbits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.data.phantoms import generate_cohort
from monai_synth.privacy.disc import DiscSpace
from monai_synth.privacy.factory import make_space
from monai_synth.privacy.orbits import FlipGroup, grid_flips, layout
from monai_synth.privacy.partial import TileSpace
from monai_synth.privacy.search import _orbit_split, nearest_rows
from monai_synth.privacy.spaces import _symmetries, embed_variants


def _disc_mask(grid: int) -> np.ndarray:
    return DiscSpace(grid=grid)._mask.numpy()


@pytest.mark.parametrize(
    "grid, channels, mask",
    [((8, 8), 1, None), ((6, 4, 8), 1, None), ((5, 5), 2, None), ((16, 16), 1, "disc")],
)
def test_parity_components_are_an_orthonormal_basis_in_which_a_flip_changes_signs(grid, channels, mask):
    m = _disc_mask(grid[0]) if mask == "disc" else None
    group = FlipGroup(grid_flips(grid, channels, m))
    d = group.d
    basis = group.parity(torch.eye(d)).reshape(d, -1)  # column k: the k-th coordinate of every unit vector
    kept = basis.abs().sum(dim=0) > 0
    b = basis[:, kept]
    assert b.shape == (d, d)  # as many components as values (an odd side has fixed cells)
    torch.testing.assert_close(b.T @ b, torch.eye(d), atol=1e-5, rtol=0)
    gen = torch.Generator().manual_seed(0)
    q, x = torch.randn(3, d, generator=gen), torch.randn(5, d, generator=gen)
    qc, xc = group.parity(q), group.parity(x)
    for j in range(group.size):
        signed = sum(group.chars[c, j] * (qc[:, c] @ xc[:, c].T) for c in range(group.size))
        torch.testing.assert_close(q[:, group.perms[j]] @ x.T, signed, atol=1e-4, rtol=0)


def test_flips_that_do_not_commute_or_are_not_flips_are_refused():
    with pytest.raises(ValueError, match="its own inverse"):
        FlipGroup(np.array([[1, 2, 0]]))
    with pytest.raises(ValueError, match="commute"):
        FlipGroup(np.array([[1, 0, 2], [0, 2, 1]]))


def _views(space, images: torch.Tensor) -> np.ndarray:
    """Both intensity views of every image, one after the other, as a release asks them."""
    v1, v2 = embed_variants(space, images), embed_variants(space, (images + 1.0) ** 1.2 - 1.0)
    return np.stack([v1, v2], axis=1).reshape(-1, *v1.shape[1:])


@pytest.fixture(scope="module")
def cohort():
    train = generate_cohort("us", 8, 3, spatial_size=48, seed=5)
    unseen = generate_cohort("us", 3, 1, spatial_size=48, seed=5, first_patient=40)
    model = lambda records: torch.stack([torch.as_tensor(r["image"]) for r in records]) / 127.5 - 1.0  # noqa: E731
    return model(train), model(unseen)


FACTORY_2D = ("pixel", "ranks", "localranks", "deblur", "tiles", "disc")  # as the default gate makes them (unprojected)
SPACES = {
    "tiles": lambda: TileSpace(grid=8, scales=(0.8, 0.5), seam_limit=24, seam_scales=(0.7, 0.5)),
    "disc": lambda: DiscSpace(grid=8, rotations=(-10, 0, 10), zooms=(0.9,), max_shift=0.5),
}


@pytest.mark.parametrize("bf16_screen", [True, False])
@pytest.mark.parametrize("name", list(SPACES))
def test_the_orbit_screen_finds_the_dense_products_rows(cohort, name, bf16_screen, monkeypatch):
    monkeypatch.setattr("monai_synth.privacy.search.BF16_SCREEN", bf16_screen)
    monkeypatch.setattr("monai_synth.privacy.search._ORBIT_MIN_ROWS", 0)  # a few rows: the orbits are screened too
    train, unseen = cohort
    space = SPACES[name]()
    rows = embed_variants(space, train)[:, 0]
    # a training image flipped, one inverted, and one mirrored inside a larger field: their own rows must be found
    queries = torch.cat([unseen, train[:1].flip(-1), -train[3:4].transpose(-1, -2), train[5:6].flip(-2)])
    vec = _views(space, queries)
    nq, nv, d = vec.shape
    orbits = space.orbit_layout(nv, d)
    assert orbits is not None
    shards, offsets = [rows[:10], rows[10:]], [0, 10]
    dense = nearest_rows(vec, shards, offsets, fast=False)
    screened = nearest_rows(vec, shards, offsets, fast=True, orbits=orbits)
    np.testing.assert_array_equal(screened[0], dense[0])
    np.testing.assert_array_equal(screened[1], dense[1])
    assert set(screened[1][-6:].tolist()) >= {0, 3, 5}
    # a layout that pairs variants at random is only slower: the same rows, the same distances
    wrong = np.random.default_rng(0).permutation(orbits[1].ravel()).reshape(orbits[1].shape)
    shuffled = nearest_rows(vec, shards, offsets, fast=True, orbits=(orbits[0], wrong))
    np.testing.assert_array_equal(shuffled[0], dense[0])
    np.testing.assert_array_equal(shuffled[1], dense[1])


STATING = {**SPACES, **{name: lambda name=name: make_space(name, 2, (48, 48)) for name in FACTORY_2D}}


@pytest.mark.parametrize("name", list(STATING))
def test_a_spaces_stated_orbits_are_its_flipped_variants(cohort, name):
    """Every variant of these 2D spaces is in an orbit, each member a flip of its base to float32 rounding, and a window
    repeated to pad (the seam windows) is screened once: else the search is slow, not wrong."""
    train, _ = cohort
    space = STATING[name]()
    pasted = torch.full((1, 1, 48, 48), -1.0)
    pasted[..., 10:30, 5:40] = train[0, :, 10:30, 5:40]  # a picture on plain background: few seams
    vec = embed_variants(space, torch.cat([train[:1], pasted]))
    nq, nv, d = vec.shape
    orbits = space.orbit_layout(nv, d)
    flat = vec.reshape(nq * nv, d)
    orbit, rest = _orbit_split(flat, np.repeat(np.arange(nq), nv), nv, orbits, torch.float32)
    assert len(rest) == 0
    assert orbit.slack.max() < 1e-5
    assert len(np.unique(orbits[1])) == nv // 2 and orbits[1].shape[1] == 4
    if name == "tiles":  # up to 24 seam windows; the pasted picture has fewer, the first one repeated
        assert len(orbit.owner) + (0 if orbit.shadow is None else (orbit.shadow.owner >= 0).sum()) < nq * len(orbits[1])


def test_layout_needs_every_combination_of_flips():
    full = layout(_symmetries(2, True, True), lambda s: np.array([s]))
    assert full.shape == (2, 4)
    assert layout(_symmetries(2, False, True), lambda s: np.array([s])).shape[0] == 0


@pytest.mark.parametrize("bf16_screen", [True, False])
def test_volumes_orbits_of_eight_flips_with_fraction_windows_left_out(bf16_screen, monkeypatch):
    """3D tiles' windows as orbits of 8 flips (not stated by the space: slower there, but exact), the fraction windows
    (not flipped) searched as they are."""
    monkeypatch.setattr("monai_synth.privacy.search.BF16_SCREEN", bf16_screen)
    monkeypatch.setattr("monai_synth.privacy.search._ORBIT_MIN_ROWS", 0)  # a few rows: the orbits are screened too
    gen = torch.Generator().manual_seed(1)
    train = torch.nn.functional.avg_pool3d(torch.randn(12, 1, 16, 16, 16, generator=gen), 3, 1, 1)
    space = TileSpace(grid=4, spatial_dims=3, scales=(0.5,), fractions=(0.5,))
    rows = embed_variants(space, train)[:, 0]
    canvas = torch.randn(2, 1, 16, 16, 16, generator=gen) * 0.1
    canvas[0, :, 2:10, 4:12, 8:16] = train[3, :, ::2, ::2, ::2].flip(-1)  # a training volume shrunk, mirrored
    vec = embed_variants(space, torch.cat([canvas, train[7:8].flip(-3)]))
    nq, nv, d = vec.shape
    assert space.orbit_layout(nv, d) is None  # volumes are screened variant by variant (slower as orbits)
    n = len(space._main_windows((16, 16, 16))) + space.seam_limit  # windows under every symmetry, before fractions
    orbits = grid_flips((4, 4, 4)), layout(space._symmetries, lambda s: s * n + np.arange(n))
    assert orbits[1].shape[1] == 8
    dense = nearest_rows(vec, [rows], [0], fast=False)
    screened = nearest_rows(vec, [rows], [0], fast=True, orbits=orbits)
    np.testing.assert_array_equal(screened[0], dense[0])
    np.testing.assert_array_equal(screened[1], dense[1])
    assert screened[1][2] == 7
