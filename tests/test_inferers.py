"""Sliding-window decoding: volumes larger than the autoencoder decodes at once, stitched from latent windows."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AutoencoderKL
from tiny_networks import tiny_autoencoder

from monai_synth.inferers import SlidingWindowDecoder


def _autoencoder() -> AutoencoderKL:
    return tiny_autoencoder(spatial_dims=3, channels=(4, 8), latent_channels=2).eval()


def test_a_latent_within_the_window_is_decoded_in_one_pass():
    ae, z = _autoencoder(), torch.randn(1, 2, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(SlidingWindowDecoder(ae, (4, 4, 4)).decode_stage_2_outputs(z), ae.decode(z))


def _without_norms(ae: AutoencoderKL) -> AutoencoderKL:
    """The decoder's group norms take statistics over whatever they see, so a window is normalised unlike the whole
    volume; without them the decoder is a local convolution network and windows must stitch to the one-pass result."""
    for module in list(ae.decoder.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, child_name, torch.nn.Identity())
    return ae


def test_a_larger_latent_is_decoded_window_by_window_to_the_full_volume():
    ae = _without_norms(_autoencoder())
    # windows decode to what the whole decodes to, apart from the windows' borders
    z = torch.nn.functional.interpolate(torch.randn(1, 2, 3, 3, 3), size=(12, 12, 12), mode="trilinear")
    with torch.no_grad():
        whole = ae.decode(z)
        windowed = SlidingWindowDecoder(ae, (8, 8, 8), overlap=0.5).decode_stage_2_outputs(z)
    assert windowed.shape == whole.shape == (1, 1, 24, 24, 24)
    assert torch.isfinite(windowed).all()
    inner = (slice(None), slice(None), *[slice(4, 20)] * 3)
    corr = torch.corrcoef(torch.stack([windowed[inner].flatten(), whole[inner].flatten()]))[0, 1]
    assert corr > 0.9, f"windowed decoding differs from one-pass decoding (correlation {corr:.3f})"


def test_a_window_of_the_wrong_dimensionality_is_refused():
    with pytest.raises(ValueError, match="does not match"):
        SlidingWindowDecoder(_autoencoder(), (4, 4)).decode_stage_2_outputs(torch.randn(1, 2, 8, 8, 8))
