"""Privacy safeguard: privacy spaces, training index, calibrated thresholds, guarded sampling, certificates.

The learned re-identification space lives in :mod:`monai_synth.privacy.embedding`.
"""

from __future__ import annotations

from .calibration import Calibration, HoldoutDuplicateError, calibrate_threshold, min_holdout_size
from .certificate import certificate_rows, load_certificate, write_certificate, write_private_audit
from .index import DegenerateVectorError, StaleIndexError, TrainingIndex, index_fingerprint
from .release import GuardedRelease, ReleaseEncoder
from .safeguard import PrivacySafeguard, SafeguardResult, build_safeguard
from .sampling import GuardedSamplingResult, SampleRecord, guarded_sample, summarise_records
from .spaces import DegenerateImageError, NonFiniteImageError, PixelSpace, PrivacySpace, space_distance

__all__ = [
    "Calibration",
    "DegenerateImageError",
    "DegenerateVectorError",
    "GuardedSamplingResult",
    "HoldoutDuplicateError",
    "NonFiniteImageError",
    "PixelSpace",
    "PrivacySafeguard",
    "PrivacySpace",
    "SafeguardResult",
    "SampleRecord",
    "StaleIndexError",
    "TrainingIndex",
    "build_safeguard",
    "calibrate_threshold",
    "certificate_rows",
    "guarded_sample",
    "index_fingerprint",
    "load_certificate",
    "min_holdout_size",
    "GuardedRelease",
    "ReleaseEncoder",
    "space_distance",
    "summarise_records",
    "write_certificate",
    "write_private_audit",
]
