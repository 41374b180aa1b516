"""Batch samplers that put several images of each patient into every batch (identity-aware training)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["PatientBatchSampler"]


class PatientBatchSampler(Sampler[list[int]]):
    """Batches of ``patients_per_batch`` patients with ``views_per_patient`` items each ("P x K" sampling).

    Contrastive learning with identities as positives needs several images of each patient in every batch,
    and many patients per batch as negatives; a random batch of a 50-patient cohort would rarely hold two
    images of one patient. One epoch visits every patient once (in a random order); a patient's views cycle
    through its images in a random order, so all of its repeat studies are seen, and are repeated (each repeat
    augmented differently) when it has fewer images than views. The last group is topped up with other
    patients so that every batch has the same number of patients.

    Args:
        patient_ids: identity of every item of the dataset.
        patients_per_batch: P, at least 2 (a batch needs negatives); capped at the number of patients.
        views_per_patient: K, at least 2 (an anchor needs a positive).
        seed: seed of the sampler's own generator; call :meth:`set_epoch` for a new order each epoch.
    """

    def __init__(
        self, patient_ids: Sequence[str], patients_per_batch: int, views_per_patient: int = 4, seed: int = 0
    ) -> None:
        groups: dict[str, list[int]] = {}
        for i, pid in enumerate(patient_ids):
            groups.setdefault(str(pid), []).append(i)
        if len(groups) < 2:
            raise ValueError(f"need images of at least 2 patients to learn identities, got {len(groups)}.")
        if int(patients_per_batch) < 2:
            raise ValueError(f"patients_per_batch must be at least 2, got {patients_per_batch}.")
        if int(views_per_patient) < 2:
            raise ValueError(f"views_per_patient must be at least 2, got {views_per_patient}.")
        self.groups = [groups[k] for k in sorted(groups)]
        self.patients_per_batch = min(int(patients_per_batch), len(self.groups))
        self.views_per_patient = int(views_per_patient)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (deterministic from ``seed`` and ``epoch``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.groups) / self.patients_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.groups)).tolist()
        p = self.patients_per_batch
        for start in range(0, len(order), p):
            chosen = order[start : start + p]
            if len(chosen) < p:
                rest = [g for g in order if g not in chosen]
                chosen += rng.choice(rest, size=p - len(chosen), replace=False).tolist()
            batch: list[int] = []
            for g in chosen:
                items = self.groups[g]
                perm = rng.permutation(len(items))
                batch += [items[perm[k % len(items)]] for k in range(self.views_per_patient)]
            yield batch
