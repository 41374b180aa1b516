"""Resume: changed hyper-parameters are refused or applied explicitly; killed runs' leftovers are cleaned."""

from __future__ import annotations

import os
import time

import pytest
import torch
from engine_helpers import make_autoencoder, make_images
from ignite.engine import Events
from monai.handlers import CheckpointLoader, LrScheduleHandler
from torch.utils.data import DataLoader

from monai_synth.engines import AutoencoderKLTrainer
from monai_synth.engines.checkpoint import CheckpointMetadata, LegacyCheckpointError, latest_checkpoint
from monai_synth.engines.diffusion import WarmupCosine
from monai_synth.engines.resume import ResumeMismatchError, TrainingParams, remove_leftovers, resume_state
from monai_synth.handlers import AtomicCheckpointSaver, IterationSeedHandler

#: warm-up over 2 iterations, cosine to 0.1 at iteration 8 (the bundle's LambdaLR schedule)
SCHEDULE = WarmupCosine(2, 8, 0.1)


def _run(tmp_path, max_epochs, lr=1e-3, batch_size=2, apply="refuse", resume=False, schedule=False, legacy="refuse"):
    ae = make_autoencoder(0)
    opt = torch.optim.Adam(ae.parameters(), lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(2, 8, 0.1)) if schedule else None
    trainer = AutoencoderKLTrainer(
        "cpu",
        max_epochs,
        DataLoader(make_images(4), batch_size=batch_size),
        ae,
        opt,
        train_handlers=[IterationSeedHandler(0)]
        + ([LrScheduleHandler(scheduler, print_lr=False, epoch_level=False)] if schedule else []),
    )
    params = TrainingParams(
        {"lr": lr, "batch_size": batch_size}, learning_rates={"lr": opt}, apply_changes=apply, lr_schedulers=[scheduler]
    )
    metadata = CheckpointMetadata(bundle="b", extra={"training_split": "split-digest"}, legacy=legacy)
    save_dict = {"autoencoder": ae, "optimizer": opt, "training_params": params, "trainer": trainer}
    save_dict["metadata"] = metadata
    if schedule:
        save_dict["lr_scheduler"] = scheduler
    if resume:
        path = latest_checkpoint(tmp_path, "checkpoint")
        CheckpointLoader(path, resume_state(path, save_dict, metadata)).attach(trainer)
        params.attach(trainer)
    AtomicCheckpointSaver(str(tmp_path), save_dict, save_interval=1, n_saved=1).attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(opt.param_groups[0]["lr"]))
    return trainer, seen


def test_a_changed_learning_rate_is_refused_before_any_iteration(tmp_path):
    _run(tmp_path, 2)[0].run()
    trainer, seen = _run(tmp_path, 3, lr=2e-3, resume=True)
    with pytest.raises(ResumeMismatchError, match=r"lr: checkpoint 0\.001, this run 0\.002.*--resume_changes apply"):
        trainer.run()
    assert seen == []


def test_a_changed_learning_rate_is_applied_when_asked(tmp_path):
    _run(tmp_path, 2)[0].run()
    trainer, seen = _run(tmp_path, 3, lr=2e-3, apply="apply", resume=True)
    trainer.run()
    assert seen == [2e-3, 2e-3]  # without the check the restored optimiser would train on at 1e-3


def test_an_applied_learning_rate_is_used_along_the_restored_schedule(tmp_path):
    first, seen_first = _run(tmp_path, 2, schedule=True)
    first.run()
    assert seen_first == pytest.approx([1e-3 * SCHEDULE(i) for i in range(4)])
    trainer, seen = _run(tmp_path, 4, lr=2e-3, apply="apply", resume=True, schedule=True)
    trainer.run()
    # iterations 5..8 at the new peak rate along the same warm-up/cosine; the restored LambdaLR's base rate (1e-3)
    # must not bring the old rate back at its next step
    assert seen == pytest.approx([2e-3 * SCHEDULE(i) for i in range(4, 8)])


def test_a_changed_batch_size_is_refused_even_when_applying(tmp_path):
    _run(tmp_path, 2)[0].run()
    trainer, seen = _run(tmp_path, 3, batch_size=4, apply="apply", resume=True)
    with pytest.raises(ResumeMismatchError, match=r"batch_size: checkpoint 2, this run 4"):
        trainer.run()
    assert seen == []


def test_unchanged_values_resume(tmp_path):
    _run(tmp_path, 2)[0].run()
    trainer, seen = _run(tmp_path, 3, resume=True)
    trainer.run()
    assert seen == [1e-3, 1e-3]


def test_a_resumed_run_removes_the_killed_runs_checkpoint_and_temporary_files(tmp_path):
    _run(tmp_path, 2)[0].run()
    old = time.time() - 3600
    leftovers = [tmp_path / "tmpab12cd_3", tmp_path / ".train_latents.pt.0a1b2c3d.partial"]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
        os.utime(path, (old, old))
    mine = tmp_path / "tmpnotmine9"  # not Ignite's pattern: kept
    mine.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_epoch=2.pt"]
    trainer, _ = _run(tmp_path, 4, resume=True)
    trainer.run()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_epoch=4.pt"]
    assert not any(p.exists() for p in leftovers) and mine.exists()


def test_leftovers_newer_than_this_process_are_kept(tmp_path):
    fresh = tmp_path / ".cache.pt.0a1b2c3d.partial"  # may be another process's write in progress
    fresh.write_bytes(b"x")
    assert remove_leftovers(tmp_path) == [] and fresh.exists()


def _as_written_before_the_fingerprints(tmp_path):
    """The newest checkpoint as an earlier version wrote it: no training_params, no training_split."""
    path = latest_checkpoint(tmp_path, "checkpoint")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["training_params"], ckpt["metadata"]["training_split"]
    torch.save(ckpt, path)
    return path


def test_a_checkpoint_of_an_earlier_version_is_refused_saying_how_to_go_on(tmp_path):
    _run(tmp_path, 2)[0].run()
    path = _as_written_before_the_fingerprints(tmp_path)
    written = open(path, "rb").read()
    with pytest.raises(
        LegacyCheckpointError, match=r"did not record \['training_split'\].*--legacy_checkpoints accept"
    ):
        _run(tmp_path, 3, resume=True)
    assert open(path, "rb").read() == written  # refused before anything could replace it


def test_a_checkpoint_of_an_earlier_version_resumes_when_accepted(tmp_path, caplog):
    _run(tmp_path, 2)[0].run()
    _as_written_before_the_fingerprints(tmp_path)
    trainer, seen = _run(tmp_path, 3, resume=True, legacy="accept")
    trainer.run()
    assert len(seen) == 2 and trainer.state.iteration == 6  # epoch 3 only: the weights and counters were restored
    assert "without its ['training_params']" in caplog.text and "records no ['training_split']" in caplog.text
    resumed = torch.load(latest_checkpoint(tmp_path, "checkpoint"), weights_only=True)
    assert resumed["metadata"]["training_split"] == "split-digest" and "training_params" in resumed


def test_an_earlier_versions_final_checkpoint_is_refused_by_the_next_stage_unless_accepted():
    stored = {"bundle": "b", "labels": ["a"]}
    with pytest.raises(LegacyCheckpointError, match="training_split"):
        CheckpointMetadata(bundle="b", extra={"training_split": "x"}).check(stored)
    CheckpointMetadata(bundle="b", extra={"training_split": "x"}, legacy="accept").check(stored)
    with pytest.raises(ValueError, match="bundle: checkpoint has 'b'"):  # a real mismatch is never accepted
        CheckpointMetadata(bundle="c", extra={"training_split": "x"}, legacy="accept").check(stored)
    with pytest.raises(ValueError, match="'refuse' or 'accept'"):
        CheckpointMetadata(legacy="maybe")
