"""The Laplace autoencoder decodes its median deterministically and samples the noise it learned, reproducibly."""

from __future__ import annotations

import functools

import pytest
import torch
from ignite.engine import Events
from tiny_networks import tiny_autoencoder
from torch.utils.data import DataLoader

from monai_synth.engines import AutoencoderKLTrainer
from monai_synth.engines.sampler import LatentSampler
from monai_synth.networks import DiffusionTransformer, LaplaceAutoencoderKL
from monai_synth.networks.autoencoder import laplace_nll


def _ae(seed: int = 0) -> LaplaceAutoencoderKL:
    return tiny_autoencoder(latent_channels=2, network=LaplaceAutoencoderKL, seed=seed)


def test_decode_is_the_location_and_stage_2_decoding_draws_the_predicted_noise():
    ae = _ae().eval()
    z = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        loc, log_scale = ae.decode_distribution(z)
        assert loc.shape == log_scale.shape == (2, 1, 16, 16)
        assert torch.equal(ae.decode(z), loc)
        torch.manual_seed(3)
        a = ae.decode_stage_2_outputs(z)
        torch.manual_seed(3)
        b = ae.decode_stage_2_outputs(z)
        c = ae.decode_stage_2_outputs(z)
        big = ae.decode_stage_2_outputs(z.repeat(200, 1, 1, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded by the global RNG, as the sampler seeds it
    # standardised by the predicted scale, the draws are standard Laplace: E|u| = 1, E u = 0, P(|u| > 3) = e^-3
    u = (big - loc.repeat(200, 1, 1, 1)) / log_scale.exp().repeat(200, 1, 1, 1)
    assert float(u.abs().mean()) == pytest.approx(1.0, abs=0.02)
    assert abs(float(u.mean())) < 0.02
    assert float((u.abs() > 3).float().mean()) == pytest.approx(float(torch.exp(torch.tensor(-3.0))), abs=0.005)


def test_the_nll_is_smallest_at_the_mean_absolute_deviation():
    r = torch.tensor([0.1, -0.3, 0.2, 0.0, -0.2])
    grid = torch.linspace(-4, 0, 401)
    nll = torch.stack([laplace_nll(torch.zeros(5), torch.full((5,), float(s)), r) for s in grid])
    assert float(grid[nll.argmin()].exp()) == pytest.approx(float(r.abs().mean()), rel=0.02)


def test_trainer_learns_a_larger_scale_on_noisier_images():
    torch.manual_seed(0)
    clean = torch.linspace(-0.5, 0.5, 16).reshape(1, 1, 16, 1).expand(16, 1, 16, 16).contiguous()
    scales = {}
    for noise in (0.05, 0.5):
        data = [{"image": img} for img in clean + noise * torch.randn_like(clean)]
        ae = _ae()
        trainer = AutoencoderKLTrainer(
            device="cpu",
            max_epochs=30,
            train_data_loader=DataLoader(data, batch_size=8),
            autoencoder=ae,
            optimizer=torch.optim.Adam(ae.parameters(), 2e-2),
            recon_loss="laplace_nll",
        )
        trainer.run()
        with torch.no_grad():
            scales[noise] = float(ae.decode_distribution(ae.encode(clean[:4])[0])[1].exp().mean())
    assert scales[0.5] > 3 * scales[0.05], scales


def test_loss_and_network_must_match():
    ae = _ae()
    loader = DataLoader([{"image": torch.zeros(1, 16, 16)}], batch_size=1)
    with pytest.raises(ValueError, match="laplace_nll"):
        AutoencoderKLTrainer("cpu", 1, loader, ae, torch.optim.Adam(ae.parameters()), recon_loss="l1")


def test_the_latent_sampler_releases_noisy_draws_reproducibly_from_their_seed():
    from monai.networks.schedulers import RFlowScheduler

    ae = _ae().eval()
    torch.manual_seed(0)
    dit = DiffusionTransformer(
        spatial_dims=2, in_channels=2, out_channels=2, input_size=(8, 8), patch_size=4, hidden_size=16, depth=1,
        num_heads=2, context_dim=2,
    )  # fmt: skip
    sched = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, spatial_dim=2)
    sampler = LatentSampler(dit, ae, sched, 1.0, ["a", "b"], (2, 8, 8), num_inference_steps=2, guidance_scale=2.0)
    a, b, c = sampler(2, seed=5, condition="a"), sampler(2, seed=5, condition="a"), sampler(2, seed=6, condition="a")
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the draw is not the (smooth) location: pixel-to-pixel differences carry the predicted noise
    assert float(a.diff(dim=-1).abs().mean()) > 0


def _correlated_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """A smooth ramp plus noise correlated along the first axis (lag-1 2/3) with a light-tailed (bounded) marginal."""
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(n, 1, 18, 16, generator=g) * 2.0 - 1.0
    noise = (e[:, :, :-2] + e[:, :, 1:-1] + e[:, :, 2:]) / 3.0
    ramp = torch.linspace(-0.5, 0.5, 16).reshape(1, 1, 1, 16)
    return ramp + 0.3 * noise


def _lag1(r: torch.Tensor, axis: int) -> float:
    r = r - r.mean(dim=(-2, -1), keepdim=True)
    a, b = r.narrow(axis, 1, r.shape[axis] - 1), r.narrow(axis, 0, r.shape[axis] - 1)
    return float((a * b).mean() / (r * r).mean())


def _residuals(ae: LaplaceAutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        loc, log_scale = ae.decode_distribution(ae.encode(x)[0])
    return (x - loc) / log_scale.exp()


def test_fitted_noise_has_the_training_residuals_correlation_and_marginal():
    x = _correlated_images()
    ae = tiny_autoencoder(latent_channels=2, network=functools.partial(LaplaceAutoencoderKL, noise="fitted")).eval()
    ae.fit_noise(x.split(16))
    r = _residuals(ae, x)
    torch.manual_seed(0)
    with torch.no_grad():
        drawn = ae.draw_noise((256, 1, 16, 16))
    for axis in (-2, -1):  # the residuals are correlated along the first image axis, nearly white along the second
        assert _lag1(drawn, axis) == pytest.approx(_lag1(r, axis), abs=0.05), axis
    assert _lag1(r, -2) > 0.4
    probs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    assert torch.allclose(torch.quantile(drawn.flatten(), probs), torch.quantile(r.flatten(), probs), atol=0.1)
    # the white Laplace noise of the same network has neither
    white = tiny_autoencoder(latent_channels=2, network=LaplaceAutoencoderKL).eval()
    assert abs(_lag1(white.draw_noise((256, 1, 16, 16)), -2)) < 0.03


def test_fitted_noise_draws_no_more_extreme_values_than_the_training_residuals_have():
    # a quantile table at evenly spaced probabilities spread its last 1/256 of draws evenly up to the sample's most
    # extreme residual: three times too many draws beyond the residuals' 0.1% quantiles (black and white pixels)
    x = _correlated_images(256)
    ae = tiny_autoencoder(latent_channels=2, network=functools.partial(LaplaceAutoencoderKL, noise="fitted")).eval()
    ae.fit_noise(x.split(16))
    r = _residuals(ae, x).flatten()
    torch.manual_seed(0)
    with torch.no_grad():
        drawn = ae.draw_noise((1024, 1, 16, 16)).flatten()
    lo, hi = torch.quantile(r[:: max(1, r.numel() // 2**24)], torch.tensor([0.001, 0.999]))
    assert float((drawn < lo).float().mean()) < 0.002
    assert float((drawn > hi).float().mean()) < 0.002
    assert float(drawn.min()) >= float(r.min()) and float(drawn.max()) <= float(r.max())
    assert 2.5 <= float(ae.noise_score_range) <= 4.0  # the table's ends are quantiles of >= 20 values


def test_a_fitted_table_of_the_earlier_version_is_resampled_on_loading():
    make = functools.partial(LaplaceAutoencoderKL, noise="fitted")
    ae = tiny_autoencoder(latent_channels=2, network=make).eval()
    state = {k: v for k, v in ae.state_dict().items() if k != "noise_score_range"}
    state["noise_quantiles"] = torch.linspace(-5.0, 5.0, 257).unsqueeze(0)  # evenly spaced probabilities
    state["noise_fitted"] = torch.tensor(True)
    ae.load_state_dict(state)
    assert float(ae.noise_score_range) == 4.0
    median, end = ae.noise_quantiles[0, 128], ae.noise_quantiles[0, -1]
    assert float(median) == pytest.approx(0.0, abs=1e-5) and float(end) == pytest.approx(
        5.0 * (1 - 2 * 3.17e-5), abs=1e-3
    )


def test_fitted_noise_draws_are_reproducible_from_the_seed_and_decoded_around_the_location():
    ae = tiny_autoencoder(latent_channels=2, network=functools.partial(LaplaceAutoencoderKL, noise="fitted")).eval()
    ae.fit_noise(_correlated_images().split(16))
    z = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        torch.manual_seed(4)
        a = ae.decode_stage_2_outputs(z)
        torch.manual_seed(4)
        b = ae.decode_stage_2_outputs(z)
        c = ae.decode_stage_2_outputs(z)
        loc = ae.decode(z)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == loc.shape and not torch.equal(a, loc)


def test_the_fitted_noise_model_is_saved_and_loaded_with_the_weights():
    make = functools.partial(LaplaceAutoencoderKL, noise="fitted")
    ae = tiny_autoencoder(latent_channels=2, network=make).eval()
    ae.fit_noise(_correlated_images().split(16))
    state = ae.state_dict()
    assert {"noise_kernel", "noise_quantiles", "noise_fitted", "noise_score_range"} <= set(state)
    loaded = tiny_autoencoder(latent_channels=2, network=make, seed=1).eval()
    loaded.load_state_dict(state)
    torch.manual_seed(2)
    a = ae.draw_noise((2, 1, 16, 16))
    torch.manual_seed(2)
    assert torch.equal(loaded.draw_noise((2, 1, 16, 16)), a)


def test_a_checkpoint_without_a_noise_model_loads_and_fitted_sampling_says_what_to_do():
    old = {k: v for k, v in _ae().state_dict().items() if not k.startswith("noise_")}  # written before it existed
    white = _ae()
    white.load_state_dict(old)
    assert white.draw_noise((1, 1, 4, 4)).shape == (1, 1, 4, 4)
    fitted = tiny_autoencoder(latent_channels=2, network=functools.partial(LaplaceAutoencoderKL, noise="fitted"))
    fitted.load_state_dict(old)
    with pytest.raises(RuntimeError, match="never fitted"):
        fitted.decode_stage_2_outputs(torch.randn(1, 2, 8, 8))


def test_noise_settings_are_checked():
    with pytest.raises(ValueError, match="noise"):
        tiny_autoencoder(network=functools.partial(LaplaceAutoencoderKL, noise="pink"))
    with pytest.raises(ValueError, match="odd"):
        tiny_autoencoder(network=functools.partial(LaplaceAutoencoderKL, noise_kernel_size=4))
    ae = tiny_autoencoder(latent_channels=2, network=functools.partial(LaplaceAutoencoderKL, noise_kernel_size=31))
    with pytest.raises(ValueError, match="smaller than noise_kernel_size"):
        ae.fit_noise([torch.zeros(2, 1, 16, 16)])


def test_the_handler_fits_the_noise_at_the_end_of_stage_1():
    from monai_synth.handlers import DecoderNoiseHandler

    x = _correlated_images(32)
    ae = tiny_autoencoder(latent_channels=2, network=functools.partial(LaplaceAutoencoderKL, noise="fitted"))
    loader = DataLoader([{"image": img} for img in x], batch_size=8)
    trainer = AutoencoderKLTrainer(
        "cpu", 2, loader, ae, torch.optim.Adam(ae.parameters(), 1e-3), recon_loss="laplace_nll"
    )
    fitted_at = []
    DecoderNoiseHandler(ae, loader).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: fitted_at.append(bool(ae.noise_fitted)))
    trainer.run()
    assert fitted_at == [False, True]  # once, after the last iteration: on the trained weights
    assert _lag1(ae.eval().draw_noise((64, 1, 16, 16)), -2) > 0.3
