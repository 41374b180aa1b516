"""Atomic checkpoint saver: an interrupted write never leaves a truncated checkpoint, nor none."""

from __future__ import annotations

import pickle

import pytest
import torch
from ignite.engine import Engine, Events

from monai_synth.engines import CheckpointMetadata, checkpoint_fingerprint
from monai_synth.handlers import AtomicCheckpointSaver

META = {"bundle": "breast_us_ldit", "modality": "us", "labels": ("3", "4a", "4b"), "spatial_size": 16}


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")


class _Breakable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.broken = False

    def state_dict(self, *args, **kwargs):
        return {"x": _Unpicklable()} if self.broken else {"x": torch.ones(1)}


def test_saver_is_atomic_and_a_failed_write_keeps_the_previous_file(tmp_path):
    obj = _Breakable()
    saver = AtomicCheckpointSaver(str(tmp_path), {"obj": obj}, save_final=True, final_filename="final.pt")
    saver.completed(_engine_at(1))
    good = checkpoint_fingerprint(tmp_path / "final.pt")
    obj.broken = True
    with pytest.raises((RuntimeError, pickle.PicklingError)):
        saver.completed(_engine_at(2))
    assert checkpoint_fingerprint(tmp_path / "final.pt") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt"], "temporary file left behind"


def test_interval_checkpoint_is_replaced_only_after_its_successor_is_written(tmp_path):
    obj = _Breakable()
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"obj": obj, "meta": CheckpointMetadata(**META)}, save_interval=1, n_saved=1, epoch_level=True
    )
    saver.interval_completed(_engine_at(1, epoch=1))
    obj.broken = True
    with pytest.raises((RuntimeError, pickle.PicklingError)):
        saver.interval_completed(_engine_at(2, epoch=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]
    obj.broken = False
    saver.interval_completed(_engine_at(3, epoch=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt"]


def _engine_at(iteration, epoch=1):
    engine = Engine(lambda e, b: None)
    engine.state.iteration = iteration
    engine.state.epoch = epoch
    return engine


def test_a_rerun_of_a_finished_stage_keeps_its_final_checkpoint(tmp_path):
    def run(resumed_at_the_end: bool) -> int:
        engine = Engine(lambda e, b: None)
        if resumed_at_the_end:  # what CheckpointLoader does at STARTED with a finished stage's checkpoint
            engine.add_event_handler(Events.STARTED, lambda e: e.state.__dict__.update(epoch=2, iteration=4))
        AtomicCheckpointSaver(str(tmp_path), {"obj": _Breakable()}, save_final=True, final_filename="final.pt").attach(
            engine
        )
        engine.run([0, 1], max_epochs=2)
        return (tmp_path / "final.pt").stat().st_mtime_ns

    written = run(resumed_at_the_end=False)
    assert run(resumed_at_the_end=True) == written  # nothing trained: the file (and its fingerprint) stays
    assert run(resumed_at_the_end=False) != written  # a run that trains writes it again


def test_a_finished_stage_leaves_a_resumable_checkpoint_of_its_end_when_the_interval_does_not_divide_it(tmp_path):
    def run() -> Engine:
        engine = Engine(lambda e, b: None)
        saver = AtomicCheckpointSaver(
            str(tmp_path), {"obj": _Breakable()}, save_final=True, final_filename="final.pt", save_interval=2,
            epoch_level=True, n_saved=1,
        )  # fmt: skip
        saver.attach(engine)
        engine.run([0, 1], max_epochs=3)
        return engine

    run()
    # epochs 3 of 3 with an interval of 2: the end is saved too, and the epoch-2 checkpoint is no longer kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "obj_epoch=3.pt"]


#: the bundle's saver: interval checkpoints, a final file, and a checkpoint on exceptions (e.g. Ctrl-C)
FINAL = {"epoch_level": True, "save_final": True, "final_filename": "final.pt"}


def test_a_resume_refused_while_starting_leaves_the_checkpoint_it_refused(tmp_path):
    def refuse(engine):
        raise ValueError("resume refused")

    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path), {"obj": _Breakable()}, save_interval=1, n_saved=1, **FINAL).attach(engine)
    engine.run([0, 1], max_epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "obj_epoch=2.pt"]
    kept = checkpoint_fingerprint(tmp_path / "obj_epoch=2.pt")
    resumed = Engine(lambda e, b: None)
    resumed.add_event_handler(Events.STARTED, refuse)  # CheckpointLoader raising (a refused or unreadable resume)
    AtomicCheckpointSaver(str(tmp_path), {"obj": _Breakable()}, save_interval=1, n_saved=1, **FINAL).attach(resumed)
    with pytest.raises(ValueError, match="resume refused"):
        resumed.run([0, 1], max_epochs=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "obj_epoch=2.pt"]
    assert checkpoint_fingerprint(tmp_path / "obj_epoch=2.pt") == kept
