"""PrivacySafeguardHandler on a MONAI SupervisedEvaluator whose 'network' emits generated images."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator

from monai_synth.handlers import PrivacySafeguardHandler
from monai_synth.privacy.index import TrainingIndex
from monai_synth.privacy.safeguard import PrivacySafeguard
from monai_synth.privacy.spaces import PixelSpace


@pytest.fixture
def setup():
    train = torch.randn(12, 1, 8, 8)
    index = TrainingIndex.build(PixelSpace(grid=8), train, [f"P{i}" for i in range(12)], "dl")
    safeguard = PrivacySafeguard([(index, 0.05)])
    # the evaluator's network is the identity, so its "generated" images are exactly these inputs
    images = torch.cat([train[:3] * 1.5, torch.randn(4, 1, 8, 8)])
    images[5, 0, 0, 0] = float("nan")
    data = [{"image": images[i], "label": torch.tensor(i % 2)} for i in range(7)]
    return safeguard, data


@pytest.mark.parametrize("decollate", [True, False])
def test_handler_judges_every_generated_image(setup, decollate):
    safeguard, data = setup
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=3),
        network=torch.nn.Identity(),
        decollate=decollate,
    )
    handler = PrivacySafeguardHandler(safeguard, key="pred", condition_key="label")
    handler.attach(evaluator)
    flags = []
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: flags.extend(
            [o["privacy_passed"] for o in e.state.output] if decollate else e.state.output["privacy_passed"]
        ),
    )
    evaluator.run()
    expected = [False, False, False, True, True, False, True]
    assert [r.passed for r in handler.records] == expected == flags
    assert [r.condition for r in handler.records] == [i % 2 for i in range(7)]
    s = handler.summary()
    assert (s["generated"], s["rejected"], s["released"]) == (7, 4, 3)
    assert evaluator.state.metrics["privacy_released"] == 3
    assert evaluator.state.metrics["privacy_rejection_rate"] == pytest.approx(4 / 7)
    assert len(handler.images) == 3 and all(torch.isfinite(i).all() for i in handler.images)
    assert "NaN" in handler.records[5].reason


def test_output_transform_and_reset_on_rerun(setup):
    safeguard, data = setup
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(data, batch_size=7), network=torch.nn.Identity()
    )
    handler = PrivacySafeguardHandler(
        safeguard, output_transform=lambda out: torch.stack([o["pred"] for o in out]), flag_key=None
    )
    handler.attach(evaluator)
    evaluator.run()
    evaluator.run()
    assert len(handler.records) == 7  # a new run starts a new count
    assert "privacy_passed" not in evaluator.state.output[0]


def test_missing_key_is_explained(setup):
    safeguard, data = setup
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(data, batch_size=7), network=torch.nn.Identity()
    )
    PrivacySafeguardHandler(safeguard, key="generated").attach(evaluator)
    with pytest.raises(KeyError, match="set key= or output_transform="):
        evaluator.run()
