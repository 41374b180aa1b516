"""AlignedSpace: training images registered onto the candidate, for copies between the other spaces' fixed steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_synth.privacy.aligned import AlignedSpace, canonical_frame
from monai_synth.privacy.index import TrainingIndex
from monai_synth.privacy.spaces import DegenerateImageError, NonFiniteImageError, PrivacySpace


def _pet_slices(n_patients: int = 12) -> tuple[torch.Tensor, list[str]]:
    """Two adjacent mid-body PET slices per patient: patients that share their anatomy at the same positions."""
    from monai_synth.data.phantoms import generate_cohort

    cohort = generate_cohort(
        "pet", n_patients=n_patients, images_per_patient=2, spatial_dims=2, spatial_size=64, seed=3
    )
    images = torch.stack([torch.as_tensor(r["image"]) for r in cohort]).float()
    return images, [str(r["patient_id"]) for r in cohort]


def _affine(x: torch.Tensor, degrees: float, zoom: float, shift: tuple[float, float], mirror: bool) -> torch.Tensor:
    """``x`` mirrored, then rotated, magnified by ``zoom`` (cropped and resized back) and moved (fractions of the
    half-side), resampled at its own size, as a person editing a copy would."""
    if mirror:
        x = x.flip(-1)
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), shift[0]], [math.sin(a), math.cos(a), shift[1]]]) / zoom
    theta[:, 2] = torch.tensor(shift)
    grid = F.affine_grid(theta[None].expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_is_a_privacy_space_of_unit_vectors_with_variants_in_their_own_frame():
    space = AlignedSpace(grid=16)
    assert isinstance(space, PrivacySpace) and space.name == "aligned"
    x = torch.rand(3, 1, 32, 32)
    vec = space.embed(x)
    assert vec.shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    variants = space.embed_variants(x)
    assert variants.shape == (3, 64, 256)  # 8 symmetries x 4 turns of the frame x 2 signs
    np.testing.assert_allclose(variants[:, 0], vec, atol=1e-6)
    assert AlignedSpace(grid=16, candidates=8).fingerprint() != space.fingerprint()
    assert AlignedSpace(grid=16, turns=(0.0, 45.0)).fingerprint() != space.fingerprint()
    assert AlignedSpace(grid=16, turns=(0.0,)).embed_variants(x).shape == (3, 16, 256)
    assert AlignedSpace(grid=16, spatial_dims=3).turns == (0.0,)
    for turns in [(), (10.0,), (0.0, 90.0), (0.0, -5.0)]:
        with pytest.raises(ValueError, match="turns"):
            AlignedSpace(turns=turns)


def test_the_canonical_frame_undoes_a_move_rotation_and_zoom():
    images, _ = _pet_slices(2)
    x = images[:1]
    moved = _affine(x, degrees=15.0, zoom=1.1, shift=(0.1, -0.05), mirror=False)
    a, b = canonical_frame(x, (64, 64))[0], canonical_frame(moved, (64, 64))[0]
    r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
    r_before = np.corrcoef(x.flatten().numpy(), moved.flatten().numpy())[0, 1]
    assert r > 0.97 and r_before < 0.9


@pytest.mark.parametrize(
    "degrees, zoom, shift, mirror, framed",
    [
        (7.0, 1.11, (0.0, 0.0), True, False),
        (-18.0, 1.0, (0.12, 0.08), False, True),
        (4.0, 0.92, (-0.06, 0.1), True, False),
    ],
)
def test_a_copy_between_the_fixed_steps_is_registered_back_to_its_source(degrees, zoom, shift, mirror, framed):
    # a PET slice mirrored, rotated by 7 degrees and cropped to 90% passed the whole 2D gate at 1.00-1.02 of the slot
    # spaces' thresholds; registered, such a copy is closer to its source than any other patient's slice is to the
    # training slices, where unregistered it is not
    images, ids = _pet_slices()
    train, train_ids, new = images[:16], ids[:16], images[16:]  # new: 4 patients not in training
    space = AlignedSpace()
    index = TrainingIndex.build(space, train, train_ids, "pet", 8)
    others = index.search(space.embed_variants(new), k=1)[0][:, 0]
    copies = _affine(train[:4], degrees, zoom, shift, mirror)
    d, rows, _ = index.search(space.embed_variants(copies), k=1)
    assert [train_ids[r] for r in rows[:, 0]] == train_ids[:4]  # its source or its neighbouring slice
    assert d.max() < 0.5 * others.min(), (d.ravel(), others.min())
    # the fit is what brings the copies this close; in the canonical frame alone a moved and rotated copy already has
    # its source (or its neighbouring slice) nearest, which is what the search needs to hand the fit the right rows
    plain = 1.0 - (space.embed_variants(copies) @ space.embed(train).T).max(axis=1)
    unregistered = plain[np.arange(4), np.arange(4)]
    assert (d[:, 0] < 0.5 * unregistered).all(), (d.ravel(), unregistered)
    if framed:
        assert all(plain[i].argmin() // 2 == i // 2 for i in range(4)), plain.argmin(axis=1)


def test_a_copy_cut_at_its_border_is_compared_only_where_it_has_pixels():
    # the corner 85% of a PET slice resized back: in the copy's own frame the cut-off part of the image lies outside its
    # field of view; compared there too (edges replicated or zeros), the copy sat 4-10x new patients' 1% quantile from
    # its source, compared only within the copy's field it comes back to it
    images, ids = _pet_slices()
    train, new = images[:16], images[16:]
    space = AlignedSpace()
    index = TrainingIndex.build(space, train, ids[:16], "pet", 8)
    others = index.search(space.embed_variants(new), k=1)[0][:, 0]
    copies = F.interpolate(train[:4, :, :54, :54], size=(64, 64), mode="bilinear", align_corners=False)
    queries = space.embed_variants(copies)
    rows = np.arange(4)[:, None]
    plain = 1.0 - np.einsum("qvd,qd->qv", queries, space.embed(train[:4])).max(axis=1, keepdims=True)
    fitted = space.refine(queries, plain, rows, lambda r: space.embed(train[torch.as_tensor(r)]))
    assert fitted.max() < 0.5 * others.min() < plain.min(), (fitted.ravel(), others.min(), plain.ravel())
    # the zeros of a vector mark its field of view: the cells outside it, never a cell inside
    vec = space.embed(copies)
    assert ((vec == 0).mean(axis=1) > 0.05).all() and np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-4)


def test_the_finalists_are_different_patients_first():
    # one patient's three slices all fit a copy of them about equally; with two finalists and no groups the second
    # patient's copy is left unregistered, with groups it is registered too (the specificity test compares the two)
    images, _ = _pet_slices(2)
    source = images[:1]
    same = [_affine(source, d, 1.0, (0.0, 0.0), False) for d in (5.0, 6.0, 7.0)]
    train = torch.cat([*same, _affine(source, -12.0, 1.2, (0.0, 0.0), False)])  # the other patient: turned and zoomed
    query = _affine(source, 0.0, 1.05, (0.02, 0.0), False)
    space = AlignedSpace(candidates=4, finalists=2)
    queries, rows = space.embed_variants(query), np.arange(4)[None]
    plain = 1.0 - np.einsum("qvd,nd->qvn", queries, space.embed(train)).max(axis=1)
    groups = np.array([[0, 0, 0, 1]])
    vectors = space.embed(train)
    by_row = space.refine(queries, plain, rows, lambda r: vectors[r])
    by_patient = space.refine(queries, plain, rows, lambda r: vectors[r], groups)
    assert by_row[0, 3] == plain[0, 3] and by_patient[0, 3] < 0.5 * plain[0, 3], (plain, by_row, by_patient)


def test_registration_only_lowers_distances_and_search_agrees_with_nearest():
    images, ids = _pet_slices(6)
    space = AlignedSpace(grid=32, candidates=3, finalists=2)
    index = TrainingIndex.build(space, images[:8], ids[:8], "pet", 8)
    queries = space.embed_variants(images[8:])
    plain = 1.0 - np.einsum("qvd,nd->qvn", queries, space.embed(images[:8])).max(axis=1)
    d, rows, _ = index.search(queries, k=8)
    assert (np.diff(d, axis=1) >= 0).all()
    assert (d <= np.take_along_axis(plain, rows, axis=1) + 1e-5).all()
    near_d, near_rows, _ = index.nearest(queries)
    np.testing.assert_allclose(near_d[:, 0], d[:, 0], atol=1e-9)
    assert (near_rows[:, 0] == rows[:, 0]).all()


def test_an_inverted_copy_is_judged_in_its_own_frame():
    images, ids = _pet_slices(6)
    train = images[:8]
    space = AlignedSpace(grid=32)
    index = TrainingIndex.build(space, train, ids[:8], "pet", 8)
    copy = train.max() - _affine(train[:2], degrees=10.0, zoom=1.0, shift=(0.05, 0.0), mirror=False)
    d, rows, _ = index.search(space.embed_variants(copy), k=1)
    assert rows[:, 0].tolist() == [0, 1] and d.max() < 0.01


def test_refuses_what_it_cannot_judge_and_bounds_it_cannot_mean():
    space = AlignedSpace(grid=16)
    with pytest.raises(DegenerateImageError):
        space.embed_variants(torch.ones(1, 1, 32, 32))
    bad = torch.rand(1, 1, 32, 32)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteImageError):
        space.embed(bad)
    with pytest.raises(ValueError, match="max_scale"):
        AlignedSpace(max_scale=3.0)
    with pytest.raises(ValueError, match="candidates"):
        AlignedSpace(finalists=0)


def test_on_by_default_for_2d_images():
    from monai_synth.privacy.factory import DEFAULT_SPACES, TWO_D_ONLY, make_space

    assert "aligned" in DEFAULT_SPACES and "aligned" in TWO_D_ONLY
    space = make_space("aligned", 2, (64, 64))
    assert isinstance(space, AlignedSpace) and space.grid == 32 and space.spatial_dims == 2
    assert make_space("aligned", 2, (24, 24)).grid == 24  # never finer than the images
    with pytest.raises(ValueError, match="judges 2D images"):
        make_space("aligned", 3, (32, 32, 32))


def test_a_stretched_and_sheared_copy_lands_near_its_source_in_its_own_frame():
    # CT slices share one nearly round body: scaled by 0.9 x 1.08, sheared by 0.08, turned by 6 degrees and moved, a copy
    # ranked its source up to 118th of 240 in a frame scaled by the common spread of its axes (and passed the whole
    # gate); each axis scaled to its own spread, its ambiguous axes still turned by tens of degrees (up to 22nd of 80
    # here). With the frame also turned every 22.5 degrees, every source is among its copy's 8 nearest slices.
    from monai_synth.data.phantoms import generate_cohort

    cohort = generate_cohort("ct", n_patients=40, images_per_patient=2, spatial_dims=2, spatial_size=64, seed=3)
    train = torch.stack([torch.as_tensor(r["image"]) for r in cohort]).float()
    sources = train[::2]
    a = math.radians(-6.0)
    turn = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    theta = torch.cat([turn @ torch.tensor([[1 / 0.9, 0.08], [0.0, 1 / 1.08]]), torch.tensor([[-0.08], [0.0]])], 1)
    grid = F.affine_grid(theta[None].expand(len(sources), 2, 3), list(sources.shape), align_corners=False)
    copies = F.grid_sample(sources, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ranks = {}
    for turns in [(0.0,), None]:
        space = AlignedSpace(turns=turns)
        plain = 1.0 - np.einsum("qvd,nd->qvn", space.embed_variants(copies), space.embed(train)).max(axis=1)
        ranks[turns] = [int((plain[i] < plain[i, 2 * i]).sum()) for i in range(len(sources))]
    assert max(ranks[None]) <= 8 < max(ranks[(0.0,)]), ranks
    assert sum(r == 0 for r in ranks[None]) >= len(sources) // 2, ranks


def test_a_fit_also_starts_from_the_nearest_unturned_variant():
    # an MRI slice rotated by 45 degrees came back to its source only from the unturned frame: when turned variants of
    # the query are nearest to a row, the last start is the nearest unturned one (rows 0 and 2 here), else as ordered
    from monai_synth.privacy.aligned import _start_variants

    unturned = torch.tensor([True, True, False, False])
    order = torch.tensor([[2, 3, 1, 0], [0, 2, 3, 1], [3, 2, 0, 1]])
    np.testing.assert_array_equal(_start_variants(order, unturned, 2), [[2, 1], [0, 2], [3, 0]])
    np.testing.assert_array_equal(_start_variants(order, unturned, 1), order[:, :1])
    np.testing.assert_array_equal(_start_variants(order, torch.ones(4, dtype=torch.bool), 2), order[:, :2])
