"""The Laplace autoencoder decodes its median deterministically and samples the noise it learned, reproducibly."""

from __future__ import annotations

import pytest
import torch
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
