"""EMA handler: the update rule, its warm-up, update_every, buffers, and use from a trainer."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from monai_synth.handlers import EMAWeightsHandler


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_ema_starts_as_a_copy_and_follows_the_update_rule():
    model, ema = _net(0), _net(1)
    handler = EMAWeightsHandler(model, ema, decay=0.9, warmup=False)
    for a, b in zip(model.state_dict().values(), ema.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    expected = [p.detach().clone() for p in ema.parameters()]
    for _ in range(3):
        _perturb(model)
        handler.update(handler.decay)
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    for e, p in zip(expected, ema.parameters()):
        torch.testing.assert_close(p, e)
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    handler.update(0.9)
    # buffers (norm statistics) are copied, not averaged
    torch.testing.assert_close(ema[1].running_mean, torch.full((4,), 3.0))


def test_warmup_and_start_iteration():
    handler = EMAWeightsHandler(_net(0), _net(1), decay=0.999, warmup=True, start_iteration=2)
    assert handler.current_decay(1) == 0.0 and handler.current_decay(2) == 0.0
    assert handler.current_decay(3) == pytest.approx(1 / 10)
    assert handler.current_decay(4) == pytest.approx(2 / 11)
    assert handler.current_decay(100_000) == pytest.approx(0.999)
    assert EMAWeightsHandler(_net(0), _net(1), decay=0.5, warmup=False).current_decay(1) == 0.5


def test_update_every_n_iterations_from_an_engine():
    model, ema = _net(0), _net(1)

    def step(engine, batch):
        _perturb(model)

    engine = Engine(step)
    handler = EMAWeightsHandler(model, ema, decay=0.5, warmup=False, update_every=2)
    handler.attach(engine)
    snapshots = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: snapshots.append(ema[0].weight.detach().clone()))
    engine.run(range(4), max_epochs=1)
    assert torch.equal(snapshots[0], _net(0)[0].weight.detach()), "updated on an odd iteration"
    assert not torch.equal(snapshots[1], snapshots[0])
    assert torch.equal(snapshots[2], snapshots[1])


def test_state_round_trips_as_a_module(tmp_path):
    model, ema = _net(0), _net(1)
    handler = EMAWeightsHandler(model, ema, decay=0.8, warmup=False)
    _perturb(model)
    handler.update(0.8)
    torch.save({"ema": ema.state_dict()}, tmp_path / "c.pt")
    restored = _net(2)
    restored.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["ema"])
    for a, b in zip(ema.state_dict().values(), restored.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_argument_checks():
    model = _net(0)
    with pytest.raises(ValueError, match="separate copy"):
        EMAWeightsHandler(model, model)
    with pytest.raises(ValueError, match="decay"):
        EMAWeightsHandler(model, _net(1), decay=1.0)
    with pytest.raises(ValueError, match="update_every"):
        EMAWeightsHandler(model, _net(1), update_every=0)
