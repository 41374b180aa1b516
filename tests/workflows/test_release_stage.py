"""The release stage's own steps: the grid of released images and the checks before calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_synth.workflows.release import calibrated_safeguard, release_grid


def test_release_grid_has_one_row_per_released_class_in_label_order():
    images = [torch.full((1, 4, 4), v) for v in (1.0, 0.0, 1.0)]
    grid = release_grid(images, ["b", "a", "b"], labels=["a", "b", "c"], per_class=2)
    assert grid.shape == (8, 8) and grid.dtype == np.uint8  # rows a, b (c released nothing); two columns
    assert (grid[:4, :4] == 128).all() and (grid[:4, 4:] == 0).all()  # a: one image, padded with background
    assert (grid[4:] == 255).all()
    assert release_grid([], [], labels=["a"], per_class=2) is None


def test_records_that_do_not_match_the_images_are_refused_before_calibration():
    images = [{"image": torch.zeros(1, 8, 8)}] * 2
    with pytest.raises(ValueError, match="differ in length"):
        calibrated_safeguard(images, images, [{"patient_id": "P0"}], [{"patient_id": "P1"}] * 2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_requests_cover_every_class_once_from_disjoint_seeds(world):
    from monai_synth.workflows.release import shard_requests

    requests = [("3", 5), ("4a", 1), ("5", 0)]
    shares = [shard_requests(requests, rank, world, seed=7, max_retries=2) for rank in range(world)]
    for i, (label, count) in enumerate(requests):
        assert all(share[i][0] == label for share, _ in shares)
        assert sum(share[i][1] for share, _ in shares) == count
    # a rank calls the generator at most once per request and attempt: len(requests) * (max_retries + 1) seeds
    ranges = [set(range(first, first + len(requests) * 3)) for _, first in shares]
    assert shares[0][1] == 7 and all(a.isdisjoint(b) for i, a in enumerate(ranges) for b in ranges[i + 1 :])
