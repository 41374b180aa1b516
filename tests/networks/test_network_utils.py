"""The one size check of the autoencoder + DiT geometry."""

from __future__ import annotations

import pytest

from monai_synth.networks.utils import check_spatial_size


def test_spatial_size_the_autoencoder_cannot_downsample_is_refused():
    assert check_spatial_size(16, (8, 8, 8)) == (4,)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*2 = 4"):
        check_spatial_size((16, 18), (8, 8, 8))


def test_check_spatial_size_names_a_size_that_works():
    assert check_spatial_size([256, 256], [64, 128, 256, 256], patch_size=2, spatial_dims=2) == (32, 32)
    with pytest.raises(ValueError, match="multiple of 16.*Use e.g. 240 or 256"):
        check_spatial_size([250, 256], [64, 128, 256, 256], patch_size=2)


def test_an_int_size_is_repeated_over_spatial_dims():
    assert check_spatial_size(64, [8, 16], patch_size=2, spatial_dims=3) == (32, 32, 32)
    with pytest.raises(ValueError, match="has 3 axes but spatial_dims is 2"):
        check_spatial_size([64, 64, 64], [8, 16], spatial_dims=2)
