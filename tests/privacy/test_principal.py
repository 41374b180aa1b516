"""PrincipalSpace: a space compared on the training images' leading directions, where pixel noise has little weight."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from monai_synth.privacy.factory import PRINCIPAL_DIRECTIONS, build_spaces, make_space
from monai_synth.privacy.index import DegenerateVectorError, TrainingIndex
from monai_synth.privacy.principal import PrincipalSpace, fit_principal
from monai_synth.privacy.spaces import PixelSpace


def _pet_slices(n_patients: int, seed: int = 5) -> tuple[torch.Tensor, list[str]]:
    from monai_synth.data.phantoms import generate_cohort

    cohort = generate_cohort(
        "pet", n_patients=n_patients, images_per_patient=3, spatial_dims=2, spatial_size=64, seed=seed
    )
    images = torch.stack([torch.as_tensor(r["image"]) for r in cohort]).float()
    return images, [str(r["patient_id"]) for r in cohort]


def _noised(x: torch.Tensor, sd: float, seed: int = 0) -> torch.Tensor:
    """Gaussian noise of ``sd`` times each image's range."""
    g = torch.Generator().manual_seed(seed)
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    return x + sd * span.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)


@pytest.fixture(scope="module")
def cohort():
    train, ids = _pet_slices(48)
    new, _ = _pet_slices(8, seed=99)
    return train, ids, new


def test_noised_pet_copies_come_closer_than_new_patients_only_on_the_principal_directions(cohort):
    """PET slices noised by 10% of their range: as far from their sources as new patients' slices are from their
    nearest training slice in the pixel space, well inside them on its 32 leading directions."""
    train, ids, new = cohort
    pixel = make_space("pixel", 2, (64, 64))
    principal = fit_principal(pixel, train, 32)
    assert isinstance(principal, PrincipalSpace) and principal.k == 32 and principal.name == "pixel"
    copies = _noised(train[::18], 0.10)
    ratio = {}
    for name, space in (("pixel", pixel), ("principal", principal)):
        index = TrainingIndex.build(space, train, ids, "fp")
        copy_d, rows, _ = index.query(copies)
        new_d, _, _ = index.query(new)
        assert (rows[:, 0] == np.arange(0, len(train), 18)).all() or name == "pixel"
        ratio[name] = float(copy_d.max() / new_d.min())
    assert ratio["principal"] < 0.7 < ratio["pixel"], ratio


def test_exact_copies_stay_at_zero_and_inverted_variants_stay_exact_negatives(cohort):
    train, ids, _ = cohort
    space = fit_principal(make_space("pixel", 2, (64, 64)), train, 32)
    index = TrainingIndex.build(space, train, ids, "fp")
    d, rows, _ = index.query(torch.cat([train[:2], -train[2:4]]))
    assert d.max() < 1e-6 and rows[:, 0].tolist() == [0, 1, 2, 3]
    v = space.embed_variants(train[:1])[0]
    half = len(v) // 2
    assert np.array_equal(v[half:], -v[:half])  # what the search folds into one product per pair
    index.fast_search = False
    dense = index.nearest(space.embed_variants(train[5:7]))
    index.fast_search = True
    assert np.array_equal(index.nearest(space.embed_variants(train[5:7]))[1], dense[1])


def test_a_vector_off_every_direction_is_refused_not_judged():
    basis = np.eye(4, 8, dtype=np.float32)

    class Fixed:
        name = "fixed"

        def fingerprint(self) -> str:
            return "f"

        def embed(self, images):
            return np.asarray(images, dtype=np.float32)

    space = PrincipalSpace(Fixed(), basis)
    rows = np.eye(8, dtype=np.float32)[:4]
    index = TrainingIndex.build(space, rows, ["a", "b", "c", "d"], "fp")
    off = np.zeros((1, 8), np.float32)
    off[0, 6] = 1.0
    assert not space.embed(off).any()
    with pytest.raises(DegenerateVectorError, match="no direction"):
        index.search(space.embed(off))
    with pytest.raises(DegenerateVectorError, match="cannot index training images 1"):
        TrainingIndex.build(space, np.stack([rows[0], off[0]]), ["a", "b"], "fp")


def test_basis_is_checked_and_in_the_fingerprint(cohort):
    train, _, _ = cohort
    pixel = make_space("pixel", 2, (64, 64))
    a, b = fit_principal(pixel, train, 32), fit_principal(pixel, train[:-3], 32)
    assert a.fingerprint() == fit_principal(pixel, train, 32).fingerprint()
    assert a.fingerprint() != b.fingerprint() and a.fingerprint().startswith(pixel.fingerprint())
    with pytest.raises(ValueError, match="orthonormal"):
        PrincipalSpace(pixel, 2 * a.basis)
    with pytest.raises(ValueError, match=r"\(k, d\)"):
        PrincipalSpace(pixel, np.eye(300, 256, dtype=np.float32))
    with pytest.raises(ValueError, match="fit them on this space"):
        PrincipalSpace(PixelSpace(grid=8), a.basis).embed(train[:1])


def test_too_few_training_images_keep_the_space_whole(cohort, caplog):
    train, ids, _ = cohort
    pixel = make_space("pixel", 2, (64, 64))
    with caplog.at_level(logging.WARNING):
        assert fit_principal(pixel, train[:100], 32) is pixel
    assert "too few" in caplog.text
    batches = [train[i : i + 16] for i in range(0, len(train), 16)]  # batches, read until enough
    assert (
        fit_principal(pixel, batches, 32, max_images=130).fingerprint()
        == fit_principal(pixel, train[:130], 32).fingerprint()
    )


def test_build_spaces_fits_the_2d_pixel_space_on_the_training_images(cohort):
    train, ids, _ = cohort
    assert PRINCIPAL_DIRECTIONS[("pixel", 2)] == 32
    pixel, ranks = build_spaces(["pixel", "ranks"], 2, (64, 64), train, ids, "fp")
    assert isinstance(pixel, PrincipalSpace) and pixel.k == 32
    assert not isinstance(ranks, PrincipalSpace)
    (vol,) = build_spaces(["pixel"], 3, (16, 16, 16), torch.rand(4, 1, 16, 16, 16), list("abcd"), "fp")
    assert not isinstance(vol, PrincipalSpace)
