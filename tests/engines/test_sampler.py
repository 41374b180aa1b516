"""Sampler: model-space images of the right shape, reproducible by seed, different per class, guarded-sampling ready."""

from __future__ import annotations

import inspect

import pytest
import torch
from engine_helpers import LABELS, make_autoencoder, make_dit
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from monai_synth.engines import LatentSampler, ScaleFactor, sample_latent_images


def _sampler(scheduler=None, **kwargs):
    return LatentSampler(
        diffusion_model=make_dit(randomize=True),
        autoencoder=make_autoencoder(),
        scheduler=scheduler or DDIMScheduler(100),
        scale_factor=ScaleFactor(0.9),
        labels=LABELS,
        latent_shape=(3, 8, 8),
        num_inference_steps=4,
        **kwargs,
    )


@pytest.mark.parametrize(
    "scheduler",
    [DDPMScheduler(100), DDIMScheduler(100), RFlowScheduler(100, use_discrete_timesteps=False)],
    ids=["ddpm", "ddim", "rflow"],
)
def test_shape_seed_and_class(scheduler):
    sampler = _sampler(scheduler, guidance_scale=3.0)
    a = sampler(3, seed=7, condition="4a")
    assert a.shape == (3, 1, 16, 16) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(sampler(3, seed=7, condition="4a"), a, rtol=0, atol=0)
    assert not torch.allclose(sampler(3, seed=8, condition="4a"), a)
    assert (sampler(3, seed=7, condition="3") - a).abs().mean() > 1e-3, "class condition has no effect"


def test_batches_in_chunks_and_keeps_global_rng():
    sampler = _sampler(batch_size=2)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    images = sampler(5, seed=0, condition=1)
    assert images.shape == (5, 1, 16, 16)
    assert torch.equal(torch.rand(1), expected_next), "sampling changed the caller's random state"


def test_guidance_changes_the_samples_and_one_means_none():
    sampler = _sampler()
    plain = sampler(2, 0, "4b")
    torch.testing.assert_close(sampler(2, 0, "4b", guidance_scale=1.0), plain)
    assert not torch.allclose(sampler(2, 0, "4b", guidance_scale=4.0), plain)


def test_guidance_applies_only_within_its_interval_of_timesteps():
    rflow = RFlowScheduler(100, use_discrete_timesteps=False)
    plain = _sampler(rflow)(2, 0, "4b")
    guided = _sampler(rflow, guidance_scale=4.0)(2, 0, "4b")
    # an interval holding every step is plain guidance; one holding none is no guidance at all
    whole = _sampler(rflow, guidance_scale=4.0, guidance_interval=(0.0, 1.0))(2, 0, "4b")
    torch.testing.assert_close(whole, guided, rtol=0, atol=0)
    empty = _sampler(rflow, guidance_scale=4.0, guidance_interval=(0.0, 0.001))(2, 0, "4b")
    # the conditional half of a doubled batch: equal up to float32 rounding (some CPUs' kernels round by batch size)
    torch.testing.assert_close(empty, plain)
    # without the noisiest steps: guided elsewhere, so neither of the two
    part = _sampler(rflow, guidance_scale=4.0, guidance_interval=(0.0, 0.6))(2, 0, "4b")
    assert not torch.allclose(part, guided) and not torch.allclose(part, plain)
    for bad in [(0.8, 0.2), (0.0, 1.5), (0.5,), (-0.1, 0.5)]:
        with pytest.raises(ValueError, match="guidance_interval"):
            _sampler(rflow, guidance_scale=4.0, guidance_interval=bad)


def test_unknown_labels_and_options_are_refused():
    sampler = _sampler()
    with pytest.raises(ValueError, match="not known"):
        sampler(1, 0, "4c")
    with pytest.raises(TypeError, match="unknown guidance"):
        sampler(1, 0, "3", temperature=2)
    with pytest.raises(ValueError, match="n must be"):
        sampler(0, 0, "3")


def test_generate_contract_of_guarded_sampling():
    """``guarded_sample`` passes ``guidance_scale=`` only to generators that accept it."""
    params = inspect.signature(_sampler()).parameters
    assert list(params)[:3] == ["n", "seed", "condition"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_sample_latent_images_decodes_scaled_latents():
    """With a model that predicts zero velocity, RF sampling returns the noise: the image is decode(noise / scale)."""

    class Still(torch.nn.Module):
        def forward(self, x, timesteps, context=None):
            return torch.zeros_like(x)

    ae = make_autoencoder()
    images = sample_latent_images(
        Still(), ae, RFlowScheduler(100), 2.0, labels=[0, 1], latent_shape=(3, 8, 8), num_classes=2, seed=5
    )
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(images, ae.decode(noise / 2.0))


def test_drives_guarded_sampling_and_memorised_images_are_resampled():
    from monai_synth.privacy.index import TrainingIndex
    from monai_synth.privacy.safeguard import PrivacySafeguard
    from monai_synth.privacy.sampling import guarded_sample
    from monai_synth.privacy.spaces import PixelSpace

    sampler = _sampler(DDIMScheduler(100))  # DDIM with eta 0: a seed fixes the images
    memorised = sampler(2, 0, "4a", guidance_scale=3.0)
    gen = torch.Generator().manual_seed(1)
    train = torch.cat([memorised, torch.rand((10, 1, 16, 16), generator=gen) * 2 - 1])
    index = TrainingIndex.build(PixelSpace(grid=16), train, [f"P{i}" for i in range(len(train))], "datalist")
    result = guarded_sample(sampler, PrivacySafeguard([(index, 0.01)]), [("4a", 2)], seed=0, guidance_scale=3.0)
    assert [(r.seed, r.passed) for r in result.records] == [(0, False), (0, False), (1, True), (1, True)]
    torch.testing.assert_close(torch.stack(result.images), sampler(2, 1, "4a", guidance_scale=3.0))
