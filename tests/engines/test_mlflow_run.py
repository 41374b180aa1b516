"""A stage's MLflow run ends KILLED on Ctrl-C and is continued, not duplicated, by the resume."""

from __future__ import annotations

import mlflow
import pytest
import torch
from engine_helpers import make_autoencoder, make_images
from ignite.engine import Events
from monai.handlers import CheckpointLoader, MLFlowHandler, StatsHandler
from torch.utils.data import DataLoader

from monai_synth.engines import AutoencoderKLTrainer
from monai_synth.engines.checkpoint import latest_checkpoint
from monai_synth.handlers import AtomicCheckpointSaver, IterationSeedHandler
from monai_synth.handlers.mlflow_run import MLflowRunLink


def _stage(tmp_path, uri, run_name, max_epochs, ctrl_c_at=None, params=None):
    ae = make_autoencoder(0)
    opt = torch.optim.Adam(ae.parameters(), 1e-3)
    trainer = AutoencoderKLTrainer(
        "cpu",
        max_epochs,
        DataLoader(make_images(4), batch_size=2),
        ae,
        opt,
        train_handlers=[IterationSeedHandler(0), StatsHandler(name=None, iteration_log=False)],
    )
    if ctrl_c_at is not None:

        def _ctrl_c(engine):
            if engine.state.iteration == ctrl_c_at:
                raise KeyboardInterrupt

        trainer.add_event_handler(Events.ITERATION_COMPLETED, _ctrl_c)
    tracker = MLFlowHandler(
        tracking_uri=uri,
        experiment_name="stage",
        run_name=run_name,
        experiment_param=params or {"lr": "0.001", "max_epochs": str(max_epochs)},
        iteration_log=True,
        epoch_log=False,
        output_transform=lambda output: output[0]["loss"],
        close_on_complete=True,
    )
    link = MLflowRunLink([tracker])
    save_dict = {"autoencoder": ae, "optimizer": opt, "mlflow_run": link, "trainer": trainer}
    resume = latest_checkpoint(tmp_path, "checkpoint")
    if resume:
        CheckpointLoader(resume, save_dict).attach(trainer)
    AtomicCheckpointSaver(str(tmp_path), save_dict, save_interval=1, n_saved=1, save_final=True).attach(trainer)
    link.attach(trainer)
    tracker.attach(trainer)
    return trainer


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _runs(uri):
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("stage")
    return client, client.search_runs([experiment.experiment_id])


def test_ctrl_c_ends_the_run_and_the_resume_continues_it(tmp_path, uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(KeyboardInterrupt):
        _stage(tmp_path, uri, "first", 3, ctrl_c_at=3).run()
    client, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["KILLED"]
    _stage(tmp_path, uri, "second", 4, params={"lr": "0.001", "max_epochs": "4"}).run()
    client, runs = _runs(uri)
    assert len(runs) == 1, "the resume must continue the interrupted run, not start another"
    run = runs[0]
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.data.params["max_epochs"] == "3" and run.data.tags["resumed.max_epochs"] == "4"
    # one loss per iteration, none twice: iteration 3 was interrupted before it was logged and is trained again
    assert [m.step for m in client.get_metric_history(run.info.run_id, "Loss")] == list(range(1, 9))
