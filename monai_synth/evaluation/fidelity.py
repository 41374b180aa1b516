"""Fidelity: how close the synthetic images are to real ones, next to how close real images are to each other.

Every distance is measured in one stated :class:`~monai_synth.evaluation.features.FeatureSpace` and reported twice:
synthetic vs holdout, and the real-vs-real floor, training vs holdout (two samples of the same distribution, so the
best a generator can do at this sample size). FID is biased upwards at small samples, so both comparisons use the
same number of images: the larger of the synthetic and training sets is subsampled to the smaller's size.

* FID: the Frechet distance of the features' Gaussians (Heusel et al., NeurIPS 2017), equal to torchmetrics' and
  MONAI's, through symmetric eigendecompositions (fast enough for bootstrap intervals).
* KID: torchmetrics ``KernelInceptionDistance`` with the features as its input (Binkowski et al., ICLR 2018).
* precision / recall / density / coverage: the ``prdc`` package (Naeem et al., ICML 2020).
* MMD: Gaussian kernel, median-heuristic bandwidth, with a permutation p-value (Gretton et al., JMLR 2012).
* MS-SSIM diversity: mean MS-SSIM of random pairs of images of one class (lower is more diverse), synthetic next to
  real, as in Odena et al., ICML 2017.

Intervals are bias-shifted percentile bootstrap intervals (see :func:`bootstrap_interval`). Images of one patient are
not independent, so where the real sets have patient ids the real side is resampled by patient (all of a patient's
images together) and the synthetic side by image (a synthetic image belongs to no patient).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from monai_synth.threads import one_torch_thread

__all__ = [
    "fid",
    "kid",
    "prdc_metrics",
    "mmd_permutation_test",
    "ms_ssim_diversity",
    "bootstrap_interval",
    "evaluate_fidelity",
]


def _as_tensor(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).double()


class _GivenFeatures(nn.Module):
    """Feature module for torchmetrics' KID whose input already is the feature vector."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(features_a: Any, features_b: Any) -> float:
    """Frechet distance between two feature sets: ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``.

    The same quantity as torchmetrics' ``FrechetInceptionDistance`` and MONAI's ``FIDMetric`` (the tests check both),
    computed with symmetric eigendecompositions only: tens of milliseconds where their general eigenvalue / ``sqrtm``
    routes take seconds on rank-deficient covariances, and bootstrap intervals need hundreds of them.
    """
    a, b = _as_tensor(features_a), _as_tensor(features_b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {a.shape[0]} and {b.shape[0]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def kid(features_a: Any, features_b: Any, subsets: int = 20, subset_size: int = 1000, seed: int = 0) -> tuple:
    """Kernel inception distance (mean, std over subsets) between two feature sets, via torchmetrics."""
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = _as_tensor(features_a).float(), _as_tensor(features_b).float()
    size = int(min(subset_size, a.shape[0], b.shape[0]))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {a.shape[0]} and {b.shape[0]}")
    with warnings.catch_warnings():  # "will save all extracted features": they are the (small) feature vectors here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_GivenFeatures(a.shape[1]), subsets=subsets, subset_size=size)
    metric.update(a, real=True)
    metric.update(b, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mean, std = metric.compute()
    return float(mean), float(std)


def prdc_metrics(real_features: Any, fake_features: Any, nearest_k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (k-NN manifolds, ``prdc`` package)."""
    import prdc

    real = np.asarray(_as_tensor(real_features))
    fake = np.asarray(_as_tensor(fake_features))
    k = int(min(nearest_k, real.shape[0] - 2, fake.shape[0] - 2))  # prdc partitions at k + 1 (the point itself)
    if k < 1:
        raise ValueError(f"precision/recall need at least 3 images per set, got {real.shape[0]} and {fake.shape[0]}")
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        out = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return {key: float(v) for key, v in out.items()} | {"nearest_k": k}


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)


def mmd_permutation_test(
    features_a: Any, features_b: Any, permutations: int = 500, seed: int = 0, bandwidth: float | None = None
) -> dict[str, float]:
    """Unbiased Gaussian-kernel MMD^2 and its permutation p-value (H0: both sets come from one distribution).

    The bandwidth defaults to the median pairwise distance of the pooled sets (median heuristic). The p-value is
    ``(1 + #{permuted >= observed}) / (1 + permutations)``, never 0.
    """
    a, b = _as_tensor(features_a), _as_tensor(features_b)
    n, m = a.shape[0], b.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 images per set, got {n} and {m}")
    pooled = torch.cat([a, b])
    d2 = _sq_dists(pooled)
    if bandwidth is None:
        off = d2[~torch.eye(n + m, dtype=torch.bool)]
        bandwidth = float(off.median().sqrt()) or 1.0
    k = torch.exp(-d2 / (2.0 * bandwidth**2))
    diag = k.diagonal()
    row_sums = k.sum(1)

    def stats(members: torch.Tensor) -> torch.Tensor:
        """MMD^2 of the splits given as 0/1 columns of ``members`` (1 = first set), all at once."""
        a = members.double()
        b = 1.0 - a
        ka = k @ a
        kb = row_sums[:, None] - ka
        saa = ((a * ka).sum(0) - (a * diag[:, None]).sum(0)) / (n * (n - 1))
        sbb = ((b * kb).sum(0) - (b * diag[:, None]).sum(0)) / (m * (m - 1))
        return saa + sbb - 2.0 * (a * kb).sum(0) / (n * m)

    first = torch.zeros(n + m, 1)
    first[:n] = 1.0
    observed = float(stats(first)[0])
    gen = torch.Generator().manual_seed(int(seed))
    exceed = 0
    for start in range(0, int(permutations), 64):  # permutations in blocks: one matrix product per block
        cols = min(64, int(permutations) - start)
        ranks = torch.rand(n + m, cols, generator=gen).argsort(0)
        exceed += int((stats((ranks < n).double()) >= observed - 1e-12).sum())
    return {"mmd2": observed, "p_value": (1 + exceed) / (1 + int(permutations)), "bandwidth": float(bandwidth)}


def _ms_ssim_settings(size: int) -> tuple[float, int, tuple[float, ...]]:
    """Gaussian sigma, its window and as many of MS-SSIM's five scale weights (renormalised) as ``size`` allows.

    The standard window (sigma 1.5, 11 pixels) fits three scales of a 64-pixel image; smaller images get sigma 0.5.
    """
    sigma = 1.5 if size >= 44 else 0.5
    window = int(3.5 * sigma + 0.5) * 2 + 1  # torchmetrics' Gaussian window for this sigma
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    scales = 1
    while scales < len(betas) and size // (2**scales) > window:
        scales += 1
    kept = betas[:scales]
    return sigma, window, tuple(b / sum(kept) for b in kept)


def ms_ssim_diversity(images: torch.Tensor, pairs: int = 200, seed: int = 0, data_range: float | None = None) -> float:
    """Mean MS-SSIM over random pairs of distinct images (1 = all identical; lower = more diverse).

    Returns ``nan`` for fewer than two images.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    n = images.shape[0]
    if n < 2:
        return float("nan")
    gen = torch.Generator().manual_seed(int(seed))
    i = torch.randint(0, n, (int(pairs),), generator=gen)
    j = (i + torch.randint(1, n, (int(pairs),), generator=gen)) % n  # never the image itself
    x = images.float()
    rng = float(x.max() - x.min()) if data_range is None else float(data_range)
    sigma, window, betas = _ms_ssim_settings(min(x.shape[2:]))
    values = ms_ssim(
        x[i],
        x[j],
        data_range=rng or 1.0,
        sigma=sigma,
        kernel_size=window,
        betas=betas,
        reduction="none",
        normalize="relu",
    )
    return float(values.mean())


def bootstrap_interval(
    fn: Callable[[torch.Tensor, torch.Tensor], float],
    a: torch.Tensor,
    b: torch.Tensor,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    groups_a: Sequence[str] | None = None,
    groups_b: Sequence[str] | None = None,
) -> tuple[float, float]:
    """Bootstrap interval of ``fn(a, b)``, resampling each set's rows with replacement.

    With ``groups_a`` / ``groups_b`` (e.g. patient ids, one per row) that set is resampled by group: as many groups
    as it has, drawn with replacement, each bringing all its rows.

    Resampling with replacement duplicates rows, which shrinks covariances and inflates FID-like statistics, so a plain
    percentile interval can miss the estimate itself. The percentile interval is therefore shifted by the bootstrap
    bias (mean of the resamples minus the estimate): it keeps the spread of the resamples, centred on ``fn(a, b)``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    draw_a, draw_b = _resampler(a.shape[0], groups_a, gen), _resampler(b.shape[0], groups_b, gen)
    values = []
    for _ in range(int(n_boot)):
        ia, ib = draw_a(), draw_b()
        try:
            values.append(fn(a[ia], b[ib]))
        except ValueError:  # a degenerate resample (e.g. one distinct vector): skip it
            continue
    if not values:
        return float("nan"), float("nan")
    bias = float(np.mean(values)) - fn(a, b)
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2]) - bias
    return float(lo), float(hi)


def _resampler(n: int, groups: Sequence[str] | None, gen: torch.Generator) -> Callable[[], torch.Tensor]:
    """A function drawing one bootstrap resample of ``n`` rows: rows with replacement, or whole groups."""
    if groups is None:
        return lambda: torch.randint(0, n, (n,), generator=gen)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group ids for {n} rows")
    ids = sorted({str(g) for g in groups})
    keys = [str(g) for g in groups]
    rows = [torch.as_tensor([i for i, k in enumerate(keys) if k == g]) for g in ids]

    def draw() -> torch.Tensor:
        pick = torch.randint(0, len(rows), (len(rows),), generator=gen)
        return torch.cat([rows[int(i)] for i in pick])

    return draw


def _subsample(n_rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Row indices: all rows, or ``n`` of them at random."""
    return torch.arange(n_rows) if n_rows <= n else torch.randperm(n_rows, generator=gen)[:n]


def _compare(
    ref: torch.Tensor,
    other: torch.Tensor,
    n_boot: int,
    permutations: int,
    seed: int,
    ref_groups: Sequence[str] | None = None,
    other_groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"n_reference": int(ref.shape[0]), "n": int(other.shape[0])}
    if ref.shape[0] < 2 or other.shape[0] < 2:
        return out | {"fid": float("nan"), "note": "fewer than 2 images in a set"}
    # the FID of 128 features is two 128 x 128 eigendecompositions, hundreds of them in the bootstrap: one thread
    with one_torch_thread():
        out["fid"] = fid(other, ref)
        out["fid_ci"] = list(
            bootstrap_interval(fid, other, ref, n_boot=n_boot, seed=seed, groups_a=other_groups, groups_b=ref_groups)
        )
    if min(ref.shape[0], other.shape[0]) <= ref.shape[1]:
        out["note"] = f"fewer images than feature dimensions ({ref.shape[1]}): FID is biased; compare with the floor"
    out["fid_ci_resamples"] = "patients (real) / images (synthetic)" if ref_groups is not None else "images"
    out["kid"], out["kid_std"] = kid(other, ref, seed=seed)
    if min(ref.shape[0], other.shape[0]) >= 3:
        out.update(prdc_metrics(ref, other))
    mmd = mmd_permutation_test(other, ref, permutations=permutations, seed=seed)
    out["mmd2"], out["mmd_p_value"] = mmd["mmd2"], mmd["p_value"]
    return out


def evaluate_fidelity(
    space: Any,
    train_images: torch.Tensor,
    train_labels: Sequence[int],
    holdout_images: torch.Tensor,
    holdout_labels: Sequence[int],
    synthetic_images: torch.Tensor,
    synthetic_labels: Sequence[int],
    class_names: Sequence[str],
    n_boot: int = 200,
    permutations: int = 200,
    ssim_pairs: int = 200,
    seed: int = 0,
    train_patients: Sequence[str] | None = None,
    holdout_patients: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Synthetic-vs-holdout metrics next to the train-vs-holdout floor, overall and per class.

    Args:
        space: a :class:`~monai_synth.evaluation.features.FeatureSpace`.
        train_images, holdout_images, synthetic_images: model-space images ``(N, 1, *spatial)``.
        train_labels, holdout_labels, synthetic_labels: class ids (indices into ``class_names``).
        class_names: label names, for the per-class entries.
        n_boot: bootstrap resamples for the FID intervals.
        permutations: permutations of the MMD test.
        ssim_pairs: random pairs per class for MS-SSIM diversity.
        train_patients, holdout_patients: patient id of every real image; given both, the FID intervals resample
            real images by patient.

    Returns:
        ``{"space": ..., "fid": ..., "fid_real_floor": ..., "overall": {"synthetic": {...}, "real_floor": {...}},
        "per_class": {name: {...}}, "ms_ssim": {name: {"synthetic", "real"}}}``.
    """
    ytr, yho, ysy = (
        torch.as_tensor(list(v), dtype=torch.long) for v in (train_labels, holdout_labels, synthetic_labels)
    )
    f_tr = space(train_images, desc="features: training images")
    f_ho = space(holdout_images, desc="features: holdout images")
    f_sy = space(synthetic_images, desc="features: synthetic images")
    gen = torch.Generator().manual_seed(int(seed))

    by_patient = train_patients is not None and holdout_patients is not None
    p_tr = np.asarray([str(p) for p in train_patients]) if by_patient else None
    p_ho = np.asarray([str(p) for p in holdout_patients]) if by_patient else None

    def pair(mask_tr, mask_sy, mask_ho, key_seed):
        n = int(min(mask_tr.sum(), mask_sy.sum()))
        rows_tr = torch.nonzero(mask_tr).flatten()[_subsample(int(mask_tr.sum()), n, gen)]
        sy = f_sy[mask_sy][_subsample(int(mask_sy.sum()), n, gen)]
        rows_ho = torch.nonzero(mask_ho).flatten()
        tr, ho = f_tr[rows_tr], f_ho[rows_ho]
        g_tr = p_tr[rows_tr.numpy()].tolist() if by_patient else None
        g_ho = p_ho[rows_ho.numpy()].tolist() if by_patient else None
        return {
            "synthetic": _compare(ho, sy, n_boot, permutations, key_seed, ref_groups=g_ho),
            "real_floor": _compare(ho, tr, n_boot, permutations, key_seed, ref_groups=g_ho, other_groups=g_tr),
        }

    result: dict[str, Any] = {"space": space.describe(), "per_class": {}, "ms_ssim": {}}
    every = (torch.ones(len(ytr), dtype=torch.bool), torch.ones(len(ysy), dtype=torch.bool))
    result["overall"] = pair(every[0], every[1], torch.ones(len(yho), dtype=torch.bool), seed)
    for c, name in enumerate(tqdm(class_names, desc="fidelity per class", leave=False)):
        mtr, msy, mho = ytr == c, ysy == c, yho == c
        if not (msy.any() or mho.any()):
            continue
        result["per_class"][str(name)] = pair(mtr, msy, mho, seed + c + 1)
        lo = float(min(synthetic_images.min(), holdout_images.min())) if len(ysy) and len(yho) else None
        hi = float(max(synthetic_images.max(), holdout_images.max())) if len(ysy) and len(yho) else None
        rng = (hi - lo) if lo is not None else None
        result["ms_ssim"][str(name)] = {
            "synthetic": ms_ssim_diversity(synthetic_images[msy], ssim_pairs, seed + c, rng),
            "real": ms_ssim_diversity(holdout_images[mho], ssim_pairs, seed + c, rng),
        }
    result["fid"] = result["overall"]["synthetic"]["fid"]
    result["fid_real_floor"] = result["overall"]["real_floor"]["fid"]
    return result
