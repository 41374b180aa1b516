"""The privacy certificate of a release, and the separate private audit file.

``certificate.json`` (in the release): how many images were generated, rejected and released, the extra sampling
cost, every privacy space with its threshold and calibration, and the fingerprints of the training indexes (so of
the training datalist and space) and of the generator checkpoint. ``certificate.csv`` (in the release): one row per
released image with its file, condition, seed, attempt and, per space, its distance to the nearest training image and
the threshold it cleared. Neither holds a training pixel or a patient id; :func:`write_certificate` checks that no
training patient id appears anywhere in them.

The **private audit file** maps every generated image (released or not) to its nearest training *patient* per
space, so that the hospital's privacy officer can follow up a near-miss. It identifies patients: it is written to a
path the caller chooses, refused inside the release folder, and must stay with the training data.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from monai_synth.atomic import atomic_file
from monai_synth.privacy.safeguard import PrivacySafeguard
from monai_synth.privacy.sampling import SampleRecord

if TYPE_CHECKING:
    from monai_synth.data.export import ReleaseWriter

__all__ = ["JudgedRecords", "certificate_rows", "write_certificate", "write_private_audit", "load_certificate"]


class JudgedRecords(Protocol):
    """What a certificate is written from: every judged candidate's record, in order, and their summary
    (:class:`~monai_synth.privacy.sampling.GuardedSamplingResult`, :class:`~monai_synth.privacy.release.GuardedRelease`,
    the safeguard handler)."""

    records: Sequence[SampleRecord]

    def summary(self) -> dict: ...


CERTIFICATE_JSON = "certificate.json"
CERTIFICATE_CSV = "certificate.csv"
GUARANTEE = (
    "every released image is at least its space's threshold away from every training image, in every space and "
    "intensity view; the thresholds are low quantiles of the distances from unseen patients' images to their nearest "
    "training image (holdout images, and training images measured against the other training patients: "
    "n_cross_patient), set together so that, judged the same way and each left out of the thresholds it is judged "
    "by, the calibration quantile (e.g. 1%) of unseen patients' images would be refused (each space's own quantile is "
    "its calibration's space_quantile; below the smallest calibration distance it is extrapolated by the distances' "
    "exponential lower tail, of scale tail_scale). A released "
    "image is therefore farther from the training set than that closest fraction of unseen patients' images are -- "
    "not farther than most of them (holdout_percentile_<space> in certificate.csv says where each image sits). Where "
    "a space's specificity is above 0, an image much closer to one training patient than to every other is refused "
    "too, when a new patient's image would be that specific with a chance below it; where consensus is above 0, an "
    "image whose nearest training image belongs to the same patient in at least that many spaces is refused too"
)
DISTANCE = "1 - cosine similarity of L2-normalised space vectors (pixel space: 1 - Pearson correlation)"


def _plain(value: Any) -> Any:
    if torch.is_tensor(value):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def certificate_rows(records: Sequence[SampleRecord], calibrations: Mapping[str, Any] | None = None) -> list[dict]:
    """One certificate row per released record (no patient ids, no source names).

    With the safeguard's calibrations, each row also says where the image's distance sits in the holdout
    distribution (``holdout_percentile_<space>``: percent of unseen patients' images closer to training than it).
    """
    rows = []
    for r in records:
        if not r.passed:
            continue
        row = {
            "file": r.file,
            "condition": _plain(r.condition),
            "seed": r.seed,
            "batch_index": r.batch_index,
            "attempt": r.attempt,
            "guidance_scale": r.guidance,
        }
        if isinstance(r.condition, Mapping):  # a class with numeric conditions: one column each
            row["condition"] = _plain(r.condition.get("label"))
            row.update({f"condition_{k}": _plain(v) for k, v in r.condition.items() if k != "label"})
        # no source file name: candidates' names can hold patient ids; the private audit keeps them
        for space, dist in r.distances.items():
            row[f"distance_{space}"] = round(float(dist), 6)
            row[f"threshold_{space}"] = round(float(r.thresholds[space]), 6)
            cal = (calibrations or {}).get(space)
            if cal is not None and hasattr(cal, "holdout_percentile"):
                row[f"holdout_percentile_{space}"] = round(float(cal.holdout_percentile(float(dist))), 2)
        row["passed"] = bool(r.passed)
        rows.append(row)
    return rows


def _strings(obj: Any) -> set[str]:
    if isinstance(obj, str):
        return {obj}
    if isinstance(obj, Mapping):
        return set().union(*(_strings(k) | _strings(v) for k, v in obj.items())) if obj else set()
    if isinstance(obj, (list, tuple, set)):
        return set().union(*(_strings(v) for v in obj)) if obj else set()
    return set()


def write_certificate(
    writer: ReleaseWriter,
    result: JudgedRecords,
    fingerprints: Mapping[str, Any] | None = None,
    safeguard: PrivacySafeguard | None = None,
    extra: Mapping[str, Any] | None = None,
    labels: Sequence[str] | None = None,
) -> dict:
    """Write ``certificate.json`` and ``certificate.csv`` into the release.

    Args:
        writer: an open :class:`monai_synth.data.export.ReleaseWriter`.
        result: a guarded-sampling result or a :class:`PrivacySafeguardHandler` (``records`` + ``summary()``);
            released records should carry their ``file`` (see :class:`monai_synth.privacy.release.GuardedRelease`).
        fingerprints: e.g. ``{"checkpoint": ..., "datalist": ...}``; the index fingerprints of ``safeguard`` are
            added per space.
        safeguard: the safeguard used: its spaces, thresholds and calibrations are recorded, and its indexes'
            patient ids are checked never to appear in the certificate.
        extra: more JSON-able fields for the certificate (e.g. modality, sampler settings).
        labels: the condition vocabulary (default: the labels of ``extra["modality"]`` if given). A patient id that
            equals a label (numeric ids vs BI-RADS "3" / "5") is not taken for a leak.

    Returns:
        the certificate dict that was written.

    Raises:
        ValueError: if a training patient id would appear in the certificate.
    """
    summary = result.summary()
    rows = certificate_rows(result.records, safeguard.calibrations if safeguard is not None else None)
    spaces: dict[str, dict] = {}
    fps = {k: _plain(v) for k, v in (fingerprints or {}).items()}
    if safeguard is not None:
        for name, index in safeguard.indexes.items():
            cal = safeguard.calibrations.get(name)
            spaces[name] = {
                "threshold": safeguard.thresholds[name],
                "margin": safeguard.margin,
                "index_fingerprint": index.fingerprint,
                "index_size": index.ntotal,
                "space_fingerprint": index.space_fingerprint,
                "calibration": cal.to_dict() if cal is not None else None,
                # also refused: images a new patient's image matches this specifically with a lower chance (0: off)
                "specificity": float(getattr(safeguard, "specificity", 0.0)),
                # also refused: images whose nearest training patient is the same in at least this many spaces (0: off)
                "consensus": int(getattr(safeguard, "consensus", 0)),
            }
            fps[f"index_{name}"] = index.fingerprint
    else:
        for r in result.records:
            for name, thr in r.thresholds.items():
                spaces.setdefault(name, {"threshold": thr})
    released_distances = {
        name: min((r.distances[name] for r in result.records if r.passed), default=None) for name in spaces
    }
    cert = {
        "summary": {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in summary.items()},
        "guarantee": GUARANTEE,
        "distance": DISTANCE,
        "spaces": spaces,
        "min_released_distance": released_distances,
        "fingerprints": fps,
        "files": {"rows": CERTIFICATE_CSV},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    clash = sorted(set(extra or {}) & set(cert))
    if clash:
        raise ValueError(f"extra certificate fields {clash} would overwrite the certificate's own; rename them")
    cert.update(dict(extra or {}))
    if safeguard is not None:
        patients = set().union(*(index.patient_set for index in safeguard.indexes.values()))
        if labels is None and isinstance((extra or {}).get("modality"), str):
            from monai_synth.data.modalities import get_modality

            labels = get_modality(extra["modality"]).labels
        leaked = sorted((_strings(cert) | _strings(rows)) & (patients - set(map(str, labels or ()))))
        if leaked:
            raise ValueError(
                f"the certificate would contain {len(leaked)} training patient ids (e.g. as conditions or sources); "
                "refusing to write it"
            )
    writer.write_json(CERTIFICATE_JSON, cert)
    writer.write_csv(CERTIFICATE_CSV, rows)
    return cert


def write_private_audit(path: str | os.PathLike, result: Any, release_dir: str | os.PathLike | None = None) -> Path:
    """Write the PRIVATE audit file: for every generated image, its nearest training patient and distance per space.

    This file identifies training patients. Keep it with the training data, never in a release.

    Args:
        path: CSV file to write (atomically); must not be inside ``release_dir``.
        result: a guarded-sampling result or a :class:`PrivacySafeguardHandler`.
        release_dir: the release folder, to refuse writing the audit into it.

    Raises:
        ValueError: if ``path`` lies inside ``release_dir``.
    """
    path = Path(path).expanduser().absolute()
    if release_dir is not None:
        release = Path(release_dir).expanduser().absolute()
        if path == release or release in path.parents:
            raise ValueError(f"the private audit file {path} must not be written inside the release {release}")
    rows = []
    for i, r in enumerate(result.records):
        for space, dist in r.distances.items():
            rows.append(
                {
                    "generated_index": i,
                    "file": r.file or "",
                    "source": r.source or "",
                    "seed": r.seed,
                    "batch_index": r.batch_index,
                    "attempt": r.attempt,
                    "space": space,
                    "distance": float(dist),
                    "threshold": float(r.thresholds.get(space, float("nan"))),
                    "nearest_patient": r.nearest_patients.get(space, ""),
                    "passed": bool(r.passed),
                    "reason": r.reason or "",
                }
            )
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        fields = list(rows[0]) if rows else ["generated_index", "nearest_patient"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def load_certificate(release_dir: str | os.PathLike) -> dict:
    """Read ``certificate.json`` of a release."""
    return json.loads((Path(release_dir) / CERTIFICATE_JSON).read_text())
