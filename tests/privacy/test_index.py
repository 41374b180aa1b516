"""TrainingIndex: exact search (checked against numpy), sharding, persistence, and the refusals: a stale fingerprint,
altered files, a load without an expected fingerprint, degenerate vectors."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from monai_synth.privacy.index import DegenerateVectorError, StaleIndexError, TrainingIndex, index_fingerprint
from monai_synth.privacy.safeguard import PrivacySafeguard
from monai_synth.privacy.spaces import PixelSpace, embed_variants, space_distance


@pytest.fixture
def data():
    images = torch.randn(60, 1, 16, 16)
    patients = [f"P{i // 3:03d}" for i in range(60)]
    return images, patients


def _brute(space, train, queries):
    d = space_distance(space.embed(queries), space.embed(train))
    return d.min(axis=1), d.argmin(axis=1)


def test_search_matches_brute_force_numpy(data):
    images, patients = data
    space = PixelSpace(grid=16)
    index = TrainingIndex.build(space, images, patients, "dl")
    queries = images[:10] + 0.8 * torch.randn(10, 1, 16, 16)
    dist, rows, pids = index.query(queries)
    ref_d, ref_r = _brute(space, images, queries)
    np.testing.assert_allclose(dist[:, 0], ref_d, atol=1e-5)
    np.testing.assert_array_equal(rows[:, 0], ref_r)
    assert list(pids[:, 0]) == [patients[r] for r in ref_r]


def test_k_neighbours_are_sorted_and_distinct(data):
    images, patients = data
    index = TrainingIndex.build(PixelSpace(grid=16, invariances=("flip",)), images, patients, "dl")
    dist, rows, _ = index.query(images[:4], k=5)
    assert (np.diff(dist, axis=1) >= -1e-9).all()
    assert all(len(set(r)) == 5 for r in rows)
    assert (dist[:, 0] < 1e-5).all()


@pytest.mark.parametrize("shard_size", [None, 16, 4])
def test_k_neighbours_over_many_variants_are_the_brute_force_best_distinct_rows(data, shard_size):
    # each row's distance is its least over the query's variants; the k best rows are distinct, however many variants
    # find the same row, and shards smaller than k still contribute
    images, patients = data
    space = PixelSpace(grid=16)
    index = TrainingIndex.build(space, images, patients, "dl", batch_size=7, shard_size=shard_size)
    rng = np.random.default_rng(0)
    base = space.embed(images[:5])
    variants = base[:, None, :] + rng.normal(0, 0.6, (5, 40, base.shape[1])).astype(np.float32)
    variants[:, :20] = base[:, None, :] + rng.normal(0, 0.05, (5, 20, base.shape[1])).astype(np.float32)
    variants /= np.linalg.norm(variants, axis=2, keepdims=True)
    dist, rows, pids = index.search(variants, k=6)
    every = np.stack([space_distance(v, space.embed(images)).min(axis=0) for v in variants])  # (queries, rows)
    ref_rows = np.argsort(every, axis=1, kind="stable")[:, :6]
    np.testing.assert_allclose(dist, np.take_along_axis(every, ref_rows, axis=1), atol=1e-5)
    assert (rows[:, 0] == np.arange(5)).all() and all(len(set(r)) == 6 for r in rows)
    assert set(map(tuple, np.sort(rows, axis=1))) == set(map(tuple, np.sort(ref_rows, axis=1)))
    assert [list(p) for p in pids] == [[patients[r] for r in rr] for rr in rows]


def test_sharded_index_gives_the_same_answers(data):
    images, patients = data
    space = PixelSpace(grid=16)
    one = TrainingIndex.build(space, images, patients, "dl")
    sharded = TrainingIndex.build(space, images, patients, "dl", batch_size=7, shard_size=16)
    assert [s.ntotal for s in sharded.shards] == [16, 16, 16, 12]
    q = torch.randn(8, 1, 16, 16)
    for a, b in zip(one.query(q, k=3), sharded.query(q, k=3)):
        if a.dtype == object:
            assert (a == b).all()
        else:
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert one.fingerprint == sharded.fingerprint


def test_build_from_an_iterable_of_batches(data):
    images, patients = data
    loader = ({"image": images[i : i + 25]} for i in range(0, 60, 25))
    index = TrainingIndex.build(PixelSpace(grid=16), loader, patients, "dl")
    assert index.ntotal == 60 and index.patient_set == set(patients)


def test_patient_id_count_must_match(data):
    images, patients = data
    with pytest.raises(ValueError, match="60 training images but 59 patient ids"):
        TrainingIndex.build(PixelSpace(grid=16), images, patients[:-1], "dl")


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(tmp_path, data, mmap):
    images, patients = data
    space = PixelSpace(grid=16)
    index = TrainingIndex.build(space, images, patients, "dl", shard_size=25)
    index.save(tmp_path / "idx")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left
    loaded = TrainingIndex.load(tmp_path / "idx", space=space, expected_fingerprint=index.fingerprint, mmap=mmap)
    assert loaded.fingerprint == index.fingerprint == index_fingerprint("dl", space.fingerprint())
    q = images[5:9] + 0.1
    np.testing.assert_allclose(loaded.query(q)[0], index.query(q)[0], atol=1e-6)
    assert list(loaded.query(q)[2][:, 0]) == patients[5:9]


def test_save_replaces_an_older_index(tmp_path, data):
    images, patients = data
    space = PixelSpace(grid=16)
    TrainingIndex.build(space, images[:30], patients[:30], "old").save(tmp_path / "idx")
    new = TrainingIndex.build(space, images, patients, "new")
    new.save(tmp_path / "idx")
    assert TrainingIndex.load(tmp_path / "idx", expected_fingerprint=new.fingerprint).ntotal == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_stale_index_is_refused(tmp_path, data):
    images, patients = data
    space = PixelSpace(grid=16)
    TrainingIndex.build(space, images, patients, "dl-v1").save(tmp_path / "idx")
    with pytest.raises(StaleIndexError, match="datalist or the privacy space changed"):
        TrainingIndex.load(tmp_path / "idx", expected_fingerprint=index_fingerprint("dl-v2", space.fingerprint()))
    fingerprint = index_fingerprint("dl-v1", space.fingerprint())
    with pytest.raises(StaleIndexError, match="rebuild the index with this space"):
        TrainingIndex.load(tmp_path / "idx", space=PixelSpace(grid=8), expected_fingerprint=fingerprint)
    with pytest.raises(FileNotFoundError, match="no training index"):
        TrainingIndex.load(tmp_path / "missing", expected_fingerprint=fingerprint)


def test_load_needs_the_expected_fingerprint(tmp_path, data):
    images, patients = data
    space = PixelSpace(grid=16)
    TrainingIndex.build(space, images, patients, "dl").save(tmp_path / "idx")
    with pytest.raises(TypeError, match="needs expected_fingerprint=.*index_fingerprint"):
        TrainingIndex.load(tmp_path / "idx", space=space)
    with pytest.raises(TypeError, match="non-empty string"):
        TrainingIndex.load(tmp_path / "idx", space=space, expected_fingerprint="")


def _saved(tmp_path, data, shard_size=25):
    images, patients = data
    space = PixelSpace(grid=16)
    index = TrainingIndex.build(space, images, patients, "dl", shard_size=shard_size)
    index.save(tmp_path / "idx")
    return tmp_path / "idx", space, index.fingerprint


def test_meta_records_a_sha256_of_every_file(tmp_path, data):
    directory, _, _ = _saved(tmp_path, data)
    meta = json.loads((directory / "meta.json").read_text())
    assert sorted(meta["sha256"]) == ["patient_codes.npy", "shard_000.faiss", "shard_001.faiss", "shard_002.faiss"]
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("mmap", [False, True])
def test_a_shard_from_another_index_is_refused(tmp_path, data, mmap):
    directory, space, fingerprint = _saved(tmp_path, data)
    images, patients = data
    # same datalist fingerprint and shapes, other contents: the metadata alone cannot tell
    TrainingIndex.build(space, images.flip(0), patients, "dl", shard_size=25).save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "shard_001.faiss", directory / "shard_001.faiss")
    with pytest.raises(StaleIndexError, match=r"contents of shard_001\.faiss differ from the sha256"):
        TrainingIndex.load(directory, space=space, expected_fingerprint=fingerprint, mmap=mmap)


def test_an_edited_patient_table_or_list_is_refused(tmp_path, data):
    directory, space, fingerprint = _saved(tmp_path, data)
    codes = np.load(directory / "patient_codes.npy")
    np.save(directory / "patient_codes.npy", codes[::-1].copy())
    with pytest.raises(StaleIndexError, match=r"contents of patient_codes\.npy differ"):
        TrainingIndex.load(directory, space=space, expected_fingerprint=fingerprint)
    directory, space, fingerprint = _saved(tmp_path, data)
    meta = json.loads((directory / "meta.json").read_text())
    meta["patients"][0] = "SOMEONE-ELSE"
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StaleIndexError, match="patient list in meta.json"):
        TrainingIndex.load(directory, space=space, expected_fingerprint=fingerprint)


def test_a_missing_shard_or_an_index_without_hashes_is_refused(tmp_path, data):
    directory, space, fingerprint = _saved(tmp_path, data)
    (directory / "shard_002.faiss").unlink()
    with pytest.raises(StaleIndexError, match=r"shard_002\.faiss \(missing\)"):
        TrainingIndex.load(directory, space=space, expected_fingerprint=fingerprint)
    directory, space, fingerprint = _saved(tmp_path, data)
    meta = json.loads((directory / "meta.json").read_text())
    del meta["sha256"]
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StaleIndexError, match="does not record a sha256"):
        TrainingIndex.load(directory, space=space, expected_fingerprint=fingerprint)
    meta["format_version"] = 1
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StaleIndexError, match="has format 1.*rebuild it"):
        TrainingIndex.load(directory, space=space, expected_fingerprint=fingerprint)


def test_a_meta_fingerprint_that_does_not_follow_from_its_datalist_is_refused(tmp_path, data):
    directory, space, fingerprint = _saved(tmp_path, data)
    meta = json.loads((directory / "meta.json").read_text())
    meta["datalist_fingerprint"] = "another-datalist"  # "fingerprint" still says the expected one
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StaleIndexError, match="inconsistent metadata"):
        TrainingIndex.load(directory, space=space, expected_fingerprint=fingerprint)


def test_query_without_a_space_or_with_wrong_vectors_fails(tmp_path, data):
    images, patients = data
    index = TrainingIndex.build(PixelSpace(grid=16), images, patients, "dl")
    index.save(tmp_path / "idx")
    with pytest.raises(StaleIndexError, match="no privacy space"):
        TrainingIndex.load(tmp_path / "idx", expected_fingerprint=index.fingerprint).query(images[:2])
    with pytest.raises(ValueError, match="d=256"):
        index.search(np.zeros((2, 10), dtype=np.float32))


class _UnderflowingSpace:
    """A pixel space that returns a zero vector for images marked by a corner value, as an underflowing space would."""

    name = "pixel"
    MARK = 1234.0

    def __init__(self):
        self.pixel = PixelSpace(grid=16)

    def fingerprint(self):
        return "underflowing-" + self.pixel.fingerprint()

    def embed(self, images):
        vec = self.pixel.embed(images)
        vec[np.asarray(torch.as_tensor(images)[:, 0, 0, 0] == self.MARK)] = 0.0
        return vec


@pytest.mark.parametrize("bad", [0.0, np.inf, np.nan, 1e-40])
def test_a_degenerate_query_vector_is_an_error_not_a_distance(data, bad):
    images, patients = data
    index = TrainingIndex.build(PixelSpace(grid=16), images, patients, "dl")
    vectors = PixelSpace(grid=16).embed(images[:5])
    vectors[[1, 3]] *= np.float32(bad)
    with pytest.raises(DegenerateVectorError, match=r"query rows \[1, 3\] have a vector with no direction") as err:
        index.search(vectors)
    assert err.value.rows == [1, 3] and isinstance(err.value, ValueError)
    # one bad variant is enough to refuse the query image: its minimum over the variants is undefined
    variants = np.stack([PixelSpace(grid=16).embed(images[:3])] * 2, axis=1)
    variants[2, 1] = 0.0
    with pytest.raises(DegenerateVectorError, match=r"query rows \[2\]"):
        index.search(variants)


def test_any_finite_vector_keeps_its_direction_however_large_or_small(data):
    images, patients = data
    index = TrainingIndex.build(PixelSpace(grid=16), images, patients, "dl")
    vectors = PixelSpace(grid=16).embed(images[:4]).astype(np.float64)
    for scale in (1e20, 1e-25, 1e300):  # float32 normalisation would turn the first two into zero vectors
        dist, rows, _ = index.search(vectors * scale)
        np.testing.assert_array_equal(rows[:, 0], [0, 1, 2, 3])
        assert (dist[:, 0] < 1e-5).all()


def test_a_training_image_with_a_degenerate_vector_cannot_be_indexed(data):
    images, patients = data
    images = images.clone()
    images[[7, 41], 0, 0, 0] = _UnderflowingSpace.MARK
    with pytest.raises(DegenerateVectorError, match=r"cannot index training images 7 \(P002\), 41 \(P013\):") as err:
        TrainingIndex.build(_UnderflowingSpace(), images, patients, "dl", batch_size=16)  # every one named
    assert err.value.rows == [7, 41]


def test_the_safeguard_fails_a_degenerate_image_closed_and_judges_the_others(data):
    images, patients = data
    index = TrainingIndex.build(_UnderflowingSpace(), images, patients, "dl")
    safeguard = PrivacySafeguard([(index, 0.05)])
    queries = images[:3].clone()  # exact copies: all must be rejected
    queries[1, 0, 0, 0] = _UnderflowingSpace.MARK  # its vector underflows to zero: distance 1 if normalised blindly
    results = safeguard.check(queries)
    assert not any(r.passed for r in results)
    assert "DegenerateVectorError" in results[1].reason and "too close" in results[0].reason
    assert np.isnan(results[1].distances["pixel"])


@pytest.mark.parametrize("shard_size", [None, 16])
def test_nearest_two_patients_matches_brute_force(data, shard_size, monkeypatch):
    """The specificity test's bound: nearest row, and nearest row of another patient, exact over every shard and block
    (blocks of a few rows, so the merge across blocks is what is tested)."""
    images, patients = data
    space = PixelSpace(grid=16)
    index = TrainingIndex.build(space, images, patients, "dl", shard_size=shard_size)
    queries = torch.cat([images[[4, 30]] + 0.05 * torch.randn(2, 1, 16, 16), torch.randn(6, 1, 16, 16)])
    vec = space.embed(queries)
    d = space_distance(vec, space.embed(images))
    codes = np.array([int(p[1:]) for p in patients])
    for step_bits in (22, 5):  # one block per shard, then blocks of 4 rows for 8 queries
        monkeypatch.setattr(TrainingIndex, "_TWO_PATIENT_BLOCK", 1 << step_bits)
        rows, near, other = index.nearest_two_patients(vec)
        np.testing.assert_array_equal(rows, d.argmin(axis=1))
        np.testing.assert_allclose(near, d.min(axis=1), atol=1e-5)
        own = codes[d.argmin(axis=1)]
        ref = np.where(codes[None, :] == own[:, None], np.inf, d).min(axis=1)
        np.testing.assert_allclose(other, ref, atol=1e-5)
    assert rows[0] == 4 and rows[1] == 30 and (other[:2] > near[:2]).all()


def test_unit_rows_are_taken_as_they_are_and_others_are_normalised_or_refused():
    from monai_synth.privacy.index import _unit_rows

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    same, bad = _unit_rows(x)
    assert same is x and not bad.any()  # already unit: no copy
    y = x.copy()
    y[1] *= 1.01
    y[2] *= 1e30
    y[3] = 0.0
    y[4, 0] = np.inf
    out, bad = _unit_rows(y)
    assert out is not y and bad.tolist() == [False, False, False, True, True]
    np.testing.assert_allclose(out[:3], x[:3], rtol=1e-5, atol=1e-6)


def test_a_kept_bfloat16_copy_of_the_rows_gives_the_same_answers(data, monkeypatch):
    """The screen reads a bfloat16 copy of the rows the index keeps (made once), or converts them block by block
    when the copy would be too large: the answers are the same either way, and as the dense product's."""
    monkeypatch.setattr("monai_synth.privacy.search.BF16_SCREEN", True)
    images, patients = data
    space = PixelSpace(grid=16, invariances=("flip", "shift", "invert"), max_shift=1)
    index = TrainingIndex.build(space, images, patients, "dl", shard_size=25)
    q = embed_variants(space, images[[3, 40]] + 0.3 * torch.randn(2, 1, 16, 16))
    kept = index.nearest(q)
    assert set(index._rows16_kept) == {0, 1, 2} and index._rows16_kept[0].dtype == torch.bfloat16
    monkeypatch.setattr(TrainingIndex, "_ROWS16_BYTES", 0)
    assert index._rows16(0) is None
    converted = index.nearest(q)
    index.fast_search = False
    dense = index.nearest(q)
    for a, b, c in zip(kept, converted, dense):
        assert (a == b).all() and (a == c).all()
