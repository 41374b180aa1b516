"""Stage-1 trainer: losses, output keys, adversarial warm-up, perceptual loss from a local file, validation, errors."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_autoencoder, make_discriminator, make_images
from ignite.contrib.handlers import ProgressBar
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanAbsoluteError, StatsHandler, ValidationHandler, from_engine
from torch.utils.data import DataLoader

from monai_synth.engines import AutoencoderKLTrainer, AutoencoderPrepareBatch
from monai_synth.inferers import ReconstructionInferer
from monai_synth.losses import LocalPerceptualLoss

OUTPUT_KEYS = {
    "image",
    "label",
    "pred",
    "loss",
    "recon_loss",
    "kl_loss",
    "perceptual_loss",
    "gen_adv_loss",
    "disc_loss",
}


def _trainer(max_epochs=1, lr=1e-3, data=None, batch_size=4, **kwargs):
    ae = kwargs.pop("autoencoder", None) or make_autoencoder()
    loader = DataLoader(data or make_images(8), batch_size=batch_size)
    disc = kwargs.pop("discriminator", None)
    d_opt = torch.optim.Adam(disc.parameters(), lr) if disc is not None else None
    trainer = AutoencoderKLTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        autoencoder=ae,
        optimizer=torch.optim.Adam(ae.parameters(), lr),
        discriminator=disc,
        disc_optimizer=d_opt,
        **kwargs,
    )
    history = []

    def _record(engine):
        out = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
        history.append({k: float(v) for k, v in out.items() if k.endswith("loss")})

    trainer.add_event_handler(Events.ITERATION_COMPLETED, _record)
    return trainer, ae, history


def test_loss_decreases_and_output_keys():
    trainer, _, history = _trainer(max_epochs=6, lr=1e-2, decollate=False)
    trainer.run()
    assert set(trainer.state.output) == OUTPUT_KEYS
    assert trainer.state.output["pred"].shape == trainer.state.output["image"].shape == (4, 1, 16, 16)
    first = sum(h["recon_loss"] for h in history[:2]) / 2
    last = sum(h["recon_loss"] for h in history[-2:]) / 2
    assert last < 0.7 * first, (first, last)
    # without a discriminator the adversarial losses stay exactly zero
    assert all(h["gen_adv_loss"] == 0 and h["disc_loss"] == 0 for h in history)


def test_decollated_output_works_with_monai_loss_transforms():
    """The default (decollated) output is what ``--tracking mlflow`` and StatsHandler configs read."""
    trainer, _, history = _trainer()
    StatsHandler(name=None, output_transform=from_engine(["loss"], first=True)).attach(trainer)
    trainer.run()
    items = trainer.state.output
    assert isinstance(items, list) and len(items) == 4
    assert all(set(item) == OUTPUT_KEYS and item["image"].shape == (1, 16, 16) for item in items)
    loss = from_engine(["loss"], first=True)(items)
    assert isinstance(loss, float) and loss == pytest.approx(history[-1]["loss"])  # decollate turns scalars into floats


def test_stock_monai_metric_handlers_read_the_trainer_output():
    trainer, _, _ = _trainer(data=make_images(4))  # one iteration: the epoch metric is the last output's
    MeanAbsoluteError(output_transform=from_engine(["pred", "label"])).attach(trainer, "train_l1")
    trainer.run()
    out = trainer.state.output
    expected = torch.stack([(o["pred"] - o["label"]).abs().mean() for o in out]).mean()
    assert trainer.state.metrics["train_l1"] == pytest.approx(float(expected), rel=1e-5)
    assert all(torch.equal(o["label"], o["image"]) for o in out)


def test_total_loss_is_weighted_sum():
    trainer, _, history = _trainer(kl_weight=0.01, recon_weight=2.0)
    trainer.run()
    for h in history:
        assert h["loss"] == pytest.approx(2.0 * h["recon_loss"] + 0.01 * h["kl_loss"], rel=1e-5)


def test_adversarial_warmup_is_honoured():
    disc = make_discriminator()
    d_before = [p.detach().clone() for p in disc.parameters()]
    trainer, _, history = _trainer(max_epochs=2, discriminator=disc, adv_warmup_epochs=1, adv_weight=0.5)
    d_after_epoch1 = {}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED(once=1),
        lambda e: d_after_epoch1.update(p=[p.detach().clone() for p in disc.parameters()]),
    )
    trainer.run()
    warm, adv = history[:2], history[2:]
    assert all(h["gen_adv_loss"] == 0 and h["disc_loss"] == 0 for h in warm)
    assert all(torch.equal(a, b) for a, b in zip(d_before, d_after_epoch1["p"])), "D trained during warm-up"
    assert all(h["gen_adv_loss"] > 0 and h["disc_loss"] > 0 for h in adv)
    assert any(not torch.equal(a, b) for a, b in zip(d_after_epoch1["p"], disc.parameters())), "D never trained"
    for h in adv:
        assert h["loss"] == pytest.approx(h["recon_loss"] + 1e-6 * h["kl_loss"] + 0.5 * h["gen_adv_loss"], rel=1e-5)


def test_perceptual_loss_is_weighted_into_the_generator_loss(tmp_path):
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
    path = tmp_path / "features.pt"
    torch.jit.script(features).save(str(path))
    with pytest.raises(ValueError, match="perceptual_loss"):
        _trainer(perceptual_weight=1.0)
    trainer, _, history = _trainer(perceptual_loss=LocalPerceptualLoss(path), perceptual_weight=0.5)
    trainer.run()
    assert all(h["perceptual_loss"] > 0 for h in history)
    assert history[0]["loss"] == pytest.approx(
        history[0]["recon_loss"] + 1e-6 * history[0]["kl_loss"] + 0.5 * history[0]["perceptual_loss"], rel=1e-5
    )


def test_spatial_size_the_autoencoder_cannot_downsample():
    with pytest.raises(ValueError, match="divisible"):
        _trainer(spatial_size=15)
    # the first batch is checked before any update
    data = [{"image": torch.rand(1, 15, 15), "label": "3"} for _ in range(4)]
    trainer, ae, _ = _trainer(data=data)
    before = [p.detach().clone() for p in ae.parameters()]
    with pytest.raises(ValueError, match="cannot be used"):
        trainer.run()
    assert trainer.state.iteration <= 1
    assert all(torch.equal(a, b) for a, b in zip(before, ae.parameters()))


def test_argument_checks():
    with pytest.raises(ValueError, match="disc_optimizer"):
        AutoencoderKLTrainer(
            "cpu", 1, [], make_autoencoder(), torch.optim.SGD([torch.zeros(1)], 0.1), discriminator=make_discriminator()
        )
    with pytest.raises(ValueError, match="recon_loss"):
        _trainer(recon_loss="huber")
    with pytest.raises(ValueError, match="kl_weight"):
        _trainer(kl_weight=-1)


def test_validation_evaluator_reports_reconstruction_l1():
    val_data = make_images(4, seed=5)
    ae = make_autoencoder()
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(val_data, batch_size=2),
        network=ae,
        prepare_batch=AutoencoderPrepareBatch(),
        inferer=ReconstructionInferer(),
        key_val_metric={"val_l1": MeanAbsoluteError(output_transform=from_engine(["pred", "label"]))},
    )
    trainer, _, _ = _trainer(autoencoder=ae, train_handlers=[ValidationHandler(validator=evaluator, interval=1)])
    ProgressBar(persist=False).attach(trainer, output_transform=from_engine(["loss"], first=True))
    trainer.run()
    images = torch.stack([d["image"] for d in val_data])
    with torch.no_grad():
        expected = float((ae.reconstruct(images) - images).abs().mean())
    assert evaluator.state.metrics["val_l1"] == pytest.approx(expected, rel=1e-4)
