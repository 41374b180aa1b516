"""Privacy audit of a release, independent of the safeguard that produced it.

The safeguard (:mod:`monai_synth.privacy`) filters candidates in its own spaces (pixel correlation on a 16-cell grid
under flips, shifts, zooms and rotations; aligned parts, crops, tiles; optionally its ``PatientEmbeddingNet``). An
audit in those spaces would be circular, so this one uses its own:

* ``reid``: a re-identification network of another architecture (a MONAI ``DenseNet``) and seed, trained here on the
  training patients' identities with pytorch-metric-learning (multi-similarity loss and miner, Wang et al., CVPR
  2019), on full-resolution images;
* ``pixels``: the full-resolution images themselves, no invariance (distance 1 - Pearson correlation).

Distances are ``1 - cosine similarity`` (for ``pixels``, of the mean-centred images).

Definitions (stated in the report):

* nearest-neighbour analysis: for every synthetic and every holdout image, the distance ``d1`` to its nearest and
  ``d2`` to its second-nearest training image; the share of synthetic images below the holdout's 1% and 5% quantiles
  of ``d1`` (about 0.01 and 0.05 for a generator that does not copy);
* memorisation: an image is memorised when ``d1`` is below the holdout's 1% quantile (threshold definition) *and*
  ``d1 / d2 < ratio`` (default 0.5: at most half as far from its nearest training image as from any other; ratio
  definition, after the nearest/second-nearest test of Lowe, IJCV 2004). The rate is reported per space, for the
  synthetic and (as the baseline) the holdout images; the headline ``memorisation_rate`` is the largest over spaces;
* re-identification power, real -> real: each holdout image of a patient with repeat images queries all other
  holdout images; mAP@R and precision@1 (pytorch-metric-learning's ``AccuracyCalculator``) next to their closed-form
  chance under a random ranking;
* re-identification of the release: at the ``reid`` distance that matches 1% of holdout images to some training
  patient, the share of synthetic images matched to a training patient (``reid_match_rate``) next to the holdout's
  (``reid_match_rate_holdout``). A class-conditional generator has no source patient, so the two should agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.nets import DenseNet
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "ReidNetwork",
    "train_reid_network",
    "embed",
    "pixel_vectors",
    "nearest_train",
    "nearest_neighbour_analysis",
    "map_at_r_chance",
    "precision_at_1_chance",
    "reidentification_power",
    "match_rates",
    "audit_privacy",
]

AUDIT_SEED = 1009
"""Seed of the audit's re-identification network: not the safeguard embedding's (0), so the two never coincide."""


class ReidNetwork(nn.Module):
    """MONAI ``DenseNet`` -> L2-normalised embedding (the safeguard's embedding is a residual CNN: another family).

    Args:
        spatial_dims: 2 or 3.
        dim: embedding length.
    """

    def __init__(self, spatial_dims: int, dim: int = 32):
        super().__init__()
        self.net = DenseNet(
            spatial_dims=spatial_dims, in_channels=1, out_channels=dim, init_features=16, growth_rate=8,
            block_config=(2, 2, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=1)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Changes that keep the patient: flips, intensity gain and offset, noise (copies are often altered this way)."""
    for axis in range(2, x.ndim):
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(axis)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    gain = 1.0 + 0.1 * (torch.rand(shape, generator=gen) - 0.5)
    offset = 0.1 * (torch.rand(shape, generator=gen) - 0.5)
    return x * gain + offset + 0.03 * torch.randn(x.shape, generator=gen)


def train_reid_network(
    images: torch.Tensor,
    patient_ids: Sequence[str],
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    dim: int = 32,
    seed: int = AUDIT_SEED,
) -> ReidNetwork:
    """Train :class:`ReidNetwork` to tell the training patients apart (two images per patient in every batch).

    Raises:
        ValueError: fewer than two patients.
    """
    from pytorch_metric_learning import losses, miners, samplers

    ids = {p: i for i, p in enumerate(sorted({str(p) for p in patient_ids}))}
    y = torch.as_tensor([ids[str(p)] for p in patient_ids])
    if len(ids) < 2:
        raise ValueError("the re-identification network needs images of at least two patients")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = ReidNetwork(images.ndim - 2, dim)
        loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(int(seed))
        batch = max(4, min(int(batch_size), 2 * len(ids)) // 2 * 2)
        sampler = samplers.MPerClassSampler(y, m=2, batch_size=batch, length_before_new_iter=int(steps) * batch)
        order = _sampled(sampler, seed)
        net.train()
        for s in tqdm(range(int(steps)), desc="audit: training re-identification network", leave=False):
            idx = torch.as_tensor(order[s * batch : (s + 1) * batch])
            if len(idx) < 2:
                break
            emb = net(_augment(images[idx].float(), gen))
            opt.zero_grad()
            loss = loss_fn(emb, y[idx], miner(emb, y[idx]))
            loss.backward()
            opt.step()
    return net.eval()


def _sampled(sampler: Any, seed: int) -> list[int]:
    """The sampler's order under its own seed: pytorch-metric-learning draws from numpy's global generator."""
    from pytorch_metric_learning.utils import common_functions as c_f

    saved = c_f.NUMPY_RANDOM
    c_f.NUMPY_RANDOM = np.random.RandomState(int(seed))
    try:
        return [int(i) for i in sampler]
    finally:
        c_f.NUMPY_RANDOM = saved


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Unit-length embeddings ``(N, D)``."""
    if images.shape[0] == 0:
        return torch.zeros((0, 1))
    return torch.cat([net(images[s : s + batch_size].float()) for s in range(0, images.shape[0], batch_size)])


def pixel_vectors(images: torch.Tensor) -> torch.Tensor:
    """Mean-centred, unit-length flattened images: their cosine distance is 1 - Pearson correlation."""
    flat = images.reshape(images.shape[0], -1).double()
    flat = flat - flat.mean(1, keepdim=True)
    return nn.functional.normalize(flat, dim=1)


def nearest_train(queries: torch.Tensor, train: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, ...]:
    """For unit vectors: distance to the nearest and second-nearest training vector, and the nearest's index."""
    d1, d2, i1 = [], [], []
    train = train.double()
    for s in range(0, queries.shape[0], batch_size):
        dist = 1.0 - queries[s : s + batch_size].double() @ train.T
        k = min(2, train.shape[0])
        vals, idx = dist.topk(k, dim=1, largest=False)
        d1.append(vals[:, 0])
        d2.append(vals[:, k - 1])
        i1.append(idx[:, 0])
    if not d1:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=int)
    return (
        torch.cat(d1).clamp_min(0).numpy(),
        torch.cat(d2).clamp_min(0).numpy(),
        torch.cat(i1).numpy(),
    )


def nearest_neighbour_analysis(
    synthetic: torch.Tensor, holdout: torch.Tensor, train: torch.Tensor, ratio: float = 0.5
) -> dict[str, Any]:
    """Synthetic->train next to holdout->train distances in one space (see the module docstring for definitions)."""
    s1, s2, s_idx = nearest_train(synthetic, train)
    h1, h2, _ = nearest_train(holdout, train)
    q01, q05 = (float(np.quantile(h1, q)) for q in (0.01, 0.05))

    def memorised(d1, d2):
        return (d1 < q01) & (d1 < ratio * np.maximum(d2, 1e-12))

    from scipy.stats import mannwhitneyu

    test = mannwhitneyu(s1, h1, alternative="less") if len(s1) and len(h1) else None
    return {
        "holdout_q01": q01,
        "holdout_q05": q05,
        "share_below_q01": float(np.mean(s1 < q01)),
        "share_below_q05": float(np.mean(s1 < q05)),
        "holdout_share_below_q05": float(np.mean(h1 < q05)),
        "share_ratio_below": float(np.mean(s1 < ratio * np.maximum(s2, 1e-12))),
        "memorisation_rate": float(np.mean(memorised(s1, s2))),
        "memorisation_rate_holdout": float(np.mean(memorised(h1, h2))),
        "ratio": float(ratio),
        "median_synthetic": float(np.median(s1)),
        "median_holdout": float(np.median(h1)),
        "closer_than_holdout_p_value": float(test.pvalue) if test is not None else float("nan"),
        "synthetic_d1": s1.tolist(),
        "holdout_d1": h1.tolist(),
        "_nearest_index": s_idx,  # private: which training image each synthetic image is closest to
    }


def map_at_r_chance(relevant: Sequence[int], candidates: Sequence[int]) -> float:
    """Expected mAP@R of a random ranking, averaged over queries.

    For a query with ``R`` relevant items among ``M`` candidates, the ``i``-th ranked item is relevant with
    probability ``R / M``, and given that, the ``i - 1`` items above it hold ``(i - 1)(R - 1)/(M - 1)`` relevant ones
    on average (hypergeometric), so ``E[AP@R] = (1/M) sum_{i=1..R} [1 + (i - 1)(R - 1)/(M - 1)] / i``.
    """
    values = []
    for r, m in zip(relevant, candidates):
        i = np.arange(1, r + 1)
        extra = (i - 1) * (r - 1) / (m - 1) if m > 1 else 0.0
        values.append(float(np.sum((1.0 + extra) / i) / m))
    return float(np.mean(values)) if values else float("nan")


def precision_at_1_chance(relevant: Sequence[int], candidates: Sequence[int]) -> float:
    """Expected precision@1 of a random ranking: mean of ``R / M`` over queries."""
    return float(np.mean([r / m for r, m in zip(relevant, candidates)])) if len(relevant) else float("nan")


def reidentification_power(embeddings: torch.Tensor, patient_ids: Sequence[str]) -> dict[str, Any]:
    """mAP@R and precision@1 of holdout images retrieving their own patient's other images, with chance levels."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    pids = np.asarray([str(p) for p in patient_ids])
    _, y = np.unique(pids, return_inverse=True)
    counts = np.bincount(y)
    queries = np.flatnonzero(counts[y] >= 2)
    if len(queries) == 0:
        nan = float("nan")
        return {"map_at_r": nan, "precision_at_1": nan, "map_at_r_chance": nan, "precision_at_1_chance": nan,
                "queries": 0, "note": "no holdout patient has two images"}  # fmt: skip
    relevant = counts[y[queries]] - 1
    candidates = np.full(len(queries), len(y) - 1)
    calc = AccuracyCalculator(include=("mean_average_precision_at_r", "precision_at_1"), k="max_bin_count")
    emb = embeddings.float()
    yt = torch.as_tensor(y)
    # references: every holdout image; the query itself is excluded by ref_includes_query
    acc = calc.get_accuracy(emb[queries], yt[queries], emb, yt, ref_includes_query=True)
    return {
        "map_at_r": float(acc["mean_average_precision_at_r"]),
        "precision_at_1": float(acc["precision_at_1"]),
        "map_at_r_chance": map_at_r_chance(relevant.tolist(), candidates.tolist()),
        "precision_at_1_chance": precision_at_1_chance(relevant.tolist(), candidates.tolist()),
        "queries": int(len(queries)),
        "patients": int((counts >= 2).sum()),
    }


def match_rates(synthetic_d1: np.ndarray, holdout_d1: np.ndarray, holdout_quantile: float = 0.01) -> dict[str, float]:
    """Share of synthetic and of holdout images matched to a training patient at the holdout's quantile distance."""
    threshold = float(np.quantile(holdout_d1, holdout_quantile))
    return {
        "match_threshold": threshold,
        "match_quantile": float(holdout_quantile),
        "match_rate": float(np.mean(np.asarray(synthetic_d1) <= threshold)),
        "match_rate_holdout": float(np.mean(np.asarray(holdout_d1) <= threshold)),
    }


def audit_privacy(
    train_images: torch.Tensor,
    train_patients: Sequence[str],
    holdout_images: torch.Tensor,
    holdout_patients: Sequence[str],
    synthetic_images: torch.Tensor,
    steps: int = 300,
    batch_size: int = 32,
    ratio: float = 0.5,
    seed: int = AUDIT_SEED,
    closest: int = 8,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the whole audit.

    Returns:
        ``(public, private)``: ``public`` holds only aggregate numbers and distance lists (no pixels, no ids);
        ``private`` holds the ``closest`` synthetic/training pairs per space (indices into the inputs, distances).
    """
    net = train_reid_network(train_images, train_patients, steps=steps, batch_size=batch_size, seed=seed)
    spaces = {
        "reid": [embed(net, x) for x in (synthetic_images, holdout_images, train_images)],
        "pixels": [pixel_vectors(x) for x in (synthetic_images, holdout_images, train_images)],
    }
    public: dict[str, Any] = {"spaces": {}, "definitions": __doc__.split("Definitions (stated in the report):")[1]}
    private: dict[str, Any] = {"closest_pairs": {}}
    for name, (sy, ho, tr) in tqdm(spaces.items(), desc="audit: nearest neighbours", leave=False):
        nn_res = nearest_neighbour_analysis(sy, ho, tr, ratio=ratio)
        nearest = nn_res.pop("_nearest_index")
        order = np.argsort(nn_res["synthetic_d1"])[:closest]
        private["closest_pairs"][name] = [
            {"synthetic": int(i), "train": int(nearest[i]), "distance": float(nn_res["synthetic_d1"][i])} for i in order
        ]
        public["spaces"][name] = nn_res
    reid = public["spaces"]["reid"]
    power = reidentification_power(spaces["reid"][1], holdout_patients)
    rates = match_rates(np.asarray(reid["synthetic_d1"]), np.asarray(reid["holdout_d1"]))
    public.update(
        {
            "memorisation_rate": max(s["memorisation_rate"] for s in public["spaces"].values()),
            "memorisation_rate_holdout": max(s["memorisation_rate_holdout"] for s in public["spaces"].values()),
            "reid_map_at_r_real": power["map_at_r"],
            "reid_precision_at_1_real": power["precision_at_1"],
            "reid_chance": power["map_at_r_chance"],
            "reid_precision_at_1_chance": power["precision_at_1_chance"],
            "reid_queries": power["queries"],
            "reid_match_rate": rates["match_rate"],
            "reid_match_rate_holdout": rates["match_rate_holdout"],
            "reid_match_threshold": rates["match_threshold"],
            "reid_network": f"monai DenseNet embedding (dim 32), multi-similarity loss, seed={int(seed)}, steps={int(steps)}",
            "membership_inference": "not run: give the generator's checkpoints (monai-synth evaluate --bundle "
            "--autoencoder-ckpt --diffusion-ckpt, or the bundle's evaluate.yaml) for the white-box attacks",
        }
    )
    return public, private
