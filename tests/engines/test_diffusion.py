"""Diffusion prepare-batches: targets for DDPM epsilon / v-prediction and rectified flow, condition dropout, trainer."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import LABELS, make_dit
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from torch.utils.data import DataLoader

from monai_synth.engines import (
    LatentDiffusionPrepareBatch,
    RectifiedFlowPrepareBatch,
    ScaleFactor,
    drop_condition,
    make_condition,
    sample_latent_images,
)

K = len(LABELS)


def _batch(n=6):
    gen = torch.Generator().manual_seed(3)
    return {"latent": torch.randn((n, 3, 8, 8), generator=gen), "label": torch.arange(n) % K}


def test_epsilon_target_is_the_noise_on_scaled_latents():
    batch = _batch()
    prep = LatentDiffusionPrepareBatch(100, num_classes=K, cond_drop_prob=0.0, scale_factor=ScaleFactor(0.5))
    inputs, target, args, kwargs = prep(batch, "cpu")
    torch.testing.assert_close(inputs, batch["latent"] * 0.5)
    assert target is kwargs["noise"] and target.shape == inputs.shape
    assert args == () and kwargs["timesteps"].dtype == torch.long
    assert 0 <= int(kwargs["timesteps"].min()) and int(kwargs["timesteps"].max()) < 100
    expected_cond = torch.nn.functional.one_hot(batch["label"], K).float().unsqueeze(1)
    torch.testing.assert_close(kwargs["condition"], expected_cond)


def test_v_prediction_target():
    scheduler = DDPMScheduler(100, prediction_type="v_prediction")
    prep = LatentDiffusionPrepareBatch(100, num_classes=K, prediction_type="v_prediction", scheduler=scheduler)
    x0, target, _, kwargs = prep(_batch(), "cpu")
    a = scheduler.alphas_cumprod[kwargs["timesteps"]].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(target, a.sqrt() * kwargs["noise"] - (1 - a).sqrt() * x0)
    with pytest.raises(ValueError, match="misread"):
        LatentDiffusionPrepareBatch(100, num_classes=K, prediction_type="epsilon", scheduler=scheduler)
    with pytest.raises(ValueError, match="needs the scheduler"):
        LatentDiffusionPrepareBatch(100, num_classes=K, prediction_type="v_prediction")


@pytest.mark.parametrize("discrete", [True, False])
def test_rectified_flow_velocity_matches_the_scheduler_step(discrete):
    scheduler = RFlowScheduler(1000, use_discrete_timesteps=discrete, sample_method="logit-normal")
    prep = RectifiedFlowPrepareBatch(scheduler, num_classes=K, cond_drop_prob=0.0)
    x0, target, _, kwargs = prep(_batch(), "cpu")
    noise, t = kwargs["noise"], kwargs["timesteps"]
    torch.testing.assert_close(target, x0 - noise)
    assert t.is_floating_point() != discrete
    # the scheduler's own integrator, fed the true velocity, lands on x0: the sign convention matches
    x_t = scheduler.add_noise(x0, noise, t)
    scheduler.set_timesteps(10)
    for i in range(x0.shape[0]):
        _, pred_x0 = scheduler.step(target[i : i + 1], float(t[i]), x_t[i : i + 1])
        torch.testing.assert_close(pred_x0, x0[i : i + 1], atol=1e-4, rtol=1e-4)


def test_condition_dropout_rate_and_null_rows():
    torch.manual_seed(0)
    cond = make_condition(torch.arange(4000) % K, K, context=torch.rand(4000, 2))
    assert cond.shape == (4000, 1, K + 2)
    dropped = drop_condition(cond, 0.3)
    null = (dropped == -1).all(dim=-1).squeeze(1)
    assert abs(float(null.float().mean()) - 0.3) < 0.03
    torch.testing.assert_close(dropped[~null], cond[~null])
    prep = LatentDiffusionPrepareBatch(100, num_classes=K, cond_drop_prob=0.5)
    rates = [float((prep(_batch(50), "cpu")[3]["condition"] == -1).all(-1).float().mean()) for _ in range(20)]
    assert abs(sum(rates) / len(rates) - 0.5) < 0.06
    assert float((drop_condition(cond, 0.0) == -1).all(-1).float().mean()) == 0.0


def test_condition_with_continuous_values_and_unknown_classes():
    batch = _batch(3)
    batch["context"] = torch.tensor([[0.1], [0.2], [0.3]])
    prep = LatentDiffusionPrepareBatch(10, num_classes=K, cond_drop_prob=0.0, context_name="context")
    cond = prep(batch, "cpu")[3]["condition"]
    torch.testing.assert_close(cond[:, 0, K:], batch["context"])
    batch["label"] = torch.tensor([0, 1, K])
    with pytest.raises(ValueError, match="out of range"):
        prep(batch, "cpu")


def test_supervised_trainer_with_dit_and_diffusion_inferer():
    dataset = [{"latent": torch.randn(3, 8, 8), "label": torch.tensor(i % K)} for i in range(8)]
    scheduler = RFlowScheduler(1000, use_discrete_timesteps=False)
    net = make_dit()
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=DataLoader(dataset, batch_size=4),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        loss_function=torch.nn.MSELoss(),
        prepare_batch=RectifiedFlowPrepareBatch(scheduler, num_classes=K, cond_drop_prob=0.2, scale_factor=0.8),
        inferer=DiffusionInferer(scheduler),
        decollate=False,
    )
    before = [p.detach().clone() for p in net.parameters()]
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])
    assert trainer.state.iteration == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_trained_model_follows_the_class_condition_and_guidance_strengthens_it():
    """Two classes with latents near -1 and +1: after a short rectified-flow training with condition dropout, the
    samples of each class land on their own side and classifier-free guidance pushes them further apart."""
    torch.manual_seed(0)
    data = [
        {
            "latent": torch.full((3, 8, 8), 1.0 if i % 2 else -1.0) + 0.1 * torch.randn(3, 8, 8),
            "label": torch.tensor(i % 2),
        }
        for i in range(64)
    ]
    scheduler = RFlowScheduler(1000, use_discrete_timesteps=False)
    net = make_dit(num_classes=2)
    SupervisedTrainer(
        device="cpu",
        max_epochs=10,
        train_data_loader=DataLoader(data, batch_size=16, shuffle=True),
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), 2e-3),
        loss_function=torch.nn.MSELoss(),
        prepare_batch=RectifiedFlowPrepareBatch(scheduler, num_classes=2, cond_drop_prob=0.1),
        inferer=DiffusionInferer(scheduler),
        decollate=False,
    ).run()

    class LatentsAsImages(torch.nn.Module):
        def decode_stage_2_outputs(self, z):
            return z

    def class_means(guidance):
        x = sample_latent_images(
            net, LatentsAsImages(), scheduler, 1.0, [0] * 4 + [1] * 4, (3, 8, 8), 2, guidance, num_inference_steps=10
        )
        return float(x[:4].mean()), float(x[4:].mean())

    neg, pos = class_means(None)
    assert neg < -0.4 and pos > 0.4, (neg, pos)
    neg_g, pos_g = class_means(3.0)
    assert pos_g - neg_g > pos - neg


def test_prepare_batch_factory_follows_the_scheduler():
    from monai_synth.engines import diffusion_prepare_batch

    rflow = diffusion_prepare_batch(RFlowScheduler(1000, use_discrete_timesteps=False), num_classes=K)
    assert isinstance(rflow, RectifiedFlowPrepareBatch)
    inputs, target, _, kw = rflow(_batch())
    assert torch.allclose(target, inputs - kw["noise"])  # velocity towards the data
    ddpm = DDPMScheduler(1000, prediction_type="v_prediction")
    v = diffusion_prepare_batch(ddpm, num_classes=K, prediction_type="v_prediction")
    assert type(v) is LatentDiffusionPrepareBatch and v.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="scheduler predicts"):
        diffusion_prepare_batch(ddpm, num_classes=K, prediction_type="epsilon")


def test_warmup_cosine_rises_linearly_then_decays_to_final():
    from monai_synth.engines import WarmupCosine

    f = WarmupCosine(warmup_steps=4, total_steps=14, final=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    opt.step()
    sched.step()
    restored = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0), f)
    restored.load_state_dict(sched.state_dict())  # checkpointable: a callable object, not a lambda
    assert restored.last_epoch == 1 and opt.param_groups[0]["lr"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="final"):
        WarmupCosine(1, 10, final=2.0)


def test_an_extended_run_follows_the_new_schedule_not_the_checkpoints():
    """Resuming with more epochs (a larger total) must decay over the new total, not stay at ``final`` after the old one."""
    import pickle

    from monai_synth.engines import WarmupCosine

    def scheduler(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, total, final=0.0))

    opt, first = scheduler(10)
    for _ in range(10):
        opt.step()
        first.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # the first run ended its decay
    opt, extended = scheduler(20)
    extended.load_state_dict(first.state_dict())
    assert extended.last_epoch == 10 and extended.lr_lambdas[0].total_steps == 20
    opt.step()
    extended.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(WarmupCosine(0, 20)(11)) and opt.param_groups[0]["lr"] > 0.4
    assert pickle.loads(pickle.dumps(WarmupCosine(2, 8, 0.1)))(3) == WarmupCosine(2, 8, 0.1)(3)
