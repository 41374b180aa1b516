"""Numeric conditions beyond the class (e.g. ``lesion_size_mm``), normalised with the training split's statistics.

A bundle names numeric datalist columns in ``condition_keys``; the DiT is conditioned on the one-hot class followed
by these values, each standardised by the mean and standard deviation of the *training* patients' records, so a
lesion size in millimetres and a ratio in [0, 1] enter the network on the same scale. Every stage computes the
statistics from the same training split, which the checkpoints' ``training_split`` fingerprint pins: a release on
other data is refused before sampling, so it cannot normalise differently from training. The null condition of classifier-free guidance is the whole context
(class and values) filled with -1, as MONAI's inferers build it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["ConditionScaler"]


class ConditionScaler(torch.nn.Module):
    """Standardise numeric conditions with the training split's mean and standard deviation.

    Args:
        keys: the datalist columns, in the order they follow the one-hot class in the condition vector.
        records: training-split records to take the statistics from (``None``: identity until loaded from a
            checkpoint). A constant column gets standard deviation 1.

    Raises:
        ValueError: a record lacks a key or holds a value that is not a finite number (naming the row and key).
    """

    def __init__(self, keys: Sequence[str] = (), records: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        self.keys = [str(k) for k in keys]
        mean, std = torch.zeros(len(self.keys)), torch.ones(len(self.keys))
        if self.keys and records is not None:
            values = self.table(records)
            mean = values.mean(0)
            std = values.std(0, unbiased=False) if len(values) > 1 else torch.ones(len(self.keys))
            std = torch.where(std > 0, std, torch.ones_like(std))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def table(self, records: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """The ``(N, K)`` raw values of ``keys`` in ``records``."""
        rows = []
        for i, rec in enumerate(records):
            row = []
            for key in self.keys:
                if key not in rec:
                    raise ValueError(
                        f"record {i} ({rec.get('image', '?')}) has no condition column {key!r}; add it to the datalist "
                        "or remove it from condition_keys"
                    )
                value = float(rec[key])
                if not torch.isfinite(torch.tensor(value)):
                    raise ValueError(
                        f"record {i} ({rec.get('image', '?')}): {key} = {rec[key]!r} is not a finite number"
                    )
                row.append(value)
            rows.append(row)
        if not rows:
            raise ValueError("no training records to take the condition statistics from")
        return torch.tensor(rows, dtype=torch.float32)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Raw values ``(B, K)`` -> standardised values."""
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.shape[-1] != len(self.keys):
            raise ValueError(
                f"expected {len(self.keys)} condition values ({self.keys}), got shape {tuple(values.shape)}"
            )
        return (values - self.mean.to(values.device)) / self.std.to(values.device)

    def defaults(self) -> dict[str, float]:
        """The training split's mean of each condition: the value of a request that does not give one."""
        return {k: float(v) for k, v in zip(self.keys, self.mean.tolist())}
