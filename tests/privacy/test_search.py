"""The safeguard's nearest-row search: the fast path (signs folded, slots split) gives exactly the dense path's answer,
and a near-copy is still refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.data.phantoms import generate_cohort
from monai_synth.privacy.index import DegenerateVectorError, TrainingIndex
from monai_synth.privacy.partial import PartSpace, TileSpace
from monai_synth.privacy.release import ReleaseEncoder
from monai_synth.privacy.safeguard import PrivacySafeguard
from monai_synth.privacy.search import SCREEN, _batched, _groups, nearest_rows
from monai_synth.privacy.spaces import PixelSpace, embed_variants

SPACES = {
    "pixel": lambda: PixelSpace(grid=8, invariances=("flip", "transpose", "shift", "invert"), max_shift=1),
    "parts": lambda: PartSpace(grid=8, kind="regions"),
    "crops": lambda: PartSpace(grid=8, kind="crops"),
    "tiles": lambda: TileSpace(grid=8, scales=(0.5,)),
}


def _model(records):
    return torch.stack([torch.as_tensor(r["image"]) for r in records]) / 127.5 - 1.0


def _fast_matches_dense(index: TrainingIndex, vec) -> tuple:
    """The index's answers for ``vec`` on the fast path, checked equal, bit for bit, to the dense product's."""
    index.fast_search = False
    dense = index.nearest(vec)
    index.fast_search = True
    fast = index.nearest(vec)
    for a, b in zip(fast, dense):
        np.testing.assert_array_equal(a, b)
    return fast


@pytest.fixture(scope="module")
def phantoms():
    train = generate_cohort("us", 12, 2, spatial_size=32, seed=3)
    unseen = generate_cohort("us", 3, 1, spatial_size=32, seed=3, first_patient=50)
    return _model(train), [r["patient_id"] for r in train], _model(unseen)


@pytest.mark.parametrize("bf16_screen", [True, False])  # the screen runs only on CPUs with native bfloat16
@pytest.mark.parametrize("name", list(SPACES))
def test_fast_and_dense_search_give_the_same_rows_and_distances(phantoms, name, bf16_screen, monkeypatch):
    monkeypatch.setattr("monai_synth.privacy.search.BF16_SCREEN", bf16_screen)
    train, patients, unseen = phantoms
    index = TrainingIndex.build(SPACES[name](), train, patients, "dl", shard_size=10)
    queries = torch.cat([unseen, train[:2].flip(-1), -train[2:3]])
    vec = embed_variants(index.space, queries)
    fast = _fast_matches_dense(index, vec)
    # and they are the exact nearest rows: the smallest distance over every variant and row, as FAISS finds it
    ref_d, ref_r, _ = index.search(vec, k=1)
    np.testing.assert_allclose(fast[0], ref_d, atol=1e-6)
    np.testing.assert_array_equal(fast[1], ref_r)


def test_a_variant_and_its_negation_count_as_one_product_with_the_larger_similarity():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    q = -rows[7] + 0.01 * rng.standard_normal(16).astype(np.float32)
    q /= np.linalg.norm(q)
    both = np.stack([q, -q])[None]
    only_plus = q[None, None]
    sims, found = nearest_rows(both, [rows[:20], rows[20:]], [0, 20])
    assert found[0] == 7 and sims[0] == pytest.approx(float(-(q.astype(np.float64) @ rows[7])), abs=1e-12)
    # without the negated variant, row 7 is far: the fold must not invent the other sign
    sims_plus, found_plus = nearest_rows(only_plus, [rows], [0])
    assert found_plus[0] != 7 and sims_plus[0] < 0.9
    dense = nearest_rows(only_plus, [rows], [0], fast=False)
    assert (sims_plus[0], found_plus[0]) == (dense[0][0], dense[1][0])


def test_safeguard_decisions_are_the_same_on_both_paths_and_a_near_copy_is_refused(phantoms):
    train, patients, unseen = phantoms
    checks = [(TrainingIndex.build(SPACES[n](), train, patients, "dl"), 0.05) for n in ("pixel", "crops")]
    safeguard = PrivacySafeguard(checks)
    # an inverted, mirrored training image with a little noise, and a centre crop of one blown up to full size
    copy = -train[5].flip(-1) + 0.02 * torch.randn_like(train[5])
    crop = torch.nn.functional.interpolate(train[9][None, :, 4:28, 4:28], size=(32, 32), mode="bilinear")[0]
    candidates = [copy, crop, *unseen]
    answers = {}
    for fast in (True, False):
        for index, _ in checks:
            index.fast_search = fast
        answers[fast] = safeguard.check(candidates)
    for a, b in zip(answers[True], answers[False]):
        assert (a.passed, a.distances, a.nearest_rows, a.nearest_patients) == (
            b.passed,
            b.distances,
            b.nearest_rows,
            b.nearest_patients,
        )
    assert not answers[True][0].passed and answers[True][0].nearest_rows["pixel"] == 5
    # the crop is nearer its source in the crops space than any unseen patient's image is to the training set
    assert answers[True][1].nearest_rows["crops"] == 9
    assert answers[True][1].distances["crops"] < min(r.distances["crops"] for r in answers[True][2:])


def test_a_degenerate_query_is_refused(phantoms):
    train, patients, _ = phantoms
    index = TrainingIndex.build(SPACES["pixel"](), train, patients, "dl")
    vec = embed_variants(index.space, train[:2])
    vec[1, 3] = 0.0
    with pytest.raises(DegenerateVectorError) as err:
        index.nearest(vec)
    assert err.value.rows == [1]


@pytest.mark.parametrize("d", [16, 256, 4096])
def test_the_bfloat16_screen_stays_within_its_stated_bound(d):
    rng = np.random.default_rng(d)
    q = rng.standard_normal((64, d)).astype(np.float32)
    x = rng.standard_normal((256, d)).astype(np.float32)
    x[:32] = q[:32] + 0.01 * rng.standard_normal((32, d)).astype(np.float32)  # near-copies: similarities near 1
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    approx = (torch.from_numpy(q).bfloat16() @ torch.from_numpy(x).bfloat16().T).double().numpy()
    exact = q.astype(np.float64) @ x.T.astype(np.float64)
    assert np.abs(approx - exact).max() <= 0.0122 < SCREEN  # the bound derived in SCREEN's docstring


def test_a_saved_memory_mapped_index_answers_as_the_built_one(phantoms, tmp_path):
    train, patients, unseen = phantoms
    built = TrainingIndex.build(SPACES["crops"](), train, patients, "dl", shard_size=7)
    built.save(tmp_path / "idx")
    loaded = TrainingIndex.load(tmp_path / "idx", space=built.space, expected_fingerprint=built.fingerprint, mmap=True)
    vec = embed_variants(built.space, unseen)
    for a, b in zip(built.nearest(vec), loaded.nearest(vec)):
        np.testing.assert_array_equal(a, b)


def test_slots_side_by_side_are_read_as_a_view_of_the_rows(phantoms):
    # the crops space's slots tile its vector: the batched product reads the rows' columns as a slice, no gather
    train, _, unseen = phantoms
    space = PartSpace(grid=8, kind="crops")
    vec = embed_variants(space, unseen[:2]).astype(np.float32)
    q, v, d = vec.shape
    batches = _batched(_groups(vec.reshape(q * v, d), np.repeat(np.arange(q), v), fast=True))
    slotted = [cols for _, cols in batches if cols is not None]
    assert slotted and all(isinstance(cols, slice) for cols in slotted)
    assert sum(cols.stop - cols.start for cols in slotted) == d


@pytest.mark.parametrize("dims", [2, 3])
def test_default_spaces_return_every_variant_then_every_negated_variant(dims):
    """The search folds signs in one pass when a query's second half of variants is its first half negated: every
    default space invariant to inversion must return them so, and label them so (``variant_ops``)."""
    from monai_synth.privacy.factory import DEFAULT_SPACES, THREE_D_ONLY, TWO_D_ONLY, make_space

    size = (16,) * dims
    image = torch.rand(1, 1, *size)
    # aligned: an inverted image is put in its own canonical frame (its mass is where the original is dark), so its
    # variants are not the others negated; the search folds them the general way (next test)
    skip = {"embedding", "aligned"} | (THREE_D_ONLY if dims == 2 else TWO_D_ONLY)
    for name in (n for n in DEFAULT_SPACES if n not in skip):
        space = make_space(name, dims, size)
        v = embed_variants(space, image)[0]
        half = len(v) // 2
        assert len(v) % 2 == 0 and np.array_equal(v[half:], -v[:half]), name
        ops = getattr(space, "variant_ops", None)
        if ops is not None:
            assert len(ops) == len(v) and all(op[0] > 0 for op in ops[:half]) and all(op[0] < 0 for op in ops[half:])
            assert [op[1:] for op in ops[:half]] == [op[1:] for op in ops[half:]], name


def test_interleaved_signs_and_duplicates_still_fold_to_the_dense_answer():
    """Variants that are not laid out as halves (a variant, its negation, a duplicate) go through the general fold."""
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((300, 32)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    base = rng.standard_normal((3, 40, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=2, keepdims=True)
    base[1, 5] = -rows[17] * 0.9 + 0.1 * base[1, 5]
    base[1, 5] /= np.linalg.norm(base[1, 5])
    queries = np.concatenate([base, -base, base[:, :3]], axis=1)[:, rng.permutation(83)]  # interleaved, repeated
    vec, own, both = _folded_of(queries)
    assert len(vec) < queries.shape[0] * queries.shape[1] // 2 + 10 and both.any()
    fast = nearest_rows(queries, [rows], [0])
    dense = nearest_rows(queries, [rows], [0], fast=False)
    assert np.array_equal(fast[0], dense[0]) and np.array_equal(fast[1], dense[1]) and fast[1][1] == 17


def _folded_of(queries):
    from monai_synth.privacy.search import _folded

    nq, nv, d = queries.shape
    return _folded(np.ascontiguousarray(queries.reshape(-1, d)), np.repeat(np.arange(nq), nv), nv)


def test_a_large_batch_is_cut_into_chunks_and_answers_as_the_dense_path(monkeypatch):
    """Many candidates at once: the vectors are cut into chunks (each block keeps enough rows), same answers."""
    monkeypatch.setattr("monai_synth.privacy.search._BLOCK_FLOATS", 1 << 14)
    monkeypatch.setattr("monai_synth.privacy.search._MIN_ROWS", 64)
    monkeypatch.setattr("monai_synth.privacy.search._EXACT_FLOATS", 1 << 14)
    monkeypatch.setattr("monai_synth.privacy.search._EXACT_ROWS", 64)
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((1000, 24)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    v = rng.standard_normal((6, 300, 24)).astype(np.float32)
    v[4, 123] = rows[640] + 0.05 * v[4, 123]
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    queries = np.concatenate([v, -v], axis=1)
    for screen in (True, False):
        monkeypatch.setattr("monai_synth.privacy.search.BF16_SCREEN", screen)
        fast = nearest_rows(queries, [rows[:700], rows[700:]], [0, 700])
        dense = nearest_rows(queries, [rows[:700], rows[700:]], [0, 700], fast=False)
        assert np.array_equal(fast[0], dense[0]) and np.array_equal(fast[1], dense[1]) and fast[1][4] == 640


@pytest.mark.parametrize("bf16_screen", [True, False])  # riders ride on the bfloat16 screen or the float32 product
@pytest.mark.parametrize("name", ["pixel", "crops"])
def test_an_images_second_view_rides_on_the_first_views_screen_and_answers_as_the_dense_path(
    phantoms, name, bf16_screen, monkeypatch
):
    monkeypatch.setattr("monai_synth.privacy.search.BF16_SCREEN", bf16_screen)
    from monai_synth.privacy.search import _RIDE_GAP, _ride

    train, patients, unseen = phantoms
    index = TrainingIndex.build(SPACES[name](), train, patients, "dl", shard_size=10)
    # each image's two views as a PNG release judges them (model range, then its own robust range); the last pair
    # is a training image with its brightest pixels clipped, then the training image itself: their answers differ
    encoder = ReleaseEncoder("png", "us")
    pairs = [tuple(encoder.views(np.round((u.numpy() + 1.0) * 127.5))) for u in unseen[:2]]
    pairs.append((train[5].clamp(max=0.85), train[5]))
    vec = embed_variants(index.space, torch.stack([v for pair in pairs for v in pair]))
    q, v, d = vec.shape
    groups = _groups(np.asarray(vec).reshape(q * v, d), np.repeat(np.arange(q), v), True, v)
    for g in groups:
        ridden = _ride(g)
        if g.cols is not None:  # a slot's vectors do not ride: the gap would let nearly every pair through
            assert ridden is g
            continue
        # every second view rides on its first view's vectors, each within its slack
        assert set(ridden.owner.tolist()) == {0, 2, 4} and set(ridden.shadow.owner.tolist()) == {1, 3, 5}
        assert (ridden.slack >= np.linalg.norm(ridden.shadow.full - ridden.full, axis=1)).all()
        assert ridden.slack.max() <= _RIDE_GAP
    distances = _fast_matches_dense(index, vec)[0]
    if name == "pixel":  # the rider found its own, nearer row
        assert distances[5, 0] < 1e-6 < distances[4, 0]
    # views of different images lie far apart: none rides
    vec = embed_variants(index.space, unseen)
    q, v, d = vec.shape
    assert all(_ride(g) is g for g in _groups(np.asarray(vec).reshape(q * v, d), np.repeat(np.arange(q), v), True, v))


@pytest.mark.parametrize("spec", ["pixel", "ball"])
def test_a_volumes_second_view_rides_in_3d_and_answers_as_the_dense_path(spec, monkeypatch):
    from monai_synth.privacy.factory import make_space
    from monai_synth.privacy.search import _ride

    monkeypatch.setattr("monai_synth.privacy.search.BF16_SCREEN", True)
    train = generate_cohort("ct", 6, 1, spatial_dims=3, spatial_size=16, seed=1)
    unseen = generate_cohort("ct", 2, 1, spatial_dims=3, spatial_size=16, seed=1, first_patient=50)
    encoder = ReleaseEncoder("nifti", "ct")
    x = torch.stack([encoder.views(np.asarray(r["image"], np.float32))[0].reshape(1, 16, 16, 16) for r in train])
    space = make_space(spec, 3, (16, 16, 16))
    index = TrainingIndex.build(space, x, [r["patient_id"] for r in train], "dl", shard_size=4)
    stored = [np.asarray(r["image"], np.float32) for r in [*unseen, train[2]]]  # the last: a training volume itself
    vec = embed_variants(space, torch.stack([v.reshape(1, 16, 16, 16) for s in stored for v in encoder.views(s)]))
    q, v, d = vec.shape
    groups = [_ride(g) for g in _groups(np.asarray(vec).reshape(q * v, d), np.repeat(np.arange(q), v), True, v)]
    assert any(g.shadow is not None for g in groups)  # CT volumes' two views lie close enough to ride
    _fast_matches_dense(index, vec)
