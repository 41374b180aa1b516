"""The privacy safeguard: release an image only if it is far enough from every training image in every space.

It fails closed. Misconfiguration (no index, an index stale for its space, a threshold calibrated on
another index, a non-positive threshold) raises at construction, before anything is generated. Problems
with one image (NaN/Inf, constant, an exception inside a space) or a space that became stale afterwards
never raise from :meth:`PrivacySafeguard.check`: the image is marked not passed, with the reason, so a
sampling loop goes on and counts it as rejected.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from monai_synth.privacy.calibration import (
    DUPLICATE_ALPHA,
    DUPLICATE_Z,
    Calibration,
    _calibrate,
    _neighbours,
    joint_space_quantile,
    specificity_chance,
    tail_scale,
)
from monai_synth.privacy.index import StaleIndexError, TrainingIndex
from monai_synth.privacy.spaces import PrivacySpace, embed_variants, images_per_batch, note_query_size

__all__ = ["PrivacySafeguard", "SafeguardResult", "agreeing_spaces", "build_safeguard"]

logger = logging.getLogger(__name__)

#: the specificity level :func:`build_safeguard` applies unless told otherwise: each space refuses about 0.3% of new
#: patients' images for it. Over 200 holdout draws of the attack benchmark's 2D cohorts, with the cross-patient
#: samples, it cut the copies released (PET 2D 11.8% -> 4.8%, MRI 2D 1.7% -> 0.6%) while fewer new patients' images
#: were refused than by the holdout alone (2.3-4.7% against 5.6-7.3%).
DEFAULT_SPECIFICITY = 0.003
#: the most of the calibration images the default specificity test may refuse, all spaces together. Each space refuses
#: about :data:`DEFAULT_SPECIFICITY` of new patients' images, so 13 spaces that disagree about which images are
#: specific refuse up to 4% on top of the thresholds' share: PET 2D phantoms released 55 of 60 unseen patients'
#: images, two of the five refused by the specificity test. :func:`build_safeguard` lowers the level until at most
#: this share of its calibration images is refused by the test in some space.
SPECIFICITY_SHARE = 0.015
#: the most of the calibration images the default consensus test (:class:`PrivacySafeguard`'s ``consensus``) may
#: refuse, and the fewest spaces it needs to mean anything.
CONSENSUS_SHARE = 0.005
CONSENSUS_MIN_SPACES = 4


@dataclass
class SafeguardResult:
    """Outcome of the safeguard for one image.

    Attributes:
        passed: True only if the image is at least the threshold away from every training image in every space.
        distances: space -> distance to the nearest training image (NaN where not computed).
        thresholds: space -> threshold applied.
        reason: why it did not pass (None if passed).
        nearest_patients: space -> patient id of the nearest training image. PRIVATE: for the audit file only,
            never for a release or a log that leaves the hospital.
        nearest_rows: space -> index row of the nearest training image (private as well).
    """

    passed: bool
    distances: dict[str, float]
    thresholds: dict[str, float]
    reason: str | None = None
    nearest_patients: dict[str, str] = field(default_factory=dict, repr=False)
    nearest_rows: dict[str, int] = field(default_factory=dict, repr=False)

    def public_dict(self) -> dict:
        """The fields that may go into a certificate (no patient ids, no rows)."""
        return {
            "passed": self.passed,
            "distances": dict(self.distances),
            "thresholds": dict(self.thresholds),
            "reason": self.reason,
        }


def _threshold_of(index: TrainingIndex, threshold: float | Calibration) -> tuple[float, Calibration | None]:
    calibration = None
    if isinstance(threshold, Calibration):
        calibration = threshold
        if calibration.index_fingerprint != index.fingerprint:
            raise StaleIndexError(
                f"the {calibration.space!r} threshold was calibrated on index {calibration.index_fingerprint}, not on "
                f"the index given ({index.fingerprint}): recalibrate on this index"
            )
        if calibration.space != index.space_name:
            raise ValueError(f"calibration is for space {calibration.space!r}, index is {index.space_name!r}")
        threshold = calibration.threshold
    threshold = float(threshold)
    if not (math.isfinite(threshold) and threshold > 0.0):
        raise ValueError(
            f"threshold for space {index.space_name!r} must be a finite number > 0, got {threshold}: a threshold of 0 "
            "would release exact copies; calibrate it or set a floor"
        )
    return threshold, calibration


class PrivacySafeguard:
    """Check generated images against one or more (training index, threshold) pairs.

    An image passes only if, in every space, its nearest training image is at least ``threshold`` away
    (``distance >= threshold + margin``, ``margin`` absorbing float32 rounding so the float64 recomputation
    of an auditor never finds a released image under the threshold).

    Args:
        checks: ``(index, threshold)`` pairs, one per privacy space; ``threshold`` is a float or the
            :class:`~monai_synth.privacy.calibration.Calibration` of that index. Each index needs its space
            attached (``TrainingIndex.build`` does that; ``TrainingIndex.load(..., space=..., expected_fingerprint=...)``).
        expected_fingerprints: optional space -> index fingerprint the caller expects (e.g. from the current
            datalist); a mismatch raises at construction.
        margin: see above.
        batch_size: images embedded at once, fewer where their query vectors would exceed
            :data:`~monai_synth.privacy.spaces.QUERY_FLOATS` (large 3D variant sets).
        specificity: also refuse an image that is much closer to one training patient than to any other, beyond what
            chance allows a new patient's image: in some space, ``2 ** (-log(d2 / d1) / m) < specificity``, ``d1`` its
            nearest training distance, ``d2`` its nearest distance to another patient and ``m`` the holdout's median
            ``log(d2 / d1)``, distances taken above the space's floor (the law of the holdout's duplicate screen,
            :func:`~monai_synth.privacy.calibration.log_distance_ratio`; a new patient's value is uniform on (0, 1), so
            each space refuses about ``specificity`` of new patients' images). A near-copy too altered to come closer
            than new patients do still sits much closer to its source than to anyone else. 0 (default): off. Needs
            calibrations made with the duplicate screen.
        consensus: also refuse an image whose nearest training image belongs to the same patient in at least this
            many spaces. Each space compares differently, so a new patient's image has a different nearest patient in
            most of them, while a near-copy altered just enough to sit as far as new patients do in every space still
            has its source nearest in most (PET phantom slices warped by 4 px: 8-10 of 13 spaces name their source,
            new patients' images 2-5). 0 (default): off; else between 2 and the number of spaces
            (:func:`build_safeguard` calibrates it).

    Raises:
        ValueError: no checks, a missing index or space, a duplicate space, a bad threshold, a specificity without
            the calibrations it needs.
        StaleIndexError: an index that does not match its space, its calibration or ``expected_fingerprints``.
    """

    def __init__(
        self,
        checks: Sequence[tuple[TrainingIndex, float | Calibration]],
        expected_fingerprints: Mapping[str, str] | None = None,
        margin: float = 1e-5,
        batch_size: int = 64,
        specificity: float = 0.0,
        consensus: int = 0,
    ) -> None:
        checks = list(checks or [])
        if not checks:
            raise ValueError("a PrivacySafeguard needs at least one (index, threshold) check; nothing would be guarded")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.indexes: dict[str, TrainingIndex] = {}
        self.thresholds: dict[str, float] = {}
        self.calibrations: dict[str, Calibration] = {}
        for item in checks:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"each check must be an (index, threshold) pair, got {item!r}")
            index, threshold = item
            if not isinstance(index, TrainingIndex):
                raise ValueError(f"check needs a TrainingIndex, got {type(index).__name__}: build or load the index")
            if index.space is None:
                raise ValueError(f"index for space {index.space_name!r} has no space attached; load it with space=")
            index.check_space()
            name = index.space_name
            if name in self.indexes:
                raise ValueError(f"two checks for space {name!r}; give one index per space")
            self.thresholds[name], cal = _threshold_of(index, threshold)
            if cal is not None:
                self.calibrations[name] = cal
            self.indexes[name] = index
        self.expected_fingerprints = dict(expected_fingerprints or {})
        unknown = set(self.expected_fingerprints) - set(self.indexes)
        if unknown:
            raise ValueError(f"expected_fingerprints for spaces without a check: {sorted(unknown)}")
        problems = self.verify()
        if problems:
            raise StaleIndexError("; ".join(problems))
        self.margin = float(margin)
        self.batch_size = int(batch_size)
        if not 0.0 <= specificity < 1.0:
            raise ValueError(f"specificity must be in [0, 1), got {specificity}")
        self.specificity = float(specificity)
        if consensus != 0 and not 2 <= consensus <= len(self.indexes):
            raise ValueError(f"consensus must be 0 (off) or between 2 and {len(self.indexes)} spaces, got {consensus}")
        self.consensus = int(consensus)
        self.median_log_ratio: dict[str, float] = {}
        # the floor the calibration measured its ratios above (absent from calibrations made before it was: 0)
        self.ratio_floor: dict[str, float] = {}
        for name in self.indexes if self.specificity else ():
            screen = getattr(self.calibrations.get(name), "duplicate_screen", None) or {}
            m = screen.get("median_log_ratio")
            if m is None or not (math.isfinite(m) and m > 0):
                raise ValueError(
                    f"specificity needs the {name!r} space's calibration with the duplicate screen (its median "
                    "log(d2 / d1) over the holdout, from more than one training patient): calibrate with "
                    "duplicate_check=True, or leave specificity at 0"
                )
            self.median_log_ratio[name] = float(m)
            self.ratio_floor[name] = float(screen.get("distance_floor", 0.0))

    @property
    def spaces(self) -> list[str]:
        """Names of the guarded spaces."""
        return list(self.indexes)

    @property
    def fingerprints(self) -> dict[str, str]:
        """Space -> index fingerprint (for certificates)."""
        return {name: index.fingerprint for name, index in self.indexes.items()}

    def verify(self) -> list[str]:
        """Re-check that every index still matches its space and the expected fingerprints.

        Returns:
            human-readable problems; empty when everything is consistent.
        """
        problems = []
        for name, index in self.indexes.items():
            try:
                index.check_space()
            except Exception as err:  # a space that cannot even fingerprint itself is as stale as a changed one
                problems.append(f"{name}: {err}")
                continue
            expected = self.expected_fingerprints.get(name)
            if expected is not None and expected != index.fingerprint:
                problems.append(
                    f"{name}: index fingerprint {index.fingerprint} != expected {expected} (training data or space "
                    "changed); rebuild the index"
                )
        return problems

    def _split(self, images: torch.Tensor | np.ndarray | Sequence) -> list:
        if isinstance(images, (torch.Tensor, np.ndarray)):
            return [images[i] for i in range(images.shape[0])] if images.ndim >= 3 else [images]
        return list(images)

    def _nearest(self, name: str, vec: np.ndarray) -> list[tuple[float, str, int, float]]:
        """(distance, patient, row, least chance) of each query's nearest training row. The least chance: a lower bound
        on the chance of a new patient's image being as specific (see ``specificity``), 1.0 when the check is off, 0.0
        where no bound proves it above the level (:meth:`check` then searches exactly)."""
        index = self.indexes[name]
        d, r, p = index.nearest(vec)
        d1, rows, patients = d[:, 0], r[:, 0], p[:, 0]
        least = np.ones(len(d1))
        if self.specificity:
            # most images are judged with the fast exact search alone: a bound on their distance to a second patient
            # proves them not specific enough to refuse; :meth:`check` searches the few it cannot clear exactly
            bound, sure = _second_patient_bound(index, vec, rows, patients)
            least = np.zeros(len(d1))
            least[sure] = self._chance(name, d1[sure], bound[sure])
        return [(float(d1[i]), str(patients[i]), int(rows[i]), float(least[i])) for i in range(len(d1))]

    def _exact_chance(self, name: str, views: list[torch.Tensor]) -> float:
        """The specificity test's chance of one image over all its views together: its nearest training row over
        every view's variants, and its nearest row of another patient in any view (the calibration's statistic)."""
        index = self.indexes[name]
        vec = embed_variants(index.space, torch.stack(views))
        d1, _, d2 = _neighbours(index, [vec.reshape(1, -1, vec.shape[-1])], True)
        return float(self._chance(name, d1, d2)[0])

    def _chance(self, name: str, d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
        """How often a new patient's image is as specific to its nearest patient (``d2 / d1`` as large) in ``name``."""
        return specificity_chance(d1, d2, self.median_log_ratio[name], self.ratio_floor[name])

    def _distances(self, name: str, images: list[torch.Tensor]) -> list[tuple[float, str, int, float] | Exception]:
        """Nearest (distance, patient, row, least chance) per image in one space; an exception object where it
        failed."""
        index = self.indexes[name]
        out: list = []
        start = 0
        while start < len(images):
            step = images_per_batch(index.space, images[start], self.batch_size)
            if 1 < step < len(images) - start:
                step -= step % 2  # an even number: a release's two views of an image stay in one batch
            chunk, start = images[start : start + step], start + step
            try:
                vec = embed_variants(index.space, torch.stack(chunk))
                note_query_size(index.space, chunk[0], vec)
                out.extend(self._nearest(name, vec))
            except Exception:  # isolate the image(s) that fail, the others are still judged
                for img in chunk:
                    try:
                        out.extend(self._nearest(name, embed_variants(index.space, img[None])))
                    except Exception as err:
                        out.append(err)
        return out

    def check(self, images: torch.Tensor | np.ndarray | Sequence) -> list[SafeguardResult]:
        """Judge each image; never raises because of an image.

        Args:
            images: model-space images ``(B, C, *spatial)``, or a sequence whose items are ``(C, *spatial)`` images or
                lists of them: the views of one image (a release's intensity views,
                :meth:`~monai_synth.privacy.release.ReleaseEncoder.views`), judged as one image whose variants are
                every view's. Its distance in a space is the least over its views, its nearest patient the nearest
                view's, and the specificity test's second patient the nearest other patient in any view: the
                statistics :func:`build_safeguard` calibrates with ``views``.

        Returns:
            one :class:`SafeguardResult` per image, in order.
        """
        items = [list(item) if isinstance(item, (list, tuple)) else [item] for item in self._split(images)]
        nan = {name: float("nan") for name in self.indexes}
        results: list[SafeguardResult | None] = [None] * len(items)
        problems = self.verify()
        if problems:
            reason = "stale privacy index: " + "; ".join(problems)
            return [SafeguardResult(False, dict(nan), dict(self.thresholds), reason) for _ in items]
        valid: list[int] = []
        views: list[list[torch.Tensor]] = []
        for i, item in enumerate(items):
            try:
                if not item:
                    raise ValueError("no views given for this image")
                views.append([_as_image(v) for v in item])
            except Exception as err:
                results[i] = SafeguardResult(False, dict(nan), dict(self.thresholds), f"invalid image: {err}")
                continue
            valid.append(i)
        tensors = [t for vs in views for t in vs]
        ends = np.cumsum([len(vs) for vs in views])  # image j's views are tensors[ends[j] - len(views[j]) : ends[j]]
        # group by shape so a batch of differently sized images is still embedded in batches (an image's views, of
        # one shape, stay next to each other)
        groups: dict[tuple, list[int]] = {}
        for j, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(j)
        per_space: dict[str, dict[int, tuple | Exception]] = {name: {} for name in self.indexes}
        for members in groups.values():
            for name in self.indexes:
                got = self._distances(name, [tensors[j] for j in members])
                per_space[name].update(zip(members, got))
        for j, i in enumerate(valid):
            own = range(ends[j] - len(views[j]), ends[j])
            distances, patients, rows, reasons = dict(nan), {}, {}, []
            for name, threshold in self.thresholds.items():
                found = [per_space[name][v] for v in own]
                failed = next((f for f in found if isinstance(f, Exception)), None)
                if failed is not None:
                    reasons.append(f"{name} space failed: {type(failed).__name__}: {failed}")
                    continue
                d1, patients[name], rows[name], chance = min(found, key=lambda f: f[0])  # the nearest view
                distances[name] = d1
                if not d1 >= threshold + self.margin:
                    reasons.append(f"too close to a training image in {name} space ({d1:.4g} < {threshold:.4g})")
                    continue
                if self.specificity and not chance >= self.specificity:
                    try:  # the bound did not clear it: over all its views, exactly
                        chance = self._exact_chance(name, views[j])
                    except Exception as err:
                        reasons.append(f"{name} space failed: {type(err).__name__}: {err}")
                        continue
                if self.specificity and not chance >= self.specificity:
                    reasons.append(
                        f"much closer to one training patient than to any other in {name} space (a new patient's "
                        f"image is this specific with chance {chance:.2g} < {self.specificity:g})"
                    )
            agree = agreeing_spaces(patients.values())
            if self.consensus and agree >= self.consensus:
                reasons.append(
                    f"the same training patient is nearest in {agree} of {len(self.indexes)} spaces (at least "
                    f"{self.consensus} refuses: new patients' images have different nearest patients in most spaces)"
                )
            results[i] = SafeguardResult(
                passed=not reasons,
                distances=distances,
                thresholds=dict(self.thresholds),
                reason="; ".join(reasons) or None,
                nearest_patients=patients,
                nearest_rows=rows,
            )
        return results  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"PrivacySafeguard(thresholds={self.thresholds}, fingerprints={self.fingerprints})"


def build_safeguard(
    spaces: Sequence[PrivacySpace],
    train_images: torch.Tensor | np.ndarray | Iterable,
    train_patient_ids: Sequence[str],
    holdout_images: torch.Tensor | np.ndarray | Iterable,
    holdout_patient_ids: Sequence[str],
    datalist_fingerprint: str,
    quantile: float = 0.01,
    floor: float = 0.0,
    batch_size: int = 64,
    duplicate_check: bool = True,
    views: Callable[[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    joint: bool = True,
    cross_patient_images: int | None = None,
    specificity: float | None = None,
    consensus: int | None = None,
) -> PrivacySafeguard:
    """One exact training index per space, each with its threshold calibrated on the holdout patients.

    The one way the sampler and ``monai-synth guard`` set the safeguard up, so both certify the same thing.

    Args:
        spaces: privacy spaces; a candidate must pass every one.
        train_images: model-space training images (a batch, or an iterable of batches that can be read again).
        train_patient_ids: patient id of every training image, in order.
        holdout_images: model-space images of patients not in the training set (same forms as ``train_images``).
        holdout_patient_ids: patient id of every holdout image.
        datalist_fingerprint: fingerprint of the training datalist, recorded in each index.
        quantile: holdout quantile that sets each threshold (see :func:`calibrate_threshold`).
        floor: absolute minimum threshold.
        batch_size: images embedded at once, fewer where their query vectors would exceed
            :data:`~monai_synth.privacy.spaces.QUERY_FLOATS` (large 3D variant sets).
        duplicate_check: refuse a holdout holding near-duplicates of training images (see
            :func:`~monai_synth.privacy.calibration.calibrate_threshold`); switch off only knowingly.
        views: ``model image (C, *spatial) -> the model-space images the safeguard will judge for it`` (a release's
            intensity views, :meth:`~monai_synth.privacy.release.ReleaseEncoder.model_views`), so the holdout is
            judged as a candidate will be (each space embeds every view of every holdout image once, for its
            threshold, its duplicate screen and the joint calibration). None: the image itself.
        joint: calibrate the spaces together so that, judged as candidates are (every space, every view), at most
            ``quantile`` of the holdout images are rejected (see
            :func:`~monai_synth.privacy.calibration.joint_space_quantile`); each space's threshold is then a lower
            quantile of its holdout distances, recorded as ``space_quantile``. False: each space at ``quantile``,
            so k spaces reject up to k times ``quantile`` of unseen patients' images.
        cross_patient_images: training images measured against the other training patients that join the holdout as
            calibration samples (see :func:`~monai_synth.privacy.calibration.calibrate_threshold`), the same ones in
            every space. None (default): enough for ``len(spaces) / quantile`` samples in all (what k spaces together
            need for the asked rate), at most every training image. 0: the holdout alone. The samples lower the
            thresholds to where the asked share of new patients is refused (a small holdout alone sets each threshold
            at its smallest distance), so copies as far from their source as new patients are from the training set
            pass more often; the specificity test refuses those: together they refused fewer new patients' images
            and released fewer copies than the holdout alone in every 2D modality of the attack benchmark (see
            :data:`DEFAULT_SPECIFICITY`).
        specificity: see :class:`PrivacySafeguard`. None (default): :data:`DEFAULT_SPECIFICITY` with the duplicate
            screen, off without it, and off (with a warning) where a space's holdout gives no ratio to test against
            (a single training patient); with ``joint``, lowered until at most :data:`SPECIFICITY_SHARE` of the
            calibration images are refused by it in some space. 0: off. An explicit level needs
            ``duplicate_check`` and is kept as given: it refuses about ``specificity`` of new patients' images per
            space on top of ``quantile``, which the joint calibration does not count.
        consensus: see :class:`PrivacySafeguard`. None (default): with ``joint`` and at least
            :data:`CONSENSUS_MIN_SPACES` spaces, the least count of spaces that at most :data:`CONSENSUS_SHARE` of the
            calibration images reach; off otherwise. 0: off. An explicit count is kept as given.

    Raises:
        ValueError: a space in which unseen patients' images are all as close to training as copies are (a collapsed
            space: its threshold would guard nothing), or a holdout that fails calibration's checks.
    """
    if cross_patient_images is None:
        cross_patient_images = max(0, math.ceil(len(spaces) / quantile - 1e-9) - len(holdout_patient_ids))
    default_specificity = specificity is None
    if default_specificity:
        specificity = DEFAULT_SPECIFICITY if duplicate_check else 0.0
    elif specificity and not duplicate_check:
        raise ValueError("specificity needs the duplicate screen's holdout statistics: keep duplicate_check=True")
    checks, holdout_d, cross, pairs = [], {}, {}, {}
    for space in spaces:
        index = TrainingIndex.build(space, train_images, train_patient_ids, datalist_fingerprint, batch_size)
        # the holdout (and the cross-patient training images) embedded once per space, judged as a candidate is
        # (every view), for the threshold, its duplicate screen and the joint calibration alike
        name = index.space_name
        calibration, holdout_d[name], cross[name], pairs[name] = _calibrate(
            index,
            holdout_images,
            quantile,
            floor,
            holdout_patient_ids=holdout_patient_ids,
            holdout_vectors=None,
            views=views,
            batch_size=batch_size,
            duplicate_check=duplicate_check,
            duplicate_z=DUPLICATE_Z,
            duplicate_alpha=DUPLICATE_ALPHA,
            ci_level=0.95,
            training_images=train_images,
            cross_patient_images=cross_patient_images,
        )
        checks.append((index, calibration))
    # jointly, one set of cross-patient samples for every space: a sample any space's screen flags is left out of all
    flagged = np.any([c.flagged for c in cross.values()], axis=0)
    if flagged.any():
        _warn_training_duplicates(next(iter(cross.values())).rows[flagged], train_patient_ids)
    if default_specificity and specificity:
        specificity = _testable_specificity(checks, specificity)
    if default_specificity and specificity and joint:
        chances = _calibration_chances(checks, pairs, cross, flagged)
        specificity = _specificity_within_share(chances, specificity, SPECIFICITY_SHARE)
    if consensus is None:
        consensus = 0
        if joint and len(checks) >= CONSENSUS_MIN_SPACES:
            consensus = _consensus_within_share(_calibration_patients_per_space(checks, pairs, cross, flagged))
    safeguard = PrivacySafeguard(checks, batch_size=batch_size, specificity=specificity, consensus=consensus)
    if not joint or (len(checks) == 1 and views is None):
        return safeguard
    judged = {name: _pooled(holdout_d, cross, name, flagged) for name in holdout_d}
    scales = {name: tail_scale(np.sort(d)) for name, d in judged.items()}
    space_quantile = joint_space_quantile(judged, quantile, margin=safeguard.margin, tail_scales=scales)
    n = len(next(iter(judged.values())))
    extrapolated = all(scales.values())
    reach = 1.0 / math.e if extrapolated else 1.0  # the lowest (n + 1) * quantile a threshold can stand for
    if (n + 1) * space_quantile < reach and len(checks) * reach / (n + 1) > quantile:
        # below one calibration image per space a threshold refuses about 1 / (n + 1) of new patients' images, at most
        # one tail scale below it about 1 / (e (n + 1)); k spaces together up to k times that, which matters only where
        # that exceeds the asked rate
        n_holdout = len(next(iter(holdout_d.values())))
        parts = "all holdout" if n == n_holdout else f"{n_holdout} holdout, {n - n_holdout} training images measured "
        parts += "" if n == n_holdout else "against the other training patients"
        patients = _calibration_patients(holdout_patient_ids, train_patient_ids, cross, flagged)
        where = (
            "one tail scale below its smallest calibration distance (as far as the tail model reaches)"
            if extrapolated
            else "about its smallest calibration distance"
        )
        message = (
            f"{n} calibration images ({parts}) are too few to calibrate {len(checks)} privacy spaces together at "
            f"quantile {quantile:g}: each space's threshold is {where}, so up to "
            f"{len(checks) * reach / (n + 1):.1%} of unseen patients' images may be refused instead of {quantile:.1%}"
        )
        if patients < n:
            # one patient's images come close to the training set together: the draws are the patients, not the images
            message += (
                f" (they come from {patients} patients, and an unseen patient close to the training set has all of "
                f"its images refused: up to {min(1.0, len(checks) * reach / (patients + 1)):.1%} of unseen patients)"
            )
        need = math.ceil(len(checks) * reach / quantile)
        message += f"; give at least {need} (more holdout or training patients) for the asked rate"
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
    checks = [
        (
            index,
            cal.at_space_quantile(
                judged[index.space_name], space_quantile, int(flagged.sum()), scales[index.space_name]
            ),
        )
        for index, cal in checks
    ]
    return PrivacySafeguard(checks, batch_size=batch_size, specificity=specificity, consensus=consensus)


def _as_image(image) -> torch.Tensor:
    """A finite float32 CPU tensor ``(C, *spatial)`` of one image (or view), or a ValueError saying what is wrong."""
    t = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image).detach()
    t = t.to(device="cpu", dtype=torch.float32)
    if t.ndim < 2:
        raise ValueError(f"image of shape {tuple(t.shape)} is not (C, *spatial)")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("image contains NaN or Inf values")
    return t


def agreeing_spaces(nearest_patients: Iterable[str]) -> int:
    """The largest number of spaces that name one training patient as an image's nearest (0 for none): the statistic
    of the consensus test (see :class:`PrivacySafeguard`)."""
    counts = Counter(nearest_patients).most_common(1)
    return counts[0][1] if counts else 0


def _second_patient_bound(
    index: TrainingIndex, vec: np.ndarray, rows: np.ndarray, patients: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, an upper bound on its distance to the nearest training patient other than ``patients`` (its nearest
    row's), and where the bound holds.

    The query's variant nearest to its nearest row is searched alone: its distance to another patient's row is at least
    the least over every variant. The bound holds where that variant's own nearest patient is the query's (not a tie
    with another patient's row) and it found another patient at all. A larger second distance only makes an image more
    specific, so a bound that leaves the chance at or above the level proves the exact test would not refuse it.
    """
    variants = np.asarray(vec, dtype=np.float32)
    if variants.ndim == 2:
        variants = variants[:, None, :]
    # cosine with the nearest row, from the raw variants (the search already normalised and checked them); any variant
    # gives a valid bound, so rounding here only affects how tight it is
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        own = np.einsum("qvd,qd->qv", variants, index.row_vectors(rows)) / np.sqrt(
            np.einsum("qvd,qvd->qv", variants, variants)
        )
    best = variants[np.arange(len(variants)), np.nan_to_num(own, nan=-np.inf).argmax(axis=1)]
    near_rows, _, bound = index.nearest_two_patients(best)
    near_patients = np.asarray(index.patients, dtype=object)[np.asarray(index.patient_codes)[near_rows]]
    return bound, (near_patients == np.asarray(patients, dtype=object)) & np.isfinite(bound)


def _testable_specificity(checks: Sequence[tuple[TrainingIndex, Calibration]], specificity: float) -> float:
    """The default specificity, or 0 with a warning where some space's holdout gives no ratio to test against."""
    untestable = []
    for index, cal in checks:
        m = (cal.duplicate_screen or {}).get("median_log_ratio")
        if m is None or not (math.isfinite(m) and m > 0):
            untestable.append(index.space_name)
    if not untestable:
        return specificity
    message = (
        f"the specificity test is off: the holdout gives no ratio to test against in space(s) {untestable} (a single "
        "training patient, or holdout images as close to a second training patient as to the first); the thresholds "
        "alone guard this release"
    )
    logger.warning(message)
    warnings.warn(message, stacklevel=3)
    return 0.0


def _calibration_chances(
    checks: Sequence[tuple[TrainingIndex, Calibration]], pairs: dict, cross: dict, flagged: np.ndarray
) -> np.ndarray:
    """``(n, k)``: how specific each calibration image is in each space (the chance of the specificity test, see
    :class:`PrivacySafeguard`), the holdout's images first, then the cross-patient samples no space flagged, as
    :func:`_pooled` orders them. Unscreened: a new patient's look-alike of a training patient, which an identity space
    keeps out of its threshold, is still refused by the test, so it counts."""
    columns = []
    for index, cal in checks:
        name, screen = index.space_name, cal.duplicate_screen or {}
        near, other, _ = pairs[name]
        c = cross[name]
        d1 = _in_calibration_order(near, c.distances, flagged)
        d2 = _in_calibration_order(other, c.other, flagged)
        columns.append(specificity_chance(d1, d2, float(screen["median_log_ratio"]), screen.get("distance_floor", 0.0)))
    return np.stack(columns, axis=1)


def _calibration_patients_per_space(
    checks: Sequence[tuple[TrainingIndex, Calibration]], pairs: dict, cross: dict, flagged: np.ndarray
) -> np.ndarray:
    """``(n, k)`` object array: each calibration image's nearest training patient in each space, ordered as
    :func:`_pooled` orders the images (a cross-patient sample's nearest among the other patients)."""
    columns = []
    for index, _ in checks:
        name = index.space_name
        rows = _in_calibration_order(pairs[name][2], cross[name].nearest, flagged).astype(np.int64)
        columns.append(np.asarray(index.patients, dtype=object)[np.asarray(index.patient_codes)[rows]])
    return np.stack(columns, axis=1)


def _consensus_within_share(patients: np.ndarray, share: float | None = None) -> int:
    """The least count of spaces naming one nearest patient that at most ``share`` (default :data:`CONSENSUS_SHARE`)
    of the calibration images (rows of ``patients``) reach; 0 (off) when even all spaces together are reached
    more often."""
    share = CONSENSUS_SHARE if share is None else share
    agree = np.array([agreeing_spaces(row) for row in patients])
    k = patients.shape[1]
    for count in range(2, k + 1):
        if (agree >= count).mean() <= share:
            return count
    return 0


def _specificity_within_share(chances: np.ndarray, level: float, share: float) -> float:
    """The largest level up to ``level`` at which at most ``share`` of the calibration images (rows of ``chances``)
    are refused by the specificity test in some space (a chance below the level), logged when it is lower."""
    least = np.sort(np.nan_to_num(chances, nan=1.0).min(axis=1))
    allowed = math.floor(share * len(least) + 1e-9)
    if allowed >= len(least) or least[allowed] >= level:
        return level
    lowered, refused = float(least[allowed]), least < level
    message = (
        f"the specificity test is lowered from {level:g} to {lowered:.3g} per space: at {level:g}, "
        f"{int(refused.sum())} of {len(least)} calibration images ({refused.mean():.1%}) are refused by "
        f"it in some space, more than the {share:.1%} it may refuse of new patients' images (the spaces disagree about "
        "which images are specific)"
    )
    logger.info(message)
    return lowered


def _calibration_patients(
    holdout_patient_ids: Sequence[str], train_patient_ids: Sequence[str], cross: dict, flagged: np.ndarray
) -> int:
    """How many patients the pooled calibration images come from: the holdout's, and those of the cross-patient
    training images no space flagged."""
    sample = next(iter(cross.values()), None)
    rows = [] if sample is None else np.asarray(sample.rows)[~np.asarray(flagged, dtype=bool)]
    return len(set(holdout_patient_ids)) + len({str(train_patient_ids[int(r)]) for r in rows})


def _pooled(holdout_d: dict, cross: dict, name: str, flagged: np.ndarray) -> np.ndarray:
    """One space's calibration distances: the holdout's, then the cross-patient samples no space flagged."""
    return _in_calibration_order(holdout_d[name], cross[name].distances, flagged)


def _in_calibration_order(holdout: np.ndarray, cross: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """Per-image values of the calibration images: the holdout's, then those of the cross-patient samples no space
    flagged (the order every joint statistic of the calibration uses)."""
    return np.concatenate([holdout, cross[~flagged]])


def _warn_training_duplicates(rows: np.ndarray, train_patient_ids: Sequence[str]) -> None:
    named = ", ".join(f"{int(r)} ({train_patient_ids[int(r)]})" for r in rows[:10])
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    message = (
        f"{len(rows)} training images look like near-duplicates of another training patient's image (rows {named}"
        f"{more}): left out of the calibration. If they are one person under two ids, merge the ids in the datalist: "
        "the model has seen that person twice, and the gate treats them as two people"
    )
    logger.warning(message)
    warnings.warn(message, stacklevel=3)
