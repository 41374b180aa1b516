"""Utility: does a classifier trained on the synthetic images do as well on real patients as one trained on real ones?

Three arms, the same MONAI classifier (a small ``DenseNet``), the same seed and the same budget (optimisation steps,
batch size, learning rate), all tested on the real holdout:

* ``synthetic``: trained on the synthetic images only (train-on-synthetic, test-on-real);
* ``real``: trained on the real training split;
* ``half``: the half-replacement protocol of CoLDiT (Xu et al., Research 2024): half of the real training patients
  are dropped and replaced by as many synthetic images, of the same labels where the release has them.

ROC-AUC is one-vs-rest, macro-averaged for more than two classes (scikit-learn). Intervals resample holdout
*patients* (their images move together, since images of one patient are not independent), and arms are compared
with a paired bootstrap on the same resamples: the two-sided p-value is twice the smaller tail share of the AUC
difference around 0.
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
    "classifier",
    "train_classifier",
    "predict",
    "binary_auc",
    "roc_auc",
    "patient_bootstrap",
    "evaluate_utility",
]


def classifier(spatial_dims: int, num_classes: int) -> nn.Module:
    """The small MONAI ``DenseNet`` every arm trains (about 20k parameters)."""
    return DenseNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=num_classes,
        init_features=16,
        growth_rate=8,
        block_config=(2, 2, 2),
    )


def train_classifier(
    images: torch.Tensor,
    labels: Sequence[int],
    num_classes: int,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    desc: str = "training classifier",
) -> nn.Module:
    """Train :func:`classifier` for a fixed number of steps (the budget is steps, not epochs, so arms of different
    sizes see as many gradient updates); random flips are the only augmentation.

    Raises:
        ValueError: no images, or lengths differ.
    """
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if images.shape[0] == 0 or len(y) != images.shape[0]:
        raise ValueError(f"cannot train a classifier on {images.shape[0]} images with {len(y)} labels")
    spatial_dims = images.ndim - 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = classifier(spatial_dims, num_classes)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(int(seed))
        net.train()
        for _ in tqdm(range(int(steps)), desc=desc, leave=False):
            idx = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=gen)
            x = images[idx].float()
            for axis in range(2, x.ndim):
                if torch.rand((), generator=gen) < 0.5:
                    x = x.flip(axis)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y[idx])
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, images: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """Class probabilities ``(N, K)``."""
    out = [torch.softmax(net(images[s : s + batch_size].float()), 1) for s in range(0, images.shape[0], batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of ``scores`` for the boolean ``positive``, as the Mann-Whitney statistic over average ranks.

    The same number as scikit-learn's ``roc_auc_score`` (ties count one half), without its input checks: bootstrap
    intervals call it thousands of times, where those checks cost more than the AUC itself. ``nan`` when one side
    is empty.
    """
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n1 = int(positive.sum())
    n0 = positive.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_auc(y: Sequence[int], probs: np.ndarray, num_classes: int) -> float:
    """ROC-AUC: binary on the positive class's probability, else one-vs-rest macro average (scikit-learn's
    ``multi_class="ovr", average="macro"``: the unweighted mean of each class's AUC against the rest, on that class's
    probability); ``nan`` when ``y`` has a single class (AUC undefined)."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    if num_classes == 2:
        return binary_auc(y == 1, probs[:, 1])
    present = np.unique(y)
    p = probs[:, present]
    if len(present) < num_classes:  # score only the classes present, renormalised
        p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
    return float(np.mean([binary_auc(y == c, p[:, j]) for j, c in enumerate(present)]))


def patient_bootstrap(
    y: Sequence[int],
    patients: Sequence[str],
    arms: dict[str, np.ndarray],
    num_classes: int,
    n_boot: int = 500,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Patient-level bootstrap intervals of each arm's AUC and paired tests between every two arms.

    Returns:
        ``{"ci": {arm: [lo, hi]}, "paired": {"a_vs_b": {"difference", "ci", "p_value"}}, "n_boot": used}``.
    """
    y = np.asarray(y)
    pids = np.asarray([str(p) for p in patients])
    unique = np.unique(pids)
    rows = {p: np.flatnonzero(pids == p) for p in unique}
    rng = np.random.default_rng(int(seed))
    samples: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(int(n_boot)):
        pick = rng.choice(unique, size=len(unique), replace=True)
        idx = np.concatenate([rows[p] for p in pick])
        if len(np.unique(y[idx])) < len(np.unique(y)):
            continue  # a resample without some class: AUC not comparable
        for a, probs in arms.items():
            samples[a].append(roc_auc(y[idx], probs[idx], num_classes))
    used = len(next(iter(samples.values()))) if samples else 0
    q = [alpha / 2, 1 - alpha / 2]
    out: dict[str, Any] = {"ci": {}, "paired": {}, "n_boot": used}
    for a, vals in samples.items():
        out["ci"][a] = [float(v) for v in np.quantile(vals, q)] if vals else [float("nan")] * 2
    names = list(arms)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = np.asarray(samples[a]) - np.asarray(samples[b])
            point = roc_auc(y, arms[a], num_classes) - roc_auc(y, arms[b], num_classes)
            p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())) if len(d) else float("nan")
            out["paired"][f"{a}_vs_{b}"] = {
                "difference": float(point),
                "ci": [float(v) for v in np.quantile(d, q)] if len(d) else [float("nan")] * 2,
                "p_value": float(p),
            }
    return out


def _half_replacement(
    train_labels: np.ndarray,
    train_patients: np.ndarray,
    syn_labels: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the real images kept (half the patients) and of the synthetic images that replace the others."""
    patients = np.unique(train_patients)
    dropped = set(rng.permutation(patients)[: len(patients) // 2].tolist())
    keep = np.flatnonzero([p not in dropped for p in train_patients])
    removed = np.setdiff1d(np.arange(len(train_labels)), keep)
    pools = {c: list(rng.permutation(np.flatnonzero(syn_labels == c))) for c in np.unique(syn_labels)}
    every = list(rng.permutation(len(syn_labels)))
    chosen: list[int] = []
    for c in train_labels[removed]:
        pool = pools.get(c)
        if pool:
            chosen.append(int(pool.pop()))
        else:  # the release has no (more) images of this label: any synthetic image not yet used
            spare = [i for i in every if i not in chosen]
            if spare:
                chosen.append(int(spare[0]))
    return keep, np.asarray(chosen, dtype=int)


def evaluate_utility(
    train_images: torch.Tensor,
    train_labels: Sequence[int],
    train_patients: Sequence[str],
    holdout_images: torch.Tensor,
    holdout_labels: Sequence[int],
    holdout_patients: Sequence[str],
    synthetic_images: torch.Tensor,
    synthetic_labels: Sequence[int],
    num_classes: int,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the three arms and compare their holdout ROC-AUC.

    Returns:
        ``{"auc_synthetic", "auc_real", "auc_half", "ci": {...}, "paired": {...}, "budget": {...}, "sizes": {...},
        "roc": {arm: {"fpr", "tpr"}}}`` (ROC curves: micro-averaged one-vs-rest, for the report's plot).
    """
    from sklearn.metrics import roc_curve

    ytr = np.asarray(list(train_labels))
    yho = np.asarray(list(holdout_labels))
    ysy = np.asarray(list(synthetic_labels))
    rng = np.random.default_rng(int(seed))
    keep, chosen = _half_replacement(ytr, np.asarray([str(p) for p in train_patients]), ysy, rng)
    sets = {
        "synthetic": (synthetic_images, ysy),
        "real": (train_images, ytr),
        "half": (
            torch.cat(
                [train_images[torch.as_tensor(keep)], synthetic_images[torch.as_tensor(chosen, dtype=torch.long)]]
            ),
            np.concatenate([ytr[keep], ysy[chosen]]),
        ),
    }
    budget = {"steps": int(steps), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed)}
    probs = {}
    for arm, (x, y) in sets.items():
        net = train_classifier(x, y.tolist(), num_classes, steps, batch_size, lr, seed, desc=f"utility: {arm} arm")
        probs[arm] = predict(net, holdout_images)
    result: dict[str, Any] = {f"auc_{a}": roc_auc(yho, p, num_classes) for a, p in probs.items()}
    result.update(patient_bootstrap(yho, list(holdout_patients), probs, num_classes, n_boot=n_boot, seed=seed))
    result["budget"] = budget
    result["classifier"] = "monai DenseNet(init_features=16, growth_rate=8, block_config=(2, 2, 2))"
    result["sizes"] = {a: int(len(y)) for a, (_, y) in sets.items()} | {
        "holdout": int(len(yho)),
        "half_real": int(len(keep)),
        "half_synthetic": int(len(chosen)),
    }
    onehot = np.eye(num_classes)[yho]
    result["roc"] = {}
    for a, p in probs.items():
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
        result["roc"][a] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return result
