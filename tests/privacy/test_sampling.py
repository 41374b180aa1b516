"""guarded_sample around MONAI's DiffusionInferer.sample with a tiny DiT: reject, resample, count."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler

from monai_synth.networks import DiffusionTransformer
from monai_synth.privacy.index import TrainingIndex
from monai_synth.privacy.safeguard import PrivacySafeguard
from monai_synth.privacy.sampling import guarded_sample
from monai_synth.privacy.spaces import PixelSpace


@pytest.fixture(scope="module")
def generate():
    torch.manual_seed(0)
    model = DiffusionTransformer.from_preset(
        "tiny", spatial_dims=2, in_channels=1, out_channels=1, input_size=16, context_dim=1
    ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=20)  # deterministic: a seed fixes the image
    scheduler.set_timesteps(5)
    inferer = DiffusionInferer(scheduler)
    calls = []

    def _generate(n, seed, condition, guidance_scale=None):
        calls.append({"n": n, "seed": seed, "condition": condition, "guidance_scale": guidance_scale})
        noise = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
        ctx = torch.full((n, 1, 1), float(condition))
        return inferer.sample(
            noise, model, scheduler, conditioning=ctx, mode="crossattn", cfg=guidance_scale, verbose=False
        )

    _generate.calls = calls
    return _generate


def _safeguard(train):
    index = TrainingIndex.build(PixelSpace(grid=16), train, [f"P{i}" for i in range(len(train))], "dl")
    return PrivacySafeguard([(index, 0.05)])


def test_memorised_outputs_are_resampled_with_new_seeds(generate):
    with torch.no_grad():
        memorised = generate(2, 0, 1.0, guidance_scale=3.0)  # the generator "memorised" what seed 0 gives
    safeguard = _safeguard(torch.cat([memorised, torch.randn(20, 1, 16, 16)]))
    generate.calls.clear()
    result = guarded_sample(
        generate, safeguard, [(1.0, 2), (0.0, 1)], max_retries=3, seed=0, guidance_scale=3.0, guidance_decay=0.5
    )
    assert [(c["n"], c["seed"], c["guidance_scale"]) for c in generate.calls] == [(2, 0, 3.0), (2, 1, 1.5), (1, 2, 3.0)]
    assert [(r.seed, r.attempt, r.passed) for r in result.records] == [
        (0, 0, False),
        (0, 0, False),
        (1, 1, True),
        (1, 1, True),
        (2, 0, True),
    ]
    summary = result.summary()
    assert summary["generated"] == 5 and summary["rejected"] == 2 and summary["released"] == 3
    assert summary["unreleased"] == 0 and summary["extra_sampling_cost"] == pytest.approx(5 / 3 - 1)
    # each record says how to regenerate its image
    with torch.no_grad():
        again = generate(2, 1, 1.0, guidance_scale=1.5)
    torch.testing.assert_close(torch.stack(result.images[:2]), again)
    assert [r.condition for r in result.released_records] == [1.0, 1.0, 0.0]


def test_retry_budget_then_unreleased_is_counted():
    train = torch.randn(4, 1, 8, 8)
    safeguard = _safeguard(train)
    copier = lambda n, seed, condition: train[:n] * 2.0 + 1.0  # noqa: E731 - always a (rescaled) copy
    result = guarded_sample(copier, safeguard, [("a", 3), ("b", 1)], max_retries=2)
    s = result.summary()
    assert s["released"] == 0 and s["unreleased"] == 4 and s["generated"] == 12 and s["rejected"] == 12
    assert result.images == [] and s["extra_sampling_cost"] == float("inf")
    assert max(r.attempt for r in result.records) == 2


def test_nan_images_are_never_released():
    safeguard = _safeguard(torch.randn(10, 1, 8, 8))
    broken = lambda n, seed, condition: torch.full((n, 1, 8, 8), float("nan"))  # noqa: E731
    s = guarded_sample(broken, safeguard, [(0, 2)], max_retries=1).summary()
    assert s["released"] == 0 and s["unreleased"] == 2
    assert list(s["rejection_reasons"]) == ["invalid image: image contains NaN or Inf values"]


def test_max_batch_splits_generator_calls():
    safeguard = _safeguard(torch.randn(10, 1, 8, 8))
    sizes = []

    def gen(n, seed, condition):
        sizes.append(n)
        return torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed + 100))

    result = guarded_sample(gen, safeguard, [(0, 5)], max_batch=2)
    assert sizes == [2, 2, 1] and len(result.images) == 5
    assert len({r.seed for r in result.records}) == 3


def test_bad_arguments_fail_early():
    safeguard = _safeguard(torch.randn(10, 1, 8, 8))
    gen = lambda n, seed, condition: torch.randn(n, 1, 8, 8)  # noqa: E731
    with pytest.raises(ValueError, match="no 'guidance_scale' keyword"):
        guarded_sample(gen, safeguard, [(0, 1)], guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_decay needs"):
        guarded_sample(gen, safeguard, [(0, 1)], guidance_decay=0.5)
    with pytest.raises(ValueError, match="PrivacySafeguard"):
        guarded_sample(gen, None, [(0, 1)])
    with pytest.raises(ValueError, match="not 3 images"):
        guarded_sample(lambda n, seed, condition: torch.randn(1, 1, 8, 8), safeguard, [(0, 3)])
