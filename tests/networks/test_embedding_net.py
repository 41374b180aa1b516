from __future__ import annotations

import pytest
import torch

from monai_synth.networks import PatientEmbeddingNet
from monai_synth.networks.embedding import rank_normalise


@pytest.mark.parametrize("spatial_dims, size", [(2, 16), (3, 8)])
def test_output_is_unit_length_and_sized(spatial_dims, size):
    net = PatientEmbeddingNet(spatial_dims, channels=(8, 16), out_dim=12).eval()
    x = torch.randn(3, 1, *(size,) * spatial_dims)
    y = net(x)
    assert y.shape == (3, 12)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))


def test_vector_depends_only_on_its_image():
    """In eval mode the same image gives the same vector whatever else is in the batch."""
    net = PatientEmbeddingNet(2, channels=(8, 16), out_dim=8).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        together = net(x)
        alone = torch.cat([net(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_different_images_give_different_vectors_and_gradients_flow():
    net = PatientEmbeddingNet(2, channels=(8, 16), out_dim=8)
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    y = net(x)
    assert not torch.allclose(y[0], y[1])
    (y[0] @ y[1]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_multichannel_input():
    net = PatientEmbeddingNet(2, in_channels=2, channels=(8,), out_dim=4).eval()
    assert net(torch.randn(1, 2, 8, 8)).shape == (1, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),
        ({"spatial_dims": 2, "in_channels": 0}, "in_channels"),
        ({"spatial_dims": 2, "channels": ()}, "channels"),
        ({"spatial_dims": 2, "channels": (8, 0)}, "channels"),
        ({"spatial_dims": 2, "out_dim": 0}, "out_dim"),
        ({"spatial_dims": 2, "num_res_units": 0}, "num_res_units"),
        ({"spatial_dims": 2, "dropout": 1.0}, "dropout"),
        ({"spatial_dims": 2, "input_norm": "zscore"}, "input_norm"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatientEmbeddingNet(**kwargs)


def test_input_shape_errors_name_the_expected_shape():
    net = PatientEmbeddingNet(2, channels=(8, 16), out_dim=4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="1 input channel"):
        net(torch.randn(1, 3, 8, 8))
    assert net.min_size == 2


def test_rank_input_ignores_monotone_contrast_changes():
    """Gamma, gain and offset keep the order of the values, so the ranked network cannot see them."""
    net = PatientEmbeddingNet(2, channels=(8, 16), out_dim=8, input_norm="rank").eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        plain = net(x)
        torch.testing.assert_close(net(((x + 1) / 2) ** 2.2 * 2 - 1), plain)
        torch.testing.assert_close(net(3.0 * x + 0.5), plain)
        assert not torch.allclose(net(-x), plain)  # inversion is the query variants' job, not the ranking's


def test_rank_normalise_uses_mid_ranks_and_negates_with_the_image():
    x = torch.tensor([[[[-1.0, -1.0, 0.5, 0.2]]], [[[4.0, 3.0, 2.0, 1.0]]]])
    torch.testing.assert_close(rank_normalise(x)[0].flatten(), torch.tensor([-2 / 3, -2 / 3, 1.0, 1 / 3]))
    torch.testing.assert_close(rank_normalise(x)[1].flatten(), torch.tensor([1.0, 1 / 3, -1 / 3, -1.0]))
    torch.testing.assert_close(rank_normalise(-x), -rank_normalise(x))
    volume = torch.randn(2, 2, 4, 4, 4)
    assert rank_normalise(volume).shape == volume.shape and rank_normalise(volume).abs().max() <= 1.0
