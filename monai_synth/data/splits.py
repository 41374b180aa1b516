"""Patient-level train / holdout / validation splits.

Splits are made over patients, never over images: two studies of one patient are near-duplicates, so an
image-level split would leak a patient into the holdout set and make both the utility numbers and the privacy
calibration (which uses holdout patients as "never seen" references) optimistic.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from monai_synth.data.datalist import DatalistError

__all__ = ["split_by_patient", "check_disjoint"]


def split_by_patient(
    records: Sequence[Mapping],
    holdout_fraction: float = 0.2,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Split records into train / holdout (/ val) so that every patient is in exactly one split.

    Patients are stratified by label (a patient's label is its most frequent one) where possible: patients are
    shuffled within each label and the labels are interleaved in proportion before the split is cut, so every
    split gets about the cohort's label mix. The result depends only on ``seed`` and the set of records, not on
    their order.

    Args:
        records: datalist records with ``"patient_id"`` and ``"label"``.
        holdout_fraction: fraction of patients held out (never trained on; used for privacy calibration and
            evaluation). 0 gives an empty holdout.
        val_fraction: fraction of patients for validation; the ``"val"`` key is present only when > 0.
        seed: random seed.

    Returns:
        ``{"train": [...], "holdout": [...]}`` plus ``"val"`` when ``val_fraction > 0``; records keep their
        datalist order within a split.

    Raises:
        ValueError: fractions outside [0, 1) or summing to 1 or more.
        DatalistError: too few patients to give each requested split at least one patient.
    """
    for name, frac in (("holdout_fraction", holdout_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= float(frac) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    if holdout_fraction + val_fraction >= 1.0:
        raise ValueError(
            f"holdout_fraction + val_fraction must be < 1 to leave patients for training, got "
            f"{holdout_fraction} + {val_fraction}"
        )
    if len(records) == 0:
        raise DatalistError("<records>", [(None, "no records to split; load a non-empty datalist first")])

    labels_of: dict[str, Counter] = defaultdict(Counter)
    for rec in records:
        labels_of[str(rec["patient_id"])][str(rec["label"])] += 1
    patients = sorted(labels_of)
    n = len(patients)
    n_holdout = max(1, round(holdout_fraction * n)) if holdout_fraction > 0 else 0
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_holdout - n_val < 1:
        needed = 1 + (holdout_fraction > 0) + (val_fraction > 0)
        raise DatalistError(
            "<records>",
            [
                (
                    None,
                    f"only {n} patient(s); a patient-level split into train"
                    f"{', holdout' if n_holdout else ''}{', val' if n_val else ''} needs at least {needed}. "
                    "Add patients or lower holdout_fraction / val_fraction.",
                )
            ],
        )

    # Stratify: each patient's position within its label group, as a fraction, decides where it goes in the
    # interleaved order, so any prefix of that order has about the cohort's label proportions.
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = defaultdict(list)
    for pid in patients:
        counts = labels_of[pid]
        top = max(counts.values())
        by_label[min(lbl for lbl, c in counts.items() if c == top)].append(pid)
    keyed = []
    for label in sorted(by_label):
        group = list(by_label[label])
        order = rng.permutation(len(group))
        jitter = rng.random(len(group))
        for rank, idx in enumerate(order):
            keyed.append(((rank + jitter[rank]) / len(group), group[idx]))
    interleaved = [pid for _, pid in sorted(keyed)]

    assignment: dict[str, str] = {}
    for pid in interleaved[:n_holdout]:
        assignment[pid] = "holdout"
    for pid in interleaved[n_holdout : n_holdout + n_val]:
        assignment[pid] = "val"
    for pid in interleaved[n_holdout + n_val :]:
        assignment[pid] = "train"

    splits: dict[str, list[dict]] = {"train": [], "holdout": []}
    if val_fraction > 0:
        splits["val"] = []
    for rec in records:
        splits[assignment[str(rec["patient_id"])]].append(dict(rec))
    check_disjoint(splits)
    return splits


def check_disjoint(splits: Mapping[str, Sequence[Mapping]]) -> None:
    """Raise if any patient appears in more than one split.

    Args:
        splits: split name -> records with ``"patient_id"``.

    Raises:
        DatalistError: naming every patient id that is in two or more splits and which splits they are in.
    """
    where: dict[str, set[str]] = defaultdict(set)
    for name, recs in splits.items():
        for rec in recs:
            where[str(rec["patient_id"])].add(name)
    shared = {pid: sorted(names) for pid, names in where.items() if len(names) > 1}
    if shared:
        problems = [
            (None, f"patient {pid!r} is in splits {names}; a patient must be in exactly one split")
            for pid, names in sorted(shared.items())
        ]
        raise DatalistError("splits", problems)
