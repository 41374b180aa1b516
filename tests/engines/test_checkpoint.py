"""Checkpoints: atomic writes, metadata checks before training, and exact resume of both stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import LABELS, make_autoencoder, make_discriminator, make_dit, make_images
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointLoader, LrScheduleHandler, StatsHandler
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import RFlowScheduler
from torch.utils.data import DataLoader

from monai_synth.engines import (
    AutoencoderKLTrainer,
    CheckpointMetadata,
    CheckpointMismatchError,
    RectifiedFlowPrepareBatch,
    ScaleFactor,
    load_checkpoint,
)
from monai_synth.engines.checkpoint import latest_checkpoint
from monai_synth.handlers import AtomicCheckpointSaver, EMAWeightsHandler, IterationSeedHandler, ScaleFactorHandler

META = {"bundle": "breast_us_ldit", "modality": "us", "labels": LABELS, "spatial_size": 16}


class _Interrupt(Exception):
    pass


def _interrupt_at_epoch(trainer, epoch):
    def _raise(engine):
        if engine.state.epoch == epoch:
            raise _Interrupt

    trainer.add_event_handler(Events.EPOCH_STARTED, _raise)


def test_metadata_mismatch_is_refused_before_any_iteration(tmp_path):
    path = tmp_path / "ae.pt"
    ae = make_autoencoder()
    torch.save({"autoencoder": ae.state_dict(), "metadata": CheckpointMetadata(**META).state_dict()}, path)
    other = make_autoencoder(seed=3)
    before = [p.detach().clone() for p in other.parameters()]
    expected = CheckpointMetadata(bundle="chest_ct_ldit", modality="ct", labels=("normal", "nodule"), spatial_size=16)
    loader = CheckpointLoader(str(path), {"metadata": expected, "autoencoder": other})
    trainer = AutoencoderKLTrainer(
        "cpu",
        1,
        DataLoader(make_images(4), batch_size=2),
        other,
        torch.optim.Adam(other.parameters()),
        train_handlers=[loader],
    )
    with pytest.raises(CheckpointMismatchError) as err:
        trainer.run()
    assert "modality: checkpoint has 'us', this run expects 'ct'" in str(err.value)
    assert "labels" in str(err.value) and "bundle" in str(err.value)
    assert trainer.state.iteration == 0
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


def test_missing_stage_one_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the autoencoder stage"):
        load_checkpoint(tmp_path / "autoencoder.pt", {"autoencoder": make_autoencoder()})
    torch.save({"autoencoder": make_autoencoder().state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointMismatchError, match="no 'metadata'"):
        load_checkpoint(tmp_path / "bare.pt", metadata=CheckpointMetadata(**META))
    with pytest.raises(KeyError, match="scale_factor"):
        load_checkpoint(tmp_path / "bare.pt", {"scale_factor": ScaleFactor()})


def _ae_run(tmp_path, max_epochs, seed, resume_from=None, interrupt_at=None):
    ae, disc, sf = make_autoencoder(seed), make_discriminator(seed), ScaleFactor()
    opt, d_opt = torch.optim.Adam(ae.parameters(), 1e-3), torch.optim.Adam(disc.parameters(), 1e-3)
    loader = DataLoader(make_images(4), batch_size=2, shuffle=False)
    handlers = [IterationSeedHandler(0), ScaleFactorHandler(ae, loader, sf)]
    trainer = AutoencoderKLTrainer(
        "cpu",
        max_epochs,
        loader,
        ae,
        opt,
        discriminator=disc,
        disc_optimizer=d_opt,
        adv_warmup_epochs=1,
        train_handlers=handlers,
    )
    save_dict = {
        "autoencoder": ae,
        "discriminator": disc,
        "optimizer": opt,
        "disc_optimizer": d_opt,
        "scale_factor": sf,
        "trainer": trainer,
        "metadata": CheckpointMetadata(stage="autoencoder", **META),
    }
    AtomicCheckpointSaver(str(tmp_path), save_dict, save_interval=1, n_saved=None).attach(trainer)
    if resume_from is not None:
        CheckpointLoader(str(resume_from), save_dict).attach(trainer)
    if interrupt_at is not None:
        _interrupt_at_epoch(trainer, interrupt_at)
    return trainer, ae, disc, sf


def test_autoencoder_stage_resumes_exactly(tmp_path):
    reference, ae_ref, disc_ref, sf_ref = _ae_run(tmp_path / "ref", 3, seed=0)
    reference.run()

    interrupted, *_ = _ae_run(tmp_path / "run", 3, seed=0, interrupt_at=3)
    with pytest.raises(_Interrupt):
        interrupted.run()
    ckpt = tmp_path / "run" / "checkpoint_epoch=2.pt"
    assert ckpt.is_file()

    resumed, ae, disc, sf = _ae_run(tmp_path / "run", 3, seed=9, resume_from=ckpt)
    iterations = []
    resumed.add_event_handler(Events.ITERATION_STARTED, lambda e: iterations.append(e.state.iteration))
    resumed.run()
    assert iterations == [5, 6], "the resumed run must continue after the checkpoint's last iteration"
    for a, b in zip(ae_ref.state_dict().values(), ae.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(disc_ref.state_dict().values(), disc.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert float(sf) == pytest.approx(float(sf_ref), rel=1e-6)


def _dit_run(tmp_path, max_epochs, seed, resume_from=None, interrupt_at=None):
    torch.manual_seed(100)
    data = [{"latent": torch.randn(3, 8, 8), "label": torch.tensor(i % len(LABELS))} for i in range(8)]
    scheduler = RFlowScheduler(1000, use_discrete_timesteps=False)
    net, ema = make_dit(seed), make_dit(seed + 50)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    lr = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=DataLoader(data, batch_size=4, shuffle=True),
        network=net,
        optimizer=opt,
        loss_function=torch.nn.MSELoss(),
        prepare_batch=RectifiedFlowPrepareBatch(scheduler, num_classes=len(LABELS), cond_drop_prob=0.3),
        inferer=DiffusionInferer(scheduler),
        train_handlers=[
            IterationSeedHandler(1),
            EMAWeightsHandler(net, ema, decay=0.9),
            LrScheduleHandler(lr, print_lr=False),
        ],
        decollate=False,
    )
    save_dict = {"network": net, "ema": ema, "optimizer": opt, "lr_scheduler": lr, "trainer": trainer}
    AtomicCheckpointSaver(str(tmp_path), save_dict, save_interval=1, n_saved=1).attach(trainer)
    if resume_from is not None:
        CheckpointLoader(str(resume_from), save_dict).attach(trainer)
    if interrupt_at is not None:
        _interrupt_at_epoch(trainer, interrupt_at)
    return trainer, net, ema, lr


def test_diffusion_stage_resumes_exactly_with_ema_and_lr_schedule(tmp_path):
    reference, net_ref, ema_ref, lr_ref = _dit_run(tmp_path / "ref", 4, seed=0)
    reference.run()
    interrupted, *_ = _dit_run(tmp_path / "run", 4, seed=0, interrupt_at=3)
    with pytest.raises(_Interrupt):
        interrupted.run()
    resumed, net, ema, lr = _dit_run(
        tmp_path / "run", 4, seed=7, resume_from=tmp_path / "run" / "checkpoint_epoch=2.pt"
    )
    resumed.run()
    assert resumed.state.iteration == reference.state.iteration == 8
    assert lr.get_last_lr() == lr_ref.get_last_lr()
    for ref, got in ((net_ref, net), (ema_ref, ema)):
        for a, b in zip(ref.state_dict().values(), got.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), ema.parameters()))


class _FailingL1(torch.nn.Module):
    """An L1 'perceptual' term that raises (like a Ctrl-C) on its ``fail_at``-th call, i.e. inside an iteration."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def forward(self, a, b):
        self.calls += 1
        if self.calls == self.fail_at:
            raise _Interrupt
        return (a - b).abs().mean()


def _ae_final_run(tmp_path, seed, fail_at=None, resume=False):
    ae = make_autoencoder(seed)
    opt = torch.optim.Adam(ae.parameters(), 1e-3)
    loader = DataLoader(make_images(4), batch_size=4)  # one iteration per epoch
    trainer = AutoencoderKLTrainer(
        "cpu",
        4,
        loader,
        ae,
        opt,
        perceptual_loss=_FailingL1(fail_at),
        perceptual_weight=0.1,
        train_handlers=[IterationSeedHandler(0)],
    )
    save_dict = {"autoencoder": ae, "optimizer": opt, "trainer": trainer}
    AtomicCheckpointSaver(str(tmp_path), save_dict, save_final=True, final_filename="final.pt").attach(trainer)
    if resume:
        CheckpointLoader(str(tmp_path / "final.pt"), save_dict).attach(trainer)
    return trainer, ae


def test_checkpoint_saved_on_an_interruption_inside_an_iteration_resumes_without_skipping_it(tmp_path):
    reference, ae_ref = _ae_final_run(tmp_path / "ref", 0)
    reference.run()
    interrupted, _ = _ae_final_run(tmp_path / "run", 0, fail_at=3)
    with pytest.raises(_Interrupt):
        interrupted.run()
    assert interrupted.state.iteration == 3
    assert torch.load(tmp_path / "run" / "final.pt", weights_only=True)["trainer"]["iteration"] == 2
    resumed, ae = _ae_final_run(tmp_path / "run", 5, resume=True)
    iterations = []
    resumed.add_event_handler(Events.ITERATION_STARTED, lambda e: iterations.append(e.state.iteration))
    resumed.run()
    assert iterations == [3, 4]
    for a, b in zip(ae_ref.state_dict().values(), ae.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


class _CtrlC(torch.nn.Module):
    """An L1 'perceptual' term that raises KeyboardInterrupt on its ``at``-th call, i.e. inside an iteration."""

    def __init__(self, at=None):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, a, b):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return (a - b).abs().mean()


def _ae_stats_run(tmp_path, seed, ctrl_c_at=None, resume_from=None):
    """The bundle's arrangement: StatsHandler among the trainer's handlers, the saver attached afterwards."""
    ae = make_autoencoder(seed)
    opt = torch.optim.Adam(ae.parameters(), 1e-3)
    loader = DataLoader(make_images(4), batch_size=2)  # two iterations per epoch
    trainer = AutoencoderKLTrainer(
        "cpu",
        3,
        loader,
        ae,
        opt,
        perceptual_loss=_CtrlC(ctrl_c_at),
        perceptual_weight=0.1,
        train_handlers=[IterationSeedHandler(0), StatsHandler(name=None, iteration_log=False)],
    )
    save_dict = {"autoencoder": ae, "optimizer": opt, "trainer": trainer}
    if resume_from:
        CheckpointLoader(resume_from, save_dict).attach(trainer)
    saver = AtomicCheckpointSaver(
        str(tmp_path), save_dict, save_interval=1, n_saved=1, save_final=True, final_filename="autoencoder.pt"
    )
    saver.attach(trainer)
    return trainer, ae


def test_ctrl_c_saves_a_checkpoint_the_rerun_resumes_from(tmp_path):
    run = tmp_path / "run"
    interrupted, ae_stopped = _ae_stats_run(run, 0, ctrl_c_at=6)  # inside iteration 6, i.e. epoch 3
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    assert not (run / "autoencoder.pt").exists(), "an interrupted stage must not look finished to the next stage"
    latest = latest_checkpoint(run, "checkpoint")
    assert latest.endswith("checkpoint_epoch=3.pt")
    assert torch.load(latest, weights_only=True)["trainer"]["iteration"] == 5
    resumed, ae = _ae_stats_run(run, 7, resume_from=latest)
    started = []

    def _first_iteration(engine):
        if not started:  # the resumed run starts from the weights of the interrupted one: no epoch is lost
            for a, b in zip(ae_stopped.state_dict().values(), ae.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        started.append(engine.state.iteration)

    resumed.add_event_handler(Events.ITERATION_STARTED, _first_iteration)
    resumed.run()
    # iteration 6 is run again (it was interrupted before its optimiser step); mid-epoch, Ignite restarts the data
    # iterator, so only epoch-level resumes replay the exact batches (see IterationSeedHandler)
    assert started == [6] and (run / "autoencoder.pt").is_file()


def test_latest_checkpoint_prefers_the_highest_epoch(tmp_path):
    assert latest_checkpoint(tmp_path / "none") == ""
    for name in ("checkpoint_epoch=2.pt", "checkpoint_epoch=10.pt", "autoencoder.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert Path(latest_checkpoint(tmp_path, "checkpoint")).name == "checkpoint_epoch=10.pt"
