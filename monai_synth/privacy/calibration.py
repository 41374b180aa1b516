"""Calibrated rejection thresholds from how close *unseen* patients come to the training set.

Holdout patients were never trained on, so their nearest-training-image distances show how close a
genuinely different person's image naturally comes to some training image in a given space. A synthetic
image closer to a training image than all but a small ``quantile`` of unseen patients' images is treated as
a (near-)copy and rejected: ``threshold = max(floor, quantile-th holdout->train nearest distance)``.
With ``quantile=0.01`` about 1% of genuinely new images are rejected as well; that is the price of the
guarantee and shows up as extra sampling cost in the certificate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from monai_synth.privacy.index import TrainingIndex

__all__ = ["Calibration", "calibrate_threshold", "min_holdout_size"]


def min_holdout_size(quantile: float, tail: int = 1) -> int:
    """Holdout images needed so that at least ``tail`` images fall below the ``quantile`` (``ceil(tail / q)``).

    With fewer, the quantile is just the smallest distance seen and says nothing about the tail.
    """
    return int(math.ceil(tail / quantile - 1e-9))


@dataclass
class Calibration:
    """A calibrated threshold for one privacy space, and what it was calibrated on.

    Attributes:
        space: privacy space name.
        threshold: images closer than this to a training image are rejected (``max(floor, quantile_value)``).
        quantile: holdout quantile asked for.
        floor: absolute minimum threshold asked for.
        quantile_value: the holdout distance at ``quantile``, before the floor.
        n_holdout: holdout images used.
        n_holdout_patients: distinct holdout patients (0 if unknown).
        index_fingerprint: fingerprint of the index it was calibrated against; the safeguard refuses to pair it
            with another index.
        summary: min / percentiles / mean / max of the holdout->train nearest distances.
    """

    space: str
    threshold: float
    quantile: float
    floor: float
    quantile_value: float
    n_holdout: int
    n_holdout_patients: int
    index_fingerprint: str
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict (certificates)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def calibrate_threshold(
    index: TrainingIndex,
    holdout: torch.Tensor | np.ndarray | Iterable | None = None,
    quantile: float = 0.01,
    floor: float = 0.0,
    *,
    holdout_patient_ids: Sequence[str] | None = None,
    holdout_vectors: np.ndarray | None = None,
    batch_size: int = 64,
) -> Calibration:
    """Threshold from the holdout->train nearest-neighbour distance distribution.

    Args:
        index: training index (with its space attached when ``holdout`` images are given).
        holdout: model-space holdout images ``(N, C, *spatial)`` or an iterable of batches.
        quantile: fraction of unseen-patient images that would be rejected; in (0, 0.5].
        floor: absolute minimum threshold (>= 0).
        holdout_patient_ids: patient id of each holdout image; checked to share no patient with the index.
            Strongly recommended: a training patient in the holdout makes the threshold meaninglessly small.
        holdout_vectors: instead of images, already embedded holdout vectors ``(N, d)`` or ``(N, V, d)``.
        batch_size: images embedded at once.

    Raises:
        ValueError: holdout patients that are also training patients (named), too few holdout images for the
            quantile (says how many are needed), bad quantile/floor.
    """
    if not 0.0 < quantile <= 0.5:
        raise ValueError(f"quantile must be in (0, 0.5], got {quantile}")
    if not (math.isfinite(floor) and floor >= 0.0):
        raise ValueError(f"floor must be a finite number >= 0, got {floor}")
    if (holdout is None) == (holdout_vectors is None):
        raise ValueError("give exactly one of holdout (images) or holdout_vectors")
    if holdout_patient_ids is not None:
        overlap = sorted(set(map(str, holdout_patient_ids)) & index.patient_set)
        if overlap:
            raise ValueError(
                f"{len(overlap)} holdout patients are also training patients ({overlap[:10]}): the holdout must be "
                "unseen people; split by patient (monai_synth.data.splits.split_by_patient)"
            )
    else:
        warnings.warn(
            "calibrate_threshold without holdout_patient_ids cannot check that holdout patients are unseen",
            stacklevel=2,
        )
    if holdout_vectors is not None:
        dist, _, _ = index.search(holdout_vectors, k=1)
    else:
        dist, _, _ = index.query(holdout, k=1, batch_size=batch_size)
    d = dist[:, 0]
    n = len(d)
    if holdout_patient_ids is not None and len(holdout_patient_ids) != n:
        raise ValueError(f"{len(holdout_patient_ids)} holdout patient ids for {n} holdout images")
    need = min_holdout_size(quantile)
    if n < need:
        raise ValueError(
            f"{n} holdout images are too few to estimate the {quantile:g} quantile: at least {need} are needed "
            f"(ceil(1 / quantile)); add holdout patients or raise the quantile to >= {1.0 / n:.3g}"
        )
    q_value = float(np.quantile(d, quantile))
    summary = {
        "min": float(d.min()),
        **{f"p{p:g}": float(np.percentile(d, p)) for p in (1, 5, 25, 50)},
        "mean": float(d.mean()),
        "max": float(d.max()),
    }
    return Calibration(
        space=index.space_name,
        threshold=max(float(floor), q_value),
        quantile=float(quantile),
        floor=float(floor),
        quantile_value=q_value,
        n_holdout=n,
        n_holdout_patients=len(set(holdout_patient_ids)) if holdout_patient_ids is not None else 0,
        index_fingerprint=index.fingerprint,
        summary=summary,
    )
