"""TrainingIndex: exact search (checked against numpy), sharding, persistence and stale-fingerprint refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.privacy.index import StaleIndexError, TrainingIndex, index_fingerprint
from monai_synth.privacy.spaces import PixelSpace, space_distance


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
    TrainingIndex.build(space, images, patients, "new").save(tmp_path / "idx")
    assert TrainingIndex.load(tmp_path / "idx").ntotal == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_stale_index_is_refused(tmp_path, data):
    images, patients = data
    space = PixelSpace(grid=16)
    TrainingIndex.build(space, images, patients, "dl-v1").save(tmp_path / "idx")
    with pytest.raises(StaleIndexError, match="datalist or the privacy space changed"):
        TrainingIndex.load(tmp_path / "idx", expected_fingerprint=index_fingerprint("dl-v2", space.fingerprint()))
    with pytest.raises(StaleIndexError, match="rebuild the index with this space"):
        TrainingIndex.load(tmp_path / "idx", space=PixelSpace(grid=8))
    with pytest.raises(FileNotFoundError, match="no training index"):
        TrainingIndex.load(tmp_path / "missing")


def test_query_without_a_space_or_with_wrong_vectors_fails(tmp_path, data):
    images, patients = data
    index = TrainingIndex.build(PixelSpace(grid=16), images, patients, "dl")
    index.save(tmp_path / "idx")
    with pytest.raises(StaleIndexError, match="no privacy space"):
        TrainingIndex.load(tmp_path / "idx").query(images[:2])
    with pytest.raises(ValueError, match="d=256"):
        index.search(np.zeros((2, 10), dtype=np.float32))
