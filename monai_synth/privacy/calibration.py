"""Calibrated rejection thresholds from how close *unseen* patients come to the training set.

Holdout patients were never trained on, so their nearest-training-image distances show how close a
genuinely different person's image naturally comes to some training image in a given space. A synthetic
image closer to a training image than all but a small ``quantile`` of unseen patients' images is treated as
a (near-)copy and rejected: ``threshold = max(floor, quantile-th holdout->train nearest distance)``.
With ``quantile=0.01`` about 1% of genuinely new images are rejected as well; that is the price of the
guarantee and shows up as extra sampling cost in the certificate.

More samples than the holdout (leave one patient out). A candidate must pass every space, so each space's threshold
is set at a lower quantile (about ``quantile / k`` for k spaces, :func:`joint_space_quantile`), which a holdout of a
few hundred images cannot resolve: the threshold is then about its smallest distance, and a new patient's image falls
below it about once in ``n + 1`` per space, k times that for the union (with 7 spaces and 36 holdout patients, 7% of
new patients' images were refused, not 1%). Training images measured against the *other* training patients are
samples of the same thing, how close a person the index holds no image of comes to it, so they join the holdout's
distances (:func:`calibrate_threshold`'s ``training_images``; :func:`~monai_synth.privacy.safeguard.build_safeguard`
adds as many as ``k / quantile`` samples need, by default). Screened for duplicates like the holdout (flagged ones
are left out), they cannot lower a threshold below what new patients show; but a threshold at the asked quantile
passes copies that are as far from their source as new patients are from the training set, which a threshold at the
smallest holdout distance refused, so the safeguard pairs them with its specificity test (an image much closer to
one training patient than to any other is refused; measured in ``benchmarks/safeguard_calibration.py`` and the attack
benchmark). Where even the pooled samples do not reach a space's share (8 spaces at 1% need about 800), the threshold
is extrapolated below the smallest distance by the distances' lower tail (:func:`tail_quantile`), and the joint
share is counted leave-one-out, each calibration image judged by the thresholds the others set, so it estimates what
new images meet rather than what the images that set the thresholds do.

The threshold is only as good as the holdout, and a low quantile is decided by a handful of images, so a
calibration can be lowered quietly: one training patient in the holdout under another id put copies of training
images into it, the 1% quantile fell from 0.221 to 0.046, and blurred, rotated and noised copies then passed.
Patient ids catch a shared id; :func:`calibrate_threshold` also screens the holdout *images* for near-duplicates
of training images (below) and refuses to calibrate on a holdout that holds any.

Duplicate screen. For each holdout image, ``d1`` is its distance to the nearest training image and ``d2`` its
distance to the nearest training image of *another* patient. An image is flagged when both hold:

1. it is far below the bulk of the holdout: its robust z-score on the log scale,
   ``(median(log d1) - log d1) / (1.4826 * MAD(log d1))``, is at least ``DUPLICATE_Z`` (5). Distances are compared
   on the log scale because copies sit near 0, where ratios, not differences, tell them apart;
2. it is much closer to one training patient than to any other, beyond what chance allows. For a new patient,
   the ratio of the distances to the nearest and the second nearest training patient follows the law used by
   the TwoNN intrinsic-dimension estimator: ``(d1 / d2) ** a`` is uniform on (0, 1) whatever the local density,
   ``a`` being half the intrinsic dimension. ``a`` is estimated from the holdout itself by the median,
   ``a = ln 2 / median(log(d2 / d1))``, which a few duplicates cannot move, so the chance that an unseen patient's
   image shows a ratio this small is ``p = 2 ** (-log(d2 / d1) / median(log(d2 / d1)))``; the image is flagged when
   ``n * p < DUPLICATE_ALPHA`` (0.01, Bonferroni over the ``n`` holdout images). Distances are measured from an
   exact match: a space that compares one slot of R at a time (``parts``, ``crops``, ``halves``) scores an exact
   match ``1 - 1 / sqrt(R)``, and its ratios are taken above that floor (:func:`log_distance_ratio`).

A space trained on patient identity (the learned ``embedding``, ``identity_space = True``) puts a new patient who
looks like a training patient next to that patient's images, and the screen flags that as it would a copy. There the
flagged images are left out of that space's threshold with a warning instead of refusing the holdout: they cannot
lower it, and a real copy of a training image is close in the pixel-based spaces too, whose screens refuse it.

Each test alone is fooled by a holdout that pools populations of very different typical distances (e.g. two
modalities in one space): the lower population looks far below the bulk, and its intrinsic dimension differs
from the median one. A genuine image rarely passes both, while a copy of a training image does both at once.
Both tests are scale-free; distances below ``1e-7`` (float32 rounding of an exact copy) count as ``1e-7``. The
screen looks for a minority of copies: a holdout that is mostly copies has no bulk of new patients to compare with.

Measured on 2D phantom cohorts (CT, MRI, PET, ultrasound at 32 px; plain and flip/shift/zoom-invariant pixel
spaces; 100 training patients with 3 images each). False refusals: none of 72 clean holdouts of 300 images of
unseen patients (13 seeds x 4 modalities in the plain space, 5 x 4 in the invariant one); on holdouts resampled
from the 24 cohorts the rule was tuned on, none of 4800 of each size from 50 to 300 images, and 3 of 4800 of 20
images (the least a 5% quantile accepts). Holdouts pooling two modalities in one space were refused up to 2.3% of the time (PET with
ultrasound, 100 images). Detection, one copy planted among 299 holdout images: exact copies 100%; in ultrasound,
noised and blurred copies 100% and 3-degree rotations 93%; over all four modalities 50-74% of noised, 69% of
3-degree rotated and 53% of blurred copies. A missed copy sat within the natural spread of the holdout,
because the alteration moved it about as far from its original as a different patient is: three such copies of one
training patient lowered the 1% threshold by at most 23% (against 79% in the incident above). Patient leakage
through *other* images of a training patient (another study) is left to the patient-id check: those images are
about as far from the training set as a new patient's.

Confidence interval: the threshold is a low quantile of a few hundred values, so it is uncertain.
:class:`Calibration` stores a distribution-free (order-statistic, binomial) confidence interval for the holdout
quantile and the sorted holdout distances, so :meth:`Calibration.holdout_percentile` can say where any distance
sits among unseen patients.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from scipy.stats import binom

from monai_synth.privacy.index import TrainingIndex, _iter_batches
from monai_synth.privacy.spaces import distance_floor, embed_variants, images_per_batch, note_query_size

__all__ = [
    "COLLAPSED_SPACE",
    "CrossPatient",
    "cross_patient_rows",
    "CollapsedSpaceError",
    "Calibration",
    "HoldoutDuplicateError",
    "calibrate_threshold",
    "joint_space_quantile",
    "log_distance_ratio",
    "specificity_chance",
    "min_holdout_size",
    "quantile_confidence_interval",
    "tail_quantile",
    "tail_scale",
    "TAIL_SHARE",
    "TAIL_SPACINGS",
    "DUPLICATE_Z",
    "DUPLICATE_ALPHA",
]

DUPLICATE_Z = 5.0
"""Robust log-scale z-score at or above which a holdout image counts as far below the bulk."""
DUPLICATE_ALPHA = 0.01
"""Bonferroni-adjusted chance under which a nearest/second-patient distance ratio counts as a specific match."""
TAIL_SPACINGS = 10
"""Gaps between the smallest calibration distances that estimate their lower tail (:func:`tail_scale`)."""
TAIL_SHARE = 0.05
"""The largest share of the calibration distances those gaps may span (so a tail model needs 200 of them)."""
_RESOLUTION = 1e-7  # distances below this are float32 rounding: 1 - cosine of an exact copy
_MAX_DICT_DISTANCES = 1001  # holdout distances kept in to_dict(): all up to this many, else evenly spaced ranks
_DISTANCE_DIGITS = 6  # significant digits of the holdout distances in to_dict()
_MAX_DISTANCE = 2.0  # distances are 1 - cosine, in [0, 2]


COLLAPSED_SPACE = 1e-4
"""Median holdout distance below which a space is refused as collapsed (every image maps to about one vector): ten
times the float32 rounding margin the safeguard adds to every threshold, so a threshold below it is rounding noise."""


class CollapsedSpaceError(ValueError):
    """A privacy space that maps new patients' images as close to training as copies: it cannot guard anything."""


def min_holdout_size(quantile: float, tail: int = 1) -> int:
    """Holdout images needed so that at least ``tail`` images fall below the ``quantile`` (``ceil(tail / q)``).

    With fewer, the quantile is just the smallest distance seen and says nothing about the tail.
    """
    return int(math.ceil(tail / quantile - 1e-9))


def quantile_confidence_interval(
    sorted_values: np.ndarray, quantile: float, level: float = 0.95, lower: float = 0.0, upper: float = _MAX_DISTANCE
) -> tuple[float, float, float]:
    """Distribution-free confidence interval for a population quantile from order statistics.

    The number of sample values below the true ``quantile`` is Binomial(n, quantile) whatever the distribution, so
    the ``l``-th and ``u``-th smallest values bracket it with probability ``B(u - 1) - B(l - 1)`` (``B`` the binomial
    CDF). ``l`` and ``u`` are chosen equal-tailed, each side missing with probability at most ``(1 - level) / 2``;
    where no order statistic is extreme enough (a 1% quantile of 100 values has no lower one), the bound is the end
    of the range the values live in (``lower`` / ``upper``).

    Args:
        sorted_values: the sample, ascending.
        quantile: the quantile, in (0, 1).
        level: confidence level, in (0, 1).
        lower: lower end of the range of possible values (distances: 0).
        upper: upper end of that range (distances: 2).

    Returns:
        ``(lo, hi, coverage)``: the interval and its exact coverage under the binomial law (at least ``level``).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), got {level}")
    x = np.asarray(sorted_values, dtype=np.float64)
    n = len(x)
    cdf = binom.cdf(np.arange(n + 1), n, quantile)  # cdf[k] = P(at most k of n values below the quantile)
    tail = (1.0 - level) / 2.0
    below = np.flatnonzero(cdf <= tail)  # l - 1 candidates: P(X_(l) > q) = cdf[l - 1]
    l_rank = int(below[-1]) + 1 if len(below) else 0
    above = np.flatnonzero(cdf >= 1.0 - tail)  # u - 1 candidates: P(X_(u) < q) = 1 - cdf[u - 1]
    u_rank = int(above[0]) + 1 if len(above) else n + 1
    lo = float(x[l_rank - 1]) if l_rank >= 1 else float(lower)
    hi = float(x[u_rank - 1]) if u_rank <= n else float(upper)
    coverage = float((cdf[u_rank - 1] if u_rank <= n else 1.0) - (cdf[l_rank - 1] if l_rank >= 1 else 0.0))
    return lo, hi, coverage


def _summary(d: np.ndarray, coverage: float) -> dict:
    return {
        "min": float(d.min()),
        **{f"p{p:g}": float(np.percentile(d, p)) for p in (1, 5, 25, 50)},
        "mean": float(d.mean()),
        "max": float(d.max()),
        "ci_coverage": coverage,
    }


def tail_scale(sorted_values: np.ndarray, count: int = TAIL_SPACINGS) -> float:
    """How fast the lowest calibration distances thin out: the mean of ``j * (d_(j+1) - d_(j))`` over the ``count``
    smallest gaps (``j`` from 1).

    Near its low end a distance distribution is taken to have an exponential tail, ``F(d) ~ exp(d / s)``, whatever
    the offset: ``1 - cosine`` distances of some spaces sit on a floor shared by every image (crops and parts near
    0.85 and 0.55), so a tail proportional to ``d ** a`` from 0 would move their thresholds by far more than their
    images differ. Under that tail the normalised spacings ``j * (d_(j+1) - d_(j))`` of the smallest order statistics
    are independent exponentials of mean ``s`` (Renyi), so their mean estimates ``s`` from where the threshold lies.
    That holds only where the ``count`` smallest values are a small share of the sample (at most
    :data:`TAIL_SHARE`): from fewer values the gaps reach into the bulk and overstate the tail. There, and below two
    values, it returns 0 (no tail model: thresholds no lower than the smallest value). On 3D CT cohorts of 138
    calibration volumes the tail model lowered thresholds by up to 30% and histogram-equalised and motion-blurred
    copies passed.
    """
    d = np.asarray(sorted_values, dtype=np.float64)
    m = min(int(count), len(d) - 1)
    if m < 1 or m > TAIL_SHARE * len(d):
        return 0.0
    j = np.arange(1, m + 1)
    return float(np.mean(j * np.diff(d[: m + 1])))


def tail_quantile(sorted_values: np.ndarray, quantile: float, tail_scale: float | None = None) -> float:
    """The ``quantile`` of the distribution a sorted sample of distances was drawn from, below its smallest value too.

    The j-th smallest of n values lies, on average, at the population's ``j / (n + 1)`` quantile (Weibull plotting
    position), so between order statistics the quantile is interpolated on that scale. A joint threshold is a low
    quantile (about ``1% / k`` for k spaces) that a few hundred calibration distances do not reach: clamped to the
    smallest one, each space refuses about ``1 / (n + 1)`` of new patients' images whatever was asked, k spaces up
    to ``k / (n + 1)`` together. Below the smallest value ``d_(1)`` the quantile follows the exponential lower tail
    of :func:`tail_scale`: ``d_(1) + s * log(quantile * (n + 1))``, at most one scale below ``d_(1)`` (quantile
    ``1 / (e (n + 1))``; a tail fitted above the smallest value is not trusted further below it) and never below
    ``d_(1) / 2``.

    Args:
        sorted_values: the calibration distances, ascending.
        quantile: the quantile, in (0, 1).
        tail_scale: ``s``; None: no extrapolation (the smallest value).
    """
    d = np.asarray(sorted_values, dtype=np.float64)
    n = len(d)
    position = quantile * (n + 1)  # 1-based rank
    if position >= n:
        return float(d[-1])
    if position >= 1.0:
        return float(np.interp(position, np.arange(1, n + 1), d))
    if tail_scale is None or not tail_scale > 0:
        return float(d[0])
    return float(max(d[0] / 2.0, d[0] + tail_scale * max(math.log(position), -1.0)))


def joint_space_quantile(
    distances: Mapping[str, np.ndarray],
    quantile: float,
    margin: float = 0.0,
    tail_scales: Mapping[str, float | None] | None = None,
) -> float:
    """The per-space quantile at which all spaces together reject at most ``quantile`` of new patients' images.

    Each space's threshold at its own ``quantile`` rejects that share of unseen patients' images, but a candidate
    must pass every space (and every intensity view), so k spaces together reject up to k times as many: with four
    spaces at 1%, about 8% of new patients' images were refused. This returns the largest ``q'`` in
    ``[quantile / 2k, quantile]`` such that, with each space's threshold at its ``q'`` quantile
    (:func:`tail_quantile`), at most ``quantile`` of the calibration images are rejected in at least one space, each
    judged *leave-one-out* by the thresholds the other images set. Judged by thresholds it helped set, an image at a
    space's smallest distance is never below it, so the count in sample misses about one image per space, ``k / (n +
    1)`` in all (2.3% with 8 spaces and 348 images, where 1% was asked); left out, it counts as a new image would.
    Spaces that agree about which images are close keep ``quantile``; independent ones get about ``quantile / k``;
    the lower end is returned when even it rejects more.

    Args:
        distances: space -> the calibration images' nearest-training distances, same images in the same order.
        quantile: target share of calibration images rejected by all spaces together, in (0, 0.5].
        margin: what the safeguard adds to every threshold (an image passes at ``distance >= threshold + margin``).
        tail_scales: space -> the scale of its distances' lower tail (:func:`tail_scale`, see :func:`tail_quantile`);
            None, or a space missing: thresholds no lower than its smallest distance.
    """
    if not distances:
        raise ValueError("joint calibration needs the holdout distances of at least one space")
    arrays = {name: np.asarray(d, dtype=np.float64).ravel() for name, d in distances.items()}
    sizes = {len(d) for d in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"every space needs the distances of the same holdout images, got sizes {sorted(sizes)}")
    if not all(np.isfinite(d).all() for d in arrays.values()):
        raise ValueError("holdout distances must be finite: an image the safeguard cannot judge cannot calibrate it")
    n = sizes.pop()
    scales = dict(tail_scales or {})
    spaces = [(np.argsort(d, kind="stable"), np.sort(d), scales.get(name)) for name, d in arrays.items()]

    def rejected(q: float) -> float:
        out = np.zeros(n, dtype=bool)
        for order, d, scale in spaces:
            # only images near the low end can fall below a threshold the others set
            for rank in range(min(n, int(q * (n + 1)) + 2)):
                if d[rank] < tail_quantile(np.delete(d, rank), q, scale) + margin:
                    out[order[rank]] = True
        return float(out.mean())

    return _largest_quantile_within(rejected, quantile, len(arrays))


def _largest_quantile_within(rejected: Callable[[float], float], quantile: float, spaces: int) -> float:
    """The largest per-space quantile in ``[quantile / 2k, quantile]`` whose ``rejected`` share is at most
    ``quantile`` (bisection: ``rejected`` is a non-decreasing step function); the lower end when even it rejects
    more."""
    lo, hi = quantile / (2 * spaces), float(quantile)
    if rejected(hi) <= quantile:
        return hi
    if rejected(lo) > quantile:
        return lo
    for _ in range(40):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if rejected(mid) <= quantile else (lo, mid)
    return lo


def _thinned_ranks(n: int, m: int) -> np.ndarray:
    """0-based ranks of the ``m`` order statistics kept out of ``n`` (first and last always)."""
    return np.round(np.linspace(0, n - 1, m)).astype(np.int64)


@dataclass
class Calibration:
    """A calibrated threshold for one privacy space, and what it was calibrated on.

    Attributes:
        space: privacy space name.
        threshold: images closer than this to a training image are rejected (``max(floor, quantile_value)``).
        quantile: holdout quantile asked for: the share of unseen patients' images rejected (by all spaces together
            when the calibration was made jointly, see ``space_quantile``).
        floor: absolute minimum threshold asked for.
        quantile_value: the holdout distance at ``quantile``, before the floor.
        n_holdout: holdout images used.
        n_holdout_patients: distinct holdout patients (0 if unknown).
        index_fingerprint: fingerprint of the index it was calibrated against; the safeguard refuses to pair it
            with another index.
        summary: min / percentiles / mean / max of the holdout->train nearest distances, and ``ci_coverage``, the
            exact coverage of ``threshold_ci`` (at least ``ci_level``).
        threshold_ci: distribution-free confidence interval ``(lo, hi)`` for the population quantile the threshold
            estimates, with the floor applied like the threshold (see :func:`quantile_confidence_interval`); a wide
            interval says the holdout is too small to pin the threshold down. None for calibrations made before it
            was recorded.
        ci_level: confidence level of ``threshold_ci`` (None with it).
        duplicate_screen: the settings and outcome of the holdout near-duplicate screen (see the module docstring),
            or None if it was switched off (or the calibration predates it): a certificate then shows that nothing
            guarded the threshold against training images in the holdout.
        space_quantile: the quantile of this space's holdout distances that sets the threshold when several spaces
            (and intensity views) were calibrated jointly so that together they reject ``quantile`` of the holdout
            images (see :func:`joint_space_quantile`); None when the threshold is this space's own ``quantile``.
        holdout_distances: the sorted calibration distances (the holdout's to the training set, then the
            cross-patient samples'): all of them, or, for a calibration read back with :meth:`from_dict` from more
            than 1001 samples, 1001 order statistics at evenly spaced ranks (first and last included); used by
            :meth:`holdout_percentile`. Not compared by ``==``.
        n_cross_patient: training images whose distance to the nearest image of *another* training patient joined
            the holdout's distances (leave one patient out; see :func:`calibrate_threshold`); 0: the holdout alone.
        cross_patient_dropped: cross-patient samples left out because the duplicate screen flagged them (an image
            of the same person under another id).
        tail_scale: the scale of the calibration distances' exponential lower tail by which a joint threshold below
            the smallest of them is extrapolated (see :func:`tail_scale`); None: no lower than it.
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
    threshold_ci: tuple[float, float] | None = None
    ci_level: float | None = None
    duplicate_screen: dict | None = None
    space_quantile: float | None = None
    holdout_distances: np.ndarray | None = field(default=None, repr=False, compare=False)
    n_cross_patient: int = 0
    cross_patient_dropped: int = 0
    tail_scale: float | None = None

    @property
    def n_calibration(self) -> int:
        """Calibration samples: the holdout images and the training images measured against the other patients."""
        return self.n_holdout + self.n_cross_patient

    def __post_init__(self) -> None:
        if self.threshold_ci is not None:
            self.threshold_ci = (float(self.threshold_ci[0]), float(self.threshold_ci[1]))
        if self.holdout_distances is not None:
            d = np.sort(np.asarray(self.holdout_distances, dtype=np.float64).ravel())
            if not 1 <= len(d) <= self.n_calibration or not np.isfinite(d).all():
                raise ValueError(
                    f"holdout_distances must hold 1 to n_holdout + n_cross_patient={self.n_calibration} finite values, "
                    f"got {len(d)} values: recalibrate, or leave them out"
                )
            self.holdout_distances = d

    def holdout_percentile(self, distance: float) -> float:
        """Share of the holdout images that were closer to the training set than ``distance`` (0 to 1).

        Says where a candidate's distance sits among unseen patients: 0.004 means only 0.4% of new patients' images
        come that close to a training image; a released image at 0.5 is as far as a typical new patient's.

        Args:
            distance: a distance in this calibration's space (``1 - cosine``).

        Raises:
            ValueError: if the calibration holds no holdout distances (read from an older dict; recalibrate) or the
                distance is not a finite number.
        """
        if self.holdout_distances is None:
            raise ValueError(
                f"the {self.space!r} calibration holds no holdout distances (it predates them); recalibrate to get "
                "holdout percentiles"
            )
        t = float(distance)
        if not math.isfinite(t):
            raise ValueError(f"distance must be a finite number, got {distance}")
        d, n = self.holdout_distances, self.n_calibration
        j = int(np.searchsorted(d, t, side="left"))  # stored values below t
        if len(d) == n:
            return j / n
        if j == 0 or j == len(d):  # the smallest and the largest distance are always kept
            return float(j > 0)
        # thinned: between the kept order statistics j-1 (< t) and j (>= t), interpolate the count linearly
        ranks = _thinned_ranks(n, len(d))
        below_at_least, below_at_most = ranks[j - 1] + 1, ranks[j]
        gap = d[j] - d[j - 1]
        frac = (t - d[j - 1]) / gap if gap > 0 else 0.0
        return float(below_at_least + frac * (below_at_most - below_at_least)) / n

    def at_space_quantile(
        self,
        distances: np.ndarray,
        space_quantile: float,
        cross_patient_dropped: int | None = None,
        tail_scale: float | None = None,
    ) -> Calibration:
        """This calibration re-set at ``space_quantile`` of ``distances`` (the same calibration images, as judged).

        Used by joint calibration: ``distances`` are the holdout images' distances as the safeguard will measure a
        candidate's (nearest over every intensity view), then the cross-patient ones, and the threshold becomes their
        ``space_quantile``, with its interval, summary and calibration distances from them; the duplicate screen and
        ``quantile`` are kept. ``cross_patient_dropped``: the cross-patient samples left out of ``distances`` (the
        spaces share one set: a sample one space's screen flags is left out of all of them); None: as before.
        ``tail_scale``: how the threshold is extrapolated below the smallest distance (see :func:`tail_quantile`);
        None: no lower than it.
        """
        d = np.sort(np.asarray(distances, dtype=np.float64).ravel())
        dropped = self.cross_patient_dropped if cross_patient_dropped is None else int(cross_patient_dropped)
        n_cross = self.n_cross_patient + self.cross_patient_dropped - dropped
        if n_cross < 0 or len(d) != self.n_holdout + n_cross or not np.isfinite(d).all():
            raise ValueError(
                f"expected {self.n_holdout + n_cross} finite calibration distances for space {self.space!r}, got "
                f"{len(d)}"
            )
        if not 0.0 < space_quantile <= self.quantile:
            raise ValueError(f"space_quantile must be in (0, {self.quantile}], got {space_quantile}")
        q_value = tail_quantile(d, space_quantile, tail_scale)
        lo, hi, coverage = quantile_confidence_interval(d, space_quantile, self.ci_level or 0.95)
        return dataclasses.replace(
            self,
            threshold=max(self.floor, q_value),
            quantile_value=q_value,
            summary=_summary(d, coverage),
            threshold_ci=(max(self.floor, lo), max(self.floor, hi)),
            ci_level=self.ci_level or 0.95,
            space_quantile=float(space_quantile),
            holdout_distances=d,
            n_cross_patient=n_cross,
            cross_patient_dropped=dropped,
            tail_scale=None if tail_scale is None else float(tail_scale),
        )

    def to_dict(self) -> dict:
        """JSON-ready dict (certificates): small, and free of patient ids and training pixels.

        The holdout distances go in rounded to 6 significant digits, all of them up to 1001 images and 1001 evenly
        spaced order statistics beyond, so a certificate stays a few kB per space.
        """
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "holdout_distances"}
        if self.threshold_ci is not None:
            out["threshold_ci"] = [float(v) for v in self.threshold_ci]
        d = self.holdout_distances
        if d is not None:
            if len(d) > _MAX_DICT_DISTANCES:
                d = d[_thinned_ranks(len(d), _MAX_DICT_DISTANCES)]
            d = [float(f"{v:.{_DISTANCE_DIGITS}g}") for v in d]
        out["holdout_distances"] = d
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """Inverse of :meth:`to_dict`; accepts dicts written before the interval, screen and distances existed."""
        data = dict(data)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"calibration dict has unknown fields {unknown}; was it written by a newer version?")
        if data.get("threshold_ci") is not None:
            data["threshold_ci"] = tuple(data["threshold_ci"])
        if data.get("holdout_distances") is not None:
            data["holdout_distances"] = np.asarray(data["holdout_distances"], dtype=np.float64)
        return cls(**data)


class HoldoutDuplicateError(ValueError):
    """The holdout holds near-duplicates of training images, which would lower the threshold.

    Attributes:
        rows: positions of the flagged holdout images.
    """

    def __init__(self, message: str, rows: Sequence[int]) -> None:
        super().__init__(message)
        self.rows = [int(r) for r in rows]


def log_distance_ratio(nearest: np.ndarray, other_patient: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """``log((d2 - floor) / (d1 - floor))``: how much closer an image is to its nearest training patient than to any
    other, the statistic of the ratio law (module docstring). Differences below ``1e-7`` count as ``1e-7``; NaN stays
    NaN.

    ``floor`` is the space's least possible distance (:func:`~monai_synth.privacy.spaces.distance_floor`). The law
    holds for distances measured from an exact match: a slot space's distances, ``1 - r / sqrt(R)``, all lie within
    ``1 / sqrt(R)`` of 1, and their plain ratios squeeze toward 1, so a typical new patient's ratio looked rare (2D
    PET at the default level 0.003: ``parts`` refused 2.0% of new slices on the raw distances, ``halves`` 1.5%; above
    the floor neither refused any of 200; ``benchmarks/safeguard_specificity_law.py``).
    """
    d1 = np.maximum(np.asarray(nearest, dtype=np.float64) - floor, _RESOLUTION)
    d2 = np.maximum(np.asarray(other_patient, dtype=np.float64) - floor, _RESOLUTION)  # NaN stays NaN
    return np.log(d2 / d1)


def specificity_chance(
    nearest: np.ndarray, other_patient: np.ndarray, median_log_ratio: float, floor: float = 0.0
) -> np.ndarray:
    """How often a new patient's image is this specific to its nearest training patient: ``2 ** (-L / m)``, ``L`` the
    :func:`log_distance_ratio` above ``floor`` and ``m`` the holdout's median of it; 1.0 where ``d2`` is NaN (no second
    patient to compare with)."""
    return np.nan_to_num(np.exp2(-log_distance_ratio(nearest, other_patient, floor) / median_log_ratio), nan=1.0)


def _screen_duplicates(
    nearest: np.ndarray, other_patient: np.ndarray, z_min: float, alpha: float, floor: float = 0.0
) -> tuple[np.ndarray, dict]:
    """Flag holdout near-duplicates of training images (rule in the module docstring).

    Args:
        nearest: ``(n,)`` distance to the nearest training image.
        other_patient: ``(n,)`` distance to the nearest training image of another patient (NaN: the index has a
            single patient, so the ratio test cannot discriminate and is taken as passed).
        floor: the space's least possible distance; the ratio test measures distances above it.

    Returns:
        the boolean mask of flagged images, and the settings and estimates for the record.
    """
    d1 = np.maximum(nearest, _RESOLUTION)
    log_d1 = np.log(d1)
    median = float(np.median(log_d1))
    mad = 1.4826 * float(np.median(np.abs(log_d1 - median)))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(log_d1 < median, (median - log_d1) / mad, 0.0)
    far_below = z >= z_min
    single_patient = bool(np.isnan(other_patient).all())
    if single_patient:
        specific = np.ones(len(d1), dtype=bool)
        median_ratio = float("nan")
    else:
        log_ratio = log_distance_ratio(nearest, np.nan_to_num(other_patient, nan=_MAX_DISTANCE), floor)
        median_ratio = float(np.median(log_ratio))
        p_adjusted = len(d1) * np.exp2(-log_ratio / max(median_ratio, 1e-12))
        specific = p_adjusted < alpha
    flagged = far_below & specific
    record = {
        "rule": "robust z of log d1 >= z_min and n * 2**(-log(d2'/d1') / median(log(d2'/d1'))) < alpha, d' = d - floor",
        "distance_floor": float(floor),
        "z_min": float(z_min),
        "alpha": float(alpha),
        "median_log_distance": median,
        "mad_log_distance": mad,
        "median_log_ratio": median_ratio,
        "ratio_exponent": float(math.log(2) / median_ratio) if median_ratio > 0 else None,
    }
    return flagged, record


def _view_vectors(
    space, holdout: torch.Tensor | np.ndarray | Iterable, views: Callable[[torch.Tensor], Sequence], batch_size: int
) -> Iterator[np.ndarray]:
    """``(B, W * V, d)`` query vectors per batch: every variant of every view of each image, embedded once.

    About ``batch_size`` views are embedded at once; an image with fewer views than the others repeats its first
    (the least over the variants is unchanged).
    """
    for batch in _iter_batches(holdout, batch_size):
        batch = torch.as_tensor(np.asarray(batch) if not torch.is_tensor(batch) else batch)
        per_image = [[torch.as_tensor(v).detach().cpu().float() for v in views(image)] for image in batch]
        most, start = max(len(v) for v in per_image), 0
        while start < len(per_image):
            step = max(1, images_per_batch(space, per_image[start][0], batch_size) // most)
            chunk, start = per_image[start : start + step], start + step
            vec = embed_variants(space, torch.stack([v for image in chunk for v in image]))
            note_query_size(space, chunk[0][0], vec)
            out, k = [], 0
            for image in chunk:
                own, k = vec[k : k + len(image)], k + len(image)
                own = np.concatenate([own, np.repeat(own[:1], most - len(image), axis=0)])
                out.append(own.reshape(-1, own.shape[-1]))
            yield np.stack(out)


def _neighbours(
    index: TrainingIndex, batches: Iterable[np.ndarray], other_patient: bool, own: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's nearest training distance and row, and (if asked) its nearest distance to another patient.

    ``own``: per query, a training patient whose rows are skipped (a training image measured against the other
    training patients); None: every row counts. The other-patient distance needs the nearest rows of more than one
    patient: a few rows are searched first and, for the queries whose few nearest rows do not hold them, as many rows
    as the skipped patient and the most imaged patient have, plus one.
    """
    patients = np.asarray(index.patients, dtype=object)
    counts = np.bincount(np.asarray(index.patient_codes), minlength=len(patients))
    own_rows = dict(zip(patients.tolist(), counts.tolist()))
    most_rows = int(counts.max())
    second = other_patient and len(patients) > 1
    d1, r1, d2, start = [], [], [], 0
    for vec in batches:
        q, start = len(vec), start + len(vec)
        skip = None if own is None else np.asarray(own[start - q : start], dtype=object)
        skipped = 0 if skip is None else max(own_rows.get(p, 0) for p in skip)
        k = min(index.ntotal, (8 if second else 1) + skipped)
        dist, rows, pids = index.search(vec, k=k)
        near, row, other = _first_two_patients(dist, rows, pids, skip, second)
        redo = np.flatnonzero(np.isnan(near) | (np.isnan(other) if second else False))
        if len(redo) and k < index.ntotal:
            k = min(index.ntotal, skipped + most_rows + 1)
            dist, rows, pids = index.search(np.asarray(vec)[redo], k=k)
            near[redo], row[redo], other[redo] = _first_two_patients(
                dist, rows, pids, None if skip is None else skip[redo], second
            )
        d1.append(near)
        r1.append(row)
        d2.append(other)
    if not d1:
        raise ValueError("no images to calibrate on")
    return np.concatenate(d1), np.concatenate(r1), np.concatenate(d2)


def _first_two_patients(
    dist: np.ndarray, rows: np.ndarray, pids: np.ndarray, skip: np.ndarray | None, second: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, the distance and row of its nearest eligible row, and the distance of the nearest eligible row of
    another patient (NaN where the searched rows hold none)."""
    eligible = np.ones(dist.shape, dtype=bool) if skip is None else pids != skip[:, None]
    has = eligible.any(axis=1)
    first = eligible.argmax(axis=1)
    q = np.arange(len(dist))
    near = np.where(has, dist[q, first], np.nan)
    row = np.where(has, rows[q, first], -1)
    other = np.full(len(dist), np.nan)
    if second:
        found = eligible & (pids != pids[q, first][:, None])
        has2 = has & found.any(axis=1)
        other[has2] = dist[has2, found[has2].argmax(axis=1)]
    return near, row, other


def _query_batches(
    index: TrainingIndex,
    images: torch.Tensor | np.ndarray | Iterable,
    views: Callable[[torch.Tensor], Sequence] | None,
    batch_size: int,
) -> Iterator[np.ndarray]:
    """Query vectors of images judged as a candidate is: every view (if given), every variant of the space."""
    index.check_space()
    if views is not None:
        return _view_vectors(index.space, images, views, batch_size)
    return (embed_variants(index.space, b) for b in _iter_batches(images, batch_size))


def cross_patient_rows(patient_codes: Sequence[int], count: int) -> np.ndarray:
    """The training rows whose distances to the other training patients join the calibration, ascending.

    Patients, not images, are the independent samples (one person's images resemble each other), so the rows are
    taken one patient at a time: every patient's first image, then every patient's second, and so on; a round that is
    only partly needed takes patients evenly spaced over the index.
    """
    codes = np.asarray(patient_codes, dtype=np.int64)
    count = max(0, min(int(count), len(codes)))
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    seen: dict[int, int] = {}
    turn = np.empty(len(codes), dtype=np.int64)  # 0 for a patient's first row, 1 for its second, ...
    for row, code in enumerate(codes.tolist()):
        turn[row] = seen.get(code, 0)
        seen[code] = turn[row] + 1
    order = np.lexsort((np.arange(len(codes)), turn))
    whole = int(np.searchsorted(turn[order], turn[order][count - 1], side="left"))  # rows of the rounds taken whole
    last = order[whole : int(np.searchsorted(turn[order], turn[order][count - 1], side="right"))]
    keep = np.concatenate([order[:whole], last[_thinned_ranks(len(last), count - whole)] if count > whole else []])
    return np.sort(keep.astype(np.int64))


def _select_rows(images: torch.Tensor | np.ndarray | Iterable, rows: np.ndarray, batch_size: int) -> Iterator:
    """The images at ``rows`` (ascending) of a batch or an iterable of batches, in batches, read once."""
    start, wanted = 0, np.asarray(rows, dtype=np.int64)
    for batch in _iter_batches(images, batch_size):
        n = len(batch)
        local = wanted[(wanted >= start) & (wanted < start + n)] - start
        start += n
        if len(local):
            yield batch[torch.as_tensor(local)] if torch.is_tensor(batch) else np.asarray(batch)[local]
    if start <= (int(wanted[-1]) if len(wanted) else -1):
        raise ValueError(f"the training images hold {start} rows, fewer than the index's row {int(wanted[-1])}")


@dataclass
class CrossPatient:
    """Training images measured against the *other* training patients (leave one patient out), for calibration.

    Attributes:
        rows: the training rows measured (see :func:`cross_patient_rows`).
        distances: each one's distance to the nearest image of another training patient, judged as a candidate is.
        flagged: the ones the duplicate screen flags as near-duplicates of another training patient's image (the
            same person under two ids, a duplicated series); they are left out of the calibration.
        other: each one's distance to the nearest image of a third patient (neither its own nor its nearest one's),
            for the specificity test's share (NaN where none was found).
        nearest: the row of that nearest image of another patient, for the consensus test's share.
    """

    rows: np.ndarray
    distances: np.ndarray
    flagged: np.ndarray
    other: np.ndarray
    nearest: np.ndarray

    @property
    def kept(self) -> np.ndarray:
        return self.distances[~self.flagged]


def _cross_patient(
    index: TrainingIndex,
    training_images: torch.Tensor | np.ndarray | Iterable,
    count: int,
    views: Callable[[torch.Tensor], Sequence] | None,
    batch_size: int,
    holdout: tuple[np.ndarray, np.ndarray],
    z_min: float,
    alpha: float,
) -> CrossPatient:
    """Leave-one-patient-out distances of ``count`` training images, screened for duplicates with the holdout's."""
    rows = cross_patient_rows(index.patient_codes, count)
    if len(rows) == 0 or len(index.patients) < 2:
        empty = np.zeros(0)
        none = np.zeros(0, dtype=np.int64)
        return CrossPatient(none, empty, np.zeros(0, dtype=bool), empty, none)
    own = np.asarray(index.patients, dtype=object)[np.asarray(index.patient_codes)[rows]]
    batches = _query_batches(index, _select_rows(training_images, rows, batch_size), views, batch_size)
    near, nearest, other = _neighbours(index, batches, True, own)
    if len(near) != len(rows):
        raise ValueError(f"measured {len(near)} training images against the other patients, expected {len(rows)}")
    # screened against the bulk of all the calibration's distances, the holdout's included
    flagged, _ = _screen_duplicates(
        np.concatenate([holdout[0], near]),
        np.concatenate([holdout[1], other]),
        z_min,
        alpha,
        distance_floor(index.space),
    )
    return CrossPatient(rows, near, flagged[len(holdout[0]) :], other, nearest)


def calibrate_threshold(
    index: TrainingIndex,
    holdout: torch.Tensor | np.ndarray | Iterable | None = None,
    quantile: float = 0.01,
    floor: float = 0.0,
    *,
    holdout_patient_ids: Sequence[str] | None = None,
    holdout_vectors: np.ndarray | None = None,
    views: Callable[[torch.Tensor], Sequence] | None = None,
    batch_size: int = 64,
    duplicate_check: bool = True,
    duplicate_z: float = DUPLICATE_Z,
    duplicate_alpha: float = DUPLICATE_ALPHA,
    ci_level: float = 0.95,
    training_images: torch.Tensor | np.ndarray | Iterable | None = None,
    cross_patient_images: int = 0,
) -> Calibration:
    """Threshold from the holdout->train nearest-neighbour distance distribution.

    With ``training_images``, up to ``cross_patient_images`` of them join the holdout as calibration samples, each
    measured against the *other* training patients (leave one patient out): how close a person the index holds no
    image of comes to it, as a holdout image measures. Their reference set lacks one patient, so they come out a
    little farther than holdout images (the threshold errs on the side of refusing). A low quantile of a few hundred
    holdout images is about their smallest distance, which a new patient's image undercuts about once in ``n + 1``
    per space; these samples let it resolve the quantile asked for. The ones the duplicate screen flags (another
    training patient's near-duplicate: the same person under two ids) are left out and counted in
    ``cross_patient_dropped``.

    Args:
        index: training index (with its space attached when ``holdout`` images are given).
        holdout: model-space holdout images ``(N, C, *spatial)`` or an iterable of batches.
        views: ``image (C, *spatial) -> the images the safeguard judges for it`` (a release's intensity views); each
            holdout image's distance is then the least over its views, as a candidate's is. None: the image itself.
        quantile: fraction of unseen-patient images that would be rejected; in (0, 0.5].
        floor: absolute minimum threshold (>= 0).
        holdout_patient_ids: patient id of each holdout image; checked to share no patient with the index.
            Strongly recommended: a training patient in the holdout makes the threshold meaninglessly small.
        holdout_vectors: instead of images, already embedded holdout vectors ``(N, d)`` or ``(N, V, d)``.
        batch_size: images embedded at once.
        duplicate_check: screen the holdout for near-duplicates of training images and refuse to calibrate on it
            if it holds any (rule in the module docstring). Switch it off only for a holdout known to be clean
            whose populations differ so much that the screen misfires; the calibration then records
            ``duplicate_screen=None``, and so does the certificate.
        duplicate_z: robust log-scale z-score from which an image counts as far below the rest of the holdout.
        duplicate_alpha: Bonferroni-adjusted chance below which an image's nearest/second-nearest training patient
            distance ratio counts as a match to one patient.
        ci_level: confidence level of :attr:`Calibration.threshold_ci`.
        training_images: the index's training images in row order (same forms as ``holdout``), for cross-patient
            samples.
        cross_patient_images: how many training images to measure against the other training patients, taken one
            patient at a time (:func:`cross_patient_rows`); 0: the holdout alone.

    Raises:
        HoldoutDuplicateError: (a ValueError) holdout images that are near-duplicates of training images, named by
            row (and patient id if given), with how to fix it.
        ValueError: holdout patients that are also training patients (named), too few holdout images for the
            quantile (says how many are needed), bad quantile/floor/ci_level/screen settings.
    """
    return _calibrate(
        index,
        holdout,
        quantile,
        floor,
        holdout_patient_ids=holdout_patient_ids,
        holdout_vectors=holdout_vectors,
        views=views,
        batch_size=batch_size,
        duplicate_check=duplicate_check,
        duplicate_z=duplicate_z,
        duplicate_alpha=duplicate_alpha,
        ci_level=ci_level,
        training_images=training_images,
        cross_patient_images=cross_patient_images,
    )[0]


def _calibrate(
    index: TrainingIndex,
    holdout: torch.Tensor | np.ndarray | Iterable | None,
    quantile: float,
    floor: float,
    *,
    holdout_patient_ids: Sequence[str] | None,
    holdout_vectors: np.ndarray | None,
    views: Callable[[torch.Tensor], Sequence] | None,
    batch_size: int,
    duplicate_check: bool,
    duplicate_z: float,
    duplicate_alpha: float,
    ci_level: float,
    training_images: torch.Tensor | np.ndarray | Iterable | None = None,
    cross_patient_images: int = 0,
) -> tuple[Calibration, np.ndarray, CrossPatient, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`calibrate_threshold`, each holdout image's nearest-training distance in holdout order (look-alikes of an
    identity space put last), the training images' cross-patient distances, and the holdout's unscreened distances
    to its nearest and to a second training patient with its nearest rows (what joint calibration and the shares of
    the specificity and consensus tests need, so every image is embedded once per space)."""
    if not 0.0 < quantile <= 0.5:
        raise ValueError(f"quantile must be in (0, 0.5], got {quantile}")
    if views is not None and holdout is None:
        raise ValueError("views need holdout images, not holdout_vectors")
    if not (math.isfinite(floor) and floor >= 0.0):
        raise ValueError(f"floor must be a finite number >= 0, got {floor}")
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level}")
    if duplicate_check and not (duplicate_z > 0 and 0.0 < duplicate_alpha < 1.0):
        raise ValueError(
            f"duplicate_z must be > 0 and duplicate_alpha in (0, 1), got {duplicate_z} and {duplicate_alpha}"
        )
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
            stacklevel=3,
        )
    if holdout_vectors is not None:
        batches: Iterable[np.ndarray] = _iter_batches(np.asarray(holdout_vectors), batch_size)
    else:
        batches = _query_batches(index, holdout, views, batch_size)
    cross_count = int(cross_patient_images) if training_images is not None else 0
    if cross_count < 0:
        raise ValueError(f"cross_patient_images must be >= 0, got {cross_patient_images}")
    d, rows, d_other = _neighbours(index, batches, bool(duplicate_check) or cross_count > 0)
    n = len(d)
    if holdout_patient_ids is not None and len(holdout_patient_ids) != n:
        raise ValueError(f"{len(holdout_patient_ids)} holdout patient ids for {n} holdout images")
    need = min_holdout_size(quantile)
    if n < need:
        raise ValueError(
            f"{n} holdout images are too few to estimate the {quantile:g} quantile: at least {need} are needed "
            f"(ceil(1 / quantile)); add holdout patients or raise the quantile to >= {1.0 / n:.3g}"
        )
    median = float(np.median(d))
    if not median >= COLLAPSED_SPACE:
        raise CollapsedSpaceError(
            f"the {index.space_name!r} space puts unseen patients' images at a median distance of {median:.3g} from "
            f"the training images (below {COLLAPSED_SPACE:g}): it does not tell new patients from copies, so its "
            "threshold would guard nothing. Retrain it (an embedding: more epochs, more training images) or leave it "
            "out of the spaces"
        )
    screen = None
    screened = d
    if duplicate_check:
        flagged, screen = _screen_duplicates(d, d_other, duplicate_z, duplicate_alpha, distance_floor(index.space))
        if flagged.any() and not getattr(index.space, "identity_space", False):
            _refuse_duplicates(flagged, d, rows, holdout_patient_ids, quantile, screen, index.space_name)
        screen["flagged"] = int(flagged.sum())
        if flagged.any():  # a patient look-alike in a space that learned identities: kept out of its threshold
            _warn_look_alikes(flagged, d, rows, holdout_patient_ids, index.space_name)
            screened = d.copy()
            screened[flagged] = d.max()  # never among the lowest; the rows stay aligned with the other spaces'
    cross = _cross_patient(
        index, training_images, cross_count, views, batch_size, (d, d_other), duplicate_z, duplicate_alpha
    )
    raw, d = d, screened
    pooled = np.concatenate([d, cross.kept])
    q_value = float(np.quantile(pooled, quantile))
    d_sorted = np.sort(pooled)
    lo, hi, coverage = quantile_confidence_interval(d_sorted, quantile, ci_level)
    summary = _summary(pooled, coverage)
    calibration = Calibration(
        space=index.space_name,
        threshold=max(float(floor), q_value),
        quantile=float(quantile),
        floor=float(floor),
        quantile_value=q_value,
        n_holdout=n,
        n_holdout_patients=len(set(holdout_patient_ids)) if holdout_patient_ids is not None else 0,
        index_fingerprint=index.fingerprint,
        summary=summary,
        threshold_ci=(max(float(floor), lo), max(float(floor), hi)),
        ci_level=float(ci_level),
        duplicate_screen=screen,
        holdout_distances=d_sorted,
        n_cross_patient=len(cross.kept),
        cross_patient_dropped=int(cross.flagged.sum()),
    )
    return calibration, d, cross, (raw, d_other, rows)


def _warn_look_alikes(
    flagged: np.ndarray, d: np.ndarray, rows: np.ndarray, holdout_patient_ids: Sequence[str] | None, space_name: str
) -> None:
    """Warn that holdout images resemble one training patient in a space trained on patient identity.

    Such a space puts every image of a patient together, so a new patient who looks like a training patient passes
    the duplicate screen's two tests as a copy would (seen on a CT phantom cohort: a new patient at 0.025 from one
    training patient's images, 0.13 from every other, the holdout's median 0.11; no pixel-based space flagged it).
    Refusing would stop the release for a look-alike, and keeping the images would lower the threshold: they are
    left out of this space's threshold instead. A true copy of a training image is also close in the pixel-based
    spaces, whose screens refuse it."""
    bad = np.flatnonzero(flagged)
    named = [
        f"{i}{f' ({holdout_patient_ids[i]})' if holdout_patient_ids is not None else ''} at {d[i]:.4g} from "
        f"training row {rows[i]}"
        for i in bad[:20]
    ]
    more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
    warnings.warn(
        f"{len(bad)} holdout images resemble one training patient far more than any other in the {space_name!r} "
        f"space (rows {'; '.join(named)}{more}): a new patient who looks like a training patient, or the same "
        f"person under another id. They are left out of the {space_name!r} threshold, so they cannot lower it; "
        "check the train/holdout split if they may be the same person.",
        UserWarning,
        stacklevel=4,
    )


def _refuse_duplicates(
    flagged: np.ndarray,
    d: np.ndarray,
    rows: np.ndarray,
    holdout_patient_ids: Sequence[str] | None,
    quantile: float,
    screen: dict,
    space_name: str = "",
) -> None:
    """Raise :class:`HoldoutDuplicateError` naming the flagged holdout images, the space that saw them and what they
    would do."""
    bad = np.flatnonzero(flagged)
    named = []
    for i in bad[:20]:
        who = f" ({holdout_patient_ids[i]})" if holdout_patient_ids is not None else ""
        named.append(f"{i}{who} at {d[i]:.4g} from training row {rows[i]}")
    more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
    with_them = float(np.quantile(d, quantile))
    without = float(np.quantile(d[~flagged], quantile)) if (~flagged).sum() else float("nan")
    raise HoldoutDuplicateError(
        f"{len(bad)} holdout images look like near-duplicates of training images"
        f"{f' in the {space_name!r} space' if space_name else ''}: rows {'; '.join(named)}{more}. "
        f"Each is far below the rest of the holdout (median distance {math.exp(screen['median_log_distance']):.4g}) "
        "and much closer to one training patient than to any other, as a copy of a training image is and a new "
        f"patient is not; left in, they would pull the {quantile:g} quantile threshold from {without:.4g} down to "
        f"{with_them:.4g} and let near-copies through. Remove those images from the holdout and check the "
        "train/holdout split (the same person under another id, a duplicated series); if they are certainly new "
        "patients (e.g. a holdout pooling very different populations), pass duplicate_check=False "
        "(`monai-synth guard --no-duplicate-check`).",
        bad,
    )
