"""Feature spaces: fixed by their seed, named with a weights hash, loadable from a user's TorchScript file."""

from __future__ import annotations

import pytest
import torch

from monai_synth.evaluation.features import FeatureSpace, random_feature_space, trained_feature_space


def test_random_space_is_fixed_by_its_seed():
    images = torch.randn(3, 1, 16, 16)
    a, b, c = random_feature_space(2, seed=0), random_feature_space(2, seed=0), random_feature_space(2, seed=1)
    assert a.weights_hash == b.weights_hash != c.weights_hash
    assert torch.equal(a(images), b(images))
    assert a.describe()["name"] == "random(resnet, seed=0)"


def test_saved_space_loads_as_user_weights_with_the_same_features(tmp_path):
    space = random_feature_space(2, seed=3)
    images = torch.randn(4, 1, 16, 16)
    loaded = FeatureSpace.from_weights(space.save(tmp_path / "features.pt"), spatial_dims=2)
    assert loaded.name == "weights(features.pt)"
    torch.testing.assert_close(loaded(images), space(images))


def test_user_weights_that_are_not_torchscript_are_refused(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="TorchScript"):
        FeatureSpace.from_weights(path, spatial_dims=2)


def test_2d_space_embeds_volumes_tri_planar():
    space = random_feature_space(2, seed=0)
    feats = space(torch.randn(2, 1, 16, 16, 16))
    assert feats.shape == (2, 3 * 128)


def test_trained_space_separates_the_classes_better_than_chance():
    torch.manual_seed(0)
    y = torch.tensor([0, 1] * 16)
    images = torch.randn(32, 1, 16, 16) * 0.3
    images[y == 1, :, 4:12, 4:12] += 1.5  # class 1 has a bright square
    space = trained_feature_space(images, y.tolist(), spatial_dims=2, epochs=5, seed=0)
    feats = space(images)
    centroid = torch.stack([feats[y == c].mean(0) for c in (0, 1)])
    nearest = torch.cdist(feats, centroid).argmin(1)
    assert (nearest == y).float().mean() > 0.9
    assert space.weights_hash != random_feature_space(2, seed=0).weights_hash
