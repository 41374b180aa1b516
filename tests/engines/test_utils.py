"""Engines look through DataParallel / DistributedDataParallel wrappers (multi-GPU configs wrap the networks)."""

from __future__ import annotations

import torch
from engine_helpers import LABELS, make_autoencoder, make_dit, make_images
from monai.networks.schedulers import DDIMScheduler
from torch.utils.data import DataLoader

from monai_synth.engines import LatentSampler, compute_scale_factor, unwrap_model
from monai_synth.handlers import EMAWeightsHandler
from monai_synth.inferers import ReconstructionInferer


def test_wrapped_networks_behave_like_the_inner_ones():
    ae, dit = make_autoencoder(), make_dit(randomize=True)
    wrapped_ae, wrapped_dit = torch.nn.DataParallel(ae), torch.nn.DataParallel(dit)
    assert unwrap_model(wrapped_ae) is ae
    loader = DataLoader(make_images(4), batch_size=2)
    assert compute_scale_factor(wrapped_ae, loader) == compute_scale_factor(ae, loader)
    x = make_images(1)[0]["image"][None]
    with torch.no_grad():
        torch.testing.assert_close(ReconstructionInferer()(x, wrapped_ae), ae.reconstruct(x))
    ema = make_dit(seed=5)
    EMAWeightsHandler(wrapped_dit, torch.nn.DataParallel(ema), decay=0.5)
    torch.testing.assert_close(next(ema.parameters()), next(dit.parameters()))

    def sampler(d, a):
        return LatentSampler(d, a, DDIMScheduler(50), 1.0, LABELS, (3, 8, 8), num_inference_steps=2)

    torch.testing.assert_close(sampler(wrapped_dit, wrapped_ae)(2, 0, "3"), sampler(dit, ae)(2, 0, "3"))
