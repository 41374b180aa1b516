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

Intervals are bias-shifted percentile bootstrap intervals over images (see :func:`bootstrap_interval`).
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
) -> tuple[float, float]:
    """Bootstrap interval of ``fn(a, b)``, resampling each set's rows with replacement.

    Resampling with replacement duplicates rows, which shrinks covariances and inflates FID-like statistics, so a plain
    percentile interval can miss the estimate itself. The percentile interval is therefore shifted by the bootstrap
    bias (mean of the resamples minus the estimate): it keeps the spread of the resamples, centred on ``fn(a, b)``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    values = []
    for _ in range(int(n_boot)):
        ia = torch.randint(0, a.shape[0], (a.shape[0],), generator=gen)
        ib = torch.randint(0, b.shape[0], (b.shape[0],), generator=gen)
        try:
            values.append(fn(a[ia], b[ib]))
        except ValueError:  # a degenerate resample (e.g. one distinct vector): skip it
            continue
    if not values:
        return float("nan"), float("nan")
    bias = float(np.mean(values)) - fn(a, b)
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2]) - bias
    return float(lo), float(hi)


def _subsample(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return x if x.shape[0] <= n else x[torch.randperm(x.shape[0], generator=gen)[:n]]


def _compare(ref: torch.Tensor, other: torch.Tensor, n_boot: int, permutations: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n_reference": int(ref.shape[0]), "n": int(other.shape[0])}
    if ref.shape[0] < 2 or other.shape[0] < 2:
        return out | {"fid": float("nan"), "note": "fewer than 2 images in a set"}
    out["fid"] = fid(other, ref)
    if min(ref.shape[0], other.shape[0]) <= ref.shape[1]:
        out["note"] = f"fewer images than feature dimensions ({ref.shape[1]}): FID is biased; compare with the floor"
    out["fid_ci"] = list(bootstrap_interval(fid, other, ref, n_boot=n_boot, seed=seed))
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

    def pair(mask_tr, mask_sy, mask_ho, key_seed):
        n = int(min(mask_tr.sum(), mask_sy.sum()))
        tr = _subsample(f_tr[mask_tr], n, gen)
        sy = _subsample(f_sy[mask_sy], n, gen)
        ho = f_ho[mask_ho]
        return {
            "synthetic": _compare(ho, sy, n_boot, permutations, key_seed),
            "real_floor": _compare(ho, tr, n_boot, permutations, key_seed),
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
