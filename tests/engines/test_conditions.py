"""Numeric conditions: standardised with the training split's statistics, bad records named."""

from __future__ import annotations

import pytest
import torch

from monai_synth.engines.conditions import ConditionScaler


def test_conditions_are_standardised_with_the_training_records_statistics():
    records = [{"image": f"{i}.png", "size": s, "age": 50.0} for i, s in enumerate([2.0, 4.0, 6.0])]
    scaler = ConditionScaler(["size", "age"], records)
    out = scaler(torch.tensor([[4.0, 50.0], [6.0, 50.0]]))
    # size: mean 4, std sqrt(8/3); age is constant, so only centred (std 1), never divided by zero
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [2.0 / (8.0 / 3.0) ** 0.5, 0.0]]))
    assert scaler.defaults() == {"size": 4.0, "age": 50.0}


def test_a_record_without_the_column_or_with_a_non_number_is_named():
    with pytest.raises(ValueError, match="record 1 .*b.png.* no condition column 'size'"):
        ConditionScaler(["size"], [{"image": "a.png", "size": 1.0}, {"image": "b.png"}])
    with pytest.raises(ValueError, match="size = 'nan' is not a finite number"):
        ConditionScaler(["size"], [{"image": "a.png", "size": "nan"}])


def test_values_of_the_wrong_width_are_refused():
    with pytest.raises(ValueError, match=r"expected 1 condition values \(\['size'\]\)"):
        ConditionScaler(["size"], [{"size": 1.0}])(torch.zeros(2, 3))
