"""Membership inference against the latent diffusion model: were this patient's images in its training set?

White-box attacks on the stage-2 network, in its latent space (``z_mu`` of the stage-1 encoder times the latent scale
factor: what the diffusion model was trained on), conditioned on each image's own label. Every attack gives each image
a score (higher = more likely a member); a patient's score is the mean over their images, since a release is
attributed to patients, not to images. The members are the training patients, the non-members the holdout patients.

Attacks, written from the papers for both objectives of this package (rectified flow with MONAI's ``RFlowScheduler``:
``x_s = (1 - s) x_0 + s eps``, ``s = t / T``, the network predicts ``v = x_0 - eps``; DDPM/DDIM: ``x_t = sqrt(a_t) x_0
+ sqrt(1 - a_t) eps``, the network predicts ``eps``, ``v`` or ``x_0``, all converted to ``eps``):

* ``loss``: the training loss at several timesteps, each with several fixed noise draws (Carlini et al., "Extracting
  Training Data from Diffusion Models", USENIX Security 2023, section 6; Matsumoto et al., SPW 2023). Each timestep's
  losses are divided by their median over the queried images so no timestep dominates; score = minus their mean.
* ``pia``: proximal initialisation (Kong et al., "An Efficient Membership Inference Attack for the Diffusion Model by
  Proximal Initialization", ICLR 2024). The network's own output at ``t = 0`` gives the noise ``eps_0`` (rectified
  flow: ``eps_0 = x_0 - v(x_0, 0)``); ``x_t`` is built deterministically from ``x_0`` and ``eps_0`` and the score is
  minus the ``l_p`` distance (p = 4, as the paper) between the output at ``x_t`` and at ``t = 0``: a member's
  trajectory is consistent.
* ``secmi``: the t-error of SecMI (Duan et al., "Are Diffusion Models Vulnerable to Membership Inference Attacks?",
  ICML 2023, ``SecMI_stat``): deterministic inversion (DDIM, or Euler steps of the flow ODE) from ``x_0`` to
  ``x_t``, one more inversion step to ``t + k``, one denoising step back to ``t``; score = minus the squared error of
  that round trip.

Statistics (patient level): ROC-AUC with a percentile bootstrap interval resampling patients; TPR at 1% and 5% FPR
(threshold = the non-members' score quantile, at most that share of non-members above it) with exact
Clopper-Pearson intervals; a Mann-Whitney test of the shift of member over non-member scores (the dataset-level
test). The control splits the holdout patients into two disjoint halves and attacks one as if it were the members:
its AUC should be about 0.5, which checks the pipeline itself (no label or ordering artefact makes a difference).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "DiffusionTarget",
    "encode_latents",
    "loss_attack",
    "pia_attack",
    "secmi_attack",
    "ATTACKS",
    "patient_scores",
    "membership_metrics",
    "membership_inference",
    "target_from_checkpoints",
    "target_from_bundle",
]


@dataclass
class DiffusionTarget:
    """The attacked model: stage-1 encoder, stage-2 network (the EMA weights that are sampled from) and its scheduler.

    Args:
        autoencoder: MONAI ``AutoencoderKL``; ``encode`` gives ``z_mu``.
        network: the diffusion network, called as ``network(x, timesteps=t, context=c)``.
        scheduler: the *training* scheduler (``RFlowScheduler`` or ``DDPMScheduler``): its objective is attacked.
        scale_factor: latent scale factor (float or anything ``float()`` accepts, e.g. the bundle's ``ScaleFactor``).
        num_classes: number of classes of the conditional model (``None``: unconditional).
        spatial_size: model-space image size the autoencoder was trained at (images are loaded at this size).
        device: where to run.
        batch_size: latents per forward pass.
    """

    autoencoder: nn.Module
    network: nn.Module
    scheduler: Any
    scale_factor: Any = 1.0
    num_classes: int | None = None
    spatial_size: Sequence[int] | None = None
    device: Any = "cpu"
    batch_size: int = 64
    description: dict = field(default_factory=dict)

    @property
    def rflow(self) -> bool:
        return isinstance(self.scheduler, RFlowScheduler)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.num_train_timesteps)

    def condition(self, labels: torch.Tensor) -> torch.Tensor | None:
        from monai_synth.engines.diffusion import make_condition

        if self.num_classes is None:
            return None
        return make_condition(labels.long(), int(self.num_classes)).to(self.device)

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.scheduler.alphas_cumprod.to(self.device)
        return ab[t.to(self.device).long().clamp(0, len(ab) - 1)]

    def output(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The raw network output at timesteps ``t`` (shape ``(B,)``, in ``[0, T)``)."""
        t = t.to(self.device).float() if self.rflow else t.to(self.device).long()
        return self.network(x, timesteps=t, context=cond)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """DDPM only: the network's output converted to a noise prediction, whatever its ``prediction_type``."""
        out = self.output(x, t, cond)
        ab = self._alpha_bar(t).reshape(-1, *([1] * (x.ndim - 1)))
        kind = getattr(self.scheduler, "prediction_type", "epsilon")
        if kind == "epsilon":
            return out
        if kind == "v_prediction":
            return ab.sqrt() * out + (1 - ab).sqrt() * x
        if kind == "sample":
            return (x - ab.sqrt() * out) / (1 - ab).clamp_min(1e-8).sqrt()
        raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon, v_prediction or sample")

    def noised(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` from ``x_0`` and the noise ``eps`` (the forward process of the objective)."""
        if self.rflow:
            s = (t.float() / self.num_train_timesteps).to(x0).reshape(-1, *([1] * (x0.ndim - 1)))
            return (1 - s) * x0 + s * eps
        ab = self._alpha_bar(t).reshape(-1, *([1] * (x0.ndim - 1))).to(x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def ode_step(
        self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cond: torch.Tensor | None
    ) -> torch.Tensor:
        """One deterministic step of the probability-flow ODE from ``t`` to ``t_next`` (either direction): an Euler
        step of the flow, or a DDIM step (eta = 0)."""
        if self.rflow:
            v = self.output(x, t, cond)
            ds = ((t_next.float() - t.float()) / self.num_train_timesteps).to(x).reshape(-1, *([1] * (x.ndim - 1)))
            return x - ds * v  # dx/ds = eps - x_0 = -v
        e = self.eps(x, t, cond)
        ab, ab_next = self._alpha_bar(t).to(x), self._alpha_bar(t_next).to(x)
        shape = (-1, *([1] * (x.ndim - 1)))
        ab, ab_next = ab.reshape(shape), ab_next.reshape(shape)
        x0 = (x - (1 - ab).sqrt() * e) / ab.sqrt()
        return ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * e


@torch.no_grad()
def encode_latents(target: DiffusionTarget, images: torch.Tensor) -> torch.Tensor:
    """``z_mu * scale_factor`` of model-space images ``(N, 1, *spatial)``: what the diffusion model was trained on."""
    ae = target.autoencoder.eval()
    scale = float(target.scale_factor)
    out = []
    for s in range(0, images.shape[0], target.batch_size):
        z_mu, _ = ae.encode(images[s : s + target.batch_size].float().to(target.device))
        out.append((z_mu * scale).cpu())
    return torch.cat(out) if out else torch.zeros((0,))


def _timesteps(values: Sequence[float], target: DiffusionTarget) -> list[int]:
    """Timesteps given as fractions of ``T`` (``0 < f < 1``) or as integers, checked against the schedule."""
    steps = []
    for v in values:
        t = float(v) * target.num_train_timesteps if 0 < float(v) < 1 else float(v)
        if not 0 < t < target.num_train_timesteps:
            raise ValueError(f"attack timestep {v} is outside (0, {target.num_train_timesteps}); give t or a fraction")
        steps.append(int(round(t)))
    return steps


def _batches(target: DiffusionTarget, latents: torch.Tensor, labels: Sequence[int], desc: str):
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if len(y) != latents.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but {len(y)} labels")
    for s in tqdm(range(0, latents.shape[0], target.batch_size), desc=desc, leave=False):
        x0 = latents[s : s + target.batch_size].float().to(target.device)
        yield s, x0, target.condition(y[s : s + target.batch_size])


def _noise(shape: Sequence[int], seed: int, index: int) -> torch.Tensor:
    """The same noise for the image at ``index`` whatever the batch, so scores do not depend on batching."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed) * 100_003 + int(index)))


@torch.no_grad()
def loss_attack(
    target: DiffusionTarget,
    latents: torch.Tensor,
    labels: Sequence[int],
    timesteps: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    noises: int = 4,
    seed: int = 0,
) -> np.ndarray:
    """Multi-timestep, multi-noise loss attack (see the module docstring); scores ``(N,)``, higher = member."""
    steps = _timesteps(timesteps, target)
    losses = np.zeros((latents.shape[0], len(steps)))
    with torch.no_grad():
        for s, x0, cond in _batches(target, latents, labels, "membership: loss attack"):
            for j, t in enumerate(steps):
                tt = torch.full((x0.shape[0],), t)
                for k in range(int(noises)):
                    eps = torch.stack([_noise(x0.shape[1:], seed + 7919 * k + j, s + i) for i in range(x0.shape[0])])
                    eps = eps.to(x0)
                    xt = target.noised(x0, eps, tt)
                    if target.rflow:
                        err = target.output(xt, tt, cond) - (x0 - eps)
                    else:
                        err = target.eps(xt, tt, cond) - eps
                    losses[s : s + x0.shape[0], j] += err.flatten(1).square().mean(1).cpu().numpy() / int(noises)
    scale = np.median(losses, axis=0, keepdims=True)
    return -(losses / np.maximum(scale, 1e-12)).mean(1)


@torch.no_grad()
def pia_attack(
    target: DiffusionTarget,
    latents: torch.Tensor,
    labels: Sequence[int],
    timesteps: Sequence[float] = (0.1, 0.2, 0.3),
    p: float = 4.0,
) -> np.ndarray:
    """PIA (Kong et al. 2023): proximal initialisation from the network's output at ``t = 0``; scores ``(N,)``."""
    steps = _timesteps(timesteps, target)
    scores = np.zeros(latents.shape[0])
    for s, x0, cond in _batches(target, latents, labels, "membership: PIA"):
        zero = torch.zeros(x0.shape[0])
        if target.rflow:
            out0 = target.output(x0, zero, cond)
            eps0 = x0 - out0
        else:
            eps0 = target.eps(x0, zero, cond)
            out0 = eps0
        total = torch.zeros(x0.shape[0])
        for t in steps:
            tt = torch.full((x0.shape[0],), t)
            xt = target.noised(x0, eps0, tt)
            out = target.output(xt, tt, cond) if target.rflow else target.eps(xt, tt, cond)
            total += (out - out0).flatten(1).abs().pow(p).mean(1).pow(1.0 / p).cpu()
        scores[s : s + x0.shape[0]] = -(total / len(steps)).numpy()
    return scores


@torch.no_grad()
def secmi_attack(
    target: DiffusionTarget,
    latents: torch.Tensor,
    labels: Sequence[int],
    t: float = 0.1,
    interval: float = 0.01,
) -> np.ndarray:
    """SecMI's t-error (Duan et al. 2023): deterministic inversion to ``t`` in steps of ``interval``, one more step,
    one step back; scores ``(N,)`` = minus the squared round-trip error."""
    t_sec, k = _timesteps([t, interval], target)
    if k >= t_sec:
        raise ValueError(f"SecMI needs interval < t, got interval={interval}, t={t}")
    grid = list(range(0, t_sec + 1, k))
    if grid[-1] != t_sec:
        grid.append(t_sec)
    scores = np.zeros(latents.shape[0])
    for s, x0, cond in _batches(target, latents, labels, "membership: SecMI"):
        b = x0.shape[0]
        x = x0
        for a, c in zip(grid[:-1], grid[1:]):
            x = target.ode_step(x, torch.full((b,), a), torch.full((b,), c), cond)
        t_a, t_b = torch.full((b,), t_sec), torch.full((b,), t_sec + k)
        x_next = target.ode_step(x, t_a, t_b, cond)
        x_back = target.ode_step(x_next, t_b, t_a, cond)
        scores[s : s + b] = -(x_back - x).flatten(1).square().mean(1).cpu().numpy()
    return scores


ATTACKS = {"loss": loss_attack, "pia": pia_attack, "secmi": secmi_attack}
"""The attacks by name, as ``membership_inference(attacks=...)`` and the report name them."""


def patient_scores(scores: Sequence[float], patients: Sequence[str]) -> dict[str, float]:
    """Mean score of each patient's images."""
    sums: dict[str, list[float]] = {}
    for v, p in zip(scores, patients):
        sums.setdefault(str(p), []).append(float(v))
    return {p: float(np.mean(v)) for p, v in sums.items()}


def _auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    from monai_synth.evaluation.utility import binary_auc

    return binary_auc(np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)], np.r_[members, nonmembers])


def _tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float, alpha: float) -> dict[str, Any]:
    """TPR at a threshold that lets at most ``fpr`` of the non-members through, with a Clopper-Pearson interval."""
    from scipy.stats import binomtest

    allowed = int(math.floor(fpr * len(nonmembers) + 1e-9))
    ranked = np.sort(nonmembers)[::-1]
    threshold = float(ranked[allowed]) if allowed < len(ranked) else -np.inf
    hits = int(np.sum(members > threshold))
    ci = binomtest(hits, len(members)).proportion_ci(confidence_level=1 - alpha, method="exact")
    return {
        "tpr": hits / len(members),
        "ci": [float(ci.low), float(ci.high)],
        "achieved_fpr": float(np.mean(nonmembers > threshold)),
        "threshold": threshold,
        "members_above": hits,
    }


def membership_metrics(
    members: Sequence[float], nonmembers: Sequence[float], n_boot: int = 500, seed: int = 0, alpha: float = 0.05
) -> dict[str, Any]:
    """AUC (patient bootstrap interval), TPR at 1% and 5% FPR (exact intervals), Mann-Whitney shift test.

    Args:
        members, nonmembers: one score per patient (higher = member).

    Raises:
        ValueError: fewer than two patients on a side.
    """
    from scipy.stats import mannwhitneyu

    m, n = np.asarray(members, dtype=float), np.asarray(nonmembers, dtype=float)
    if len(m) < 2 or len(n) < 2:
        raise ValueError(f"membership metrics need at least 2 member and 2 non-member patients, got {len(m)}, {len(n)}")
    rng = np.random.default_rng(int(seed))
    boots = [_auc(rng.choice(m, len(m)), rng.choice(n, len(n))) for _ in range(int(n_boot))]
    q = [alpha / 2, 1 - alpha / 2]
    test = mannwhitneyu(m, n, alternative="greater")
    return {
        "auc": _auc(m, n),
        "auc_ci": [float(v) for v in np.quantile(boots, q)] if boots else [float("nan")] * 2,
        "tpr_at_fpr_0.01": _tpr_at_fpr(m, n, 0.01, alpha),
        "tpr_at_fpr_0.05": _tpr_at_fpr(m, n, 0.05, alpha),
        "mann_whitney_u": float(test.statistic),
        "mann_whitney_p_value": float(test.pvalue),
        "member_patients": int(len(m)),
        "nonmember_patients": int(len(n)),
    }


def membership_inference(
    target: DiffusionTarget,
    train_images: torch.Tensor,
    train_labels: Sequence[int],
    train_patients: Sequence[str],
    holdout_images: torch.Tensor,
    holdout_labels: Sequence[int],
    holdout_patients: Sequence[str],
    attacks: Sequence[str] = ("loss", "pia", "secmi"),
    max_patients: int | None = 250,
    n_boot: int = 500,
    seed: int = 0,
    attack_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the attacks on training (member) and holdout (non-member) patients, and the non-member control.

    Args:
        target: the model under attack.
        train_images, holdout_images: model-space images at ``target.spatial_size``.
        train_labels, holdout_labels: class ids (the condition each image is scored under).
        train_patients, holdout_patients: patient ids (scores are averaged per patient).
        attacks: names from :data:`ATTACKS`.
        max_patients: attack at most this many patients per side (drawn at random; ``None``: all).
        n_boot: bootstrap resamples of the AUC intervals.
        attack_options: keyword arguments per attack, e.g. ``{"loss": {"noises": 8}}``.

    Returns:
        ``{"mia_auc": largest AUC over attacks, "attacks": {name: metrics + "control": metrics}, ...}``.
    """
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown membership attack(s) {unknown}; choose from {sorted(ATTACKS)}")
    rng = np.random.default_rng(int(seed))

    def pick(patients: Sequence[str]) -> np.ndarray:
        ids = np.unique([str(p) for p in patients])
        if max_patients is not None and len(ids) > int(max_patients):
            ids = rng.choice(ids, int(max_patients), replace=False)
        keep = set(ids.tolist())
        return np.flatnonzero([str(p) in keep for p in patients])

    it, ih = pick(train_patients), pick(holdout_patients)
    if len(it) == 0 or len(ih) == 0:
        raise ValueError("membership inference needs training and holdout images")
    images = torch.cat([train_images[torch.as_tensor(it)], holdout_images[torch.as_tensor(ih)]])
    labels = [int(train_labels[i]) for i in it] + [int(holdout_labels[i]) for i in ih]
    member_ids = [str(train_patients[i]) for i in it]
    holdout_ids = [str(holdout_patients[i]) for i in ih]
    patients = member_ids + holdout_ids
    target.network.eval()
    latents = encode_latents(target, images)
    # the control: two disjoint halves of the holdout patients, one posing as members
    hold_unique = np.unique(holdout_ids)
    half = set(rng.permutation(hold_unique)[: len(hold_unique) // 2].tolist())
    out: dict[str, Any] = {"attacks": {}, "latent_shape": list(latents.shape[1:])}
    for name in attacks:
        scores = ATTACKS[name](target, latents, labels, **dict((attack_options or {}).get(name, {})))
        per = patient_scores(scores, patients)
        mem = np.asarray([per[p] for p in np.unique(member_ids)])
        non = np.asarray([per[p] for p in hold_unique])
        res = membership_metrics(mem, non, n_boot=n_boot, seed=seed)
        a = np.asarray([per[p] for p in hold_unique if p in half])
        b = np.asarray([per[p] for p in hold_unique if p not in half])
        res["control"] = (
            membership_metrics(a, b, n_boot=n_boot, seed=seed)
            if min(len(a), len(b)) >= 2
            else {"note": "fewer than 4 holdout patients: no control"}
        )
        res["scores"] = {"members": mem.tolist(), "nonmembers": non.tolist()}  # for the report's ROC figure
        out["attacks"][name] = res
    out["mia_auc"] = max(r["auc"] for r in out["attacks"].values())
    out["mia_auc_control"] = max(
        (r["control"]["auc"] for r in out["attacks"].values() if "auc" in r["control"]), default=float("nan")
    )
    out["mia_attack"] = max(out["attacks"], key=lambda k: out["attacks"][k]["auc"])
    for name, r in out["attacks"].items():
        out[f"mia_auc_{name}"] = r["auc"]
    out["objective"] = (
        "rectified flow" if target.rflow else f"ddpm ({getattr(target.scheduler, 'prediction_type', '')})"
    )
    out["target"] = dict(target.description)
    out["definitions"] = __doc__.split("Statistics (patient level): ")[1].strip()
    return out


def target_from_checkpoints(
    autoencoder: nn.Module,
    scale_factor: nn.Module,
    network: nn.Module,
    scheduler: Any,
    autoencoder_ckpt: str | os.PathLike,
    diffusion_ckpt: str | os.PathLike,
    num_classes: int | None,
    spatial_size: Sequence[int],
    device: Any = "cpu",
    autoencoder_metadata: Any = None,
    diffusion_metadata: Any = None,
) -> DiffusionTarget:
    """Fill a bundle's networks from its two checkpoints (the EMA diffusion weights) and wrap them as the target.

    Args:
        autoencoder, scale_factor, network, scheduler: the bundle's ``autoencoder``, ``scale_factor`` (its
            ``ScaleFactor`` module), ``ema_network`` and training ``scheduler``.
        autoencoder_ckpt, diffusion_ckpt: the checkpoints the release was sampled from.
        autoencoder_metadata, diffusion_metadata: the bundle's expected metadata; a checkpoint of another bundle,
            modality or training split is refused.

    Raises:
        FileNotFoundError, KeyError, CheckpointMismatchError: as :func:`~monai_synth.engines.checkpoint.load_checkpoint`.
    """
    from monai_synth.engines.checkpoint import checkpoint_fingerprint, load_checkpoint

    load_checkpoint(
        autoencoder_ckpt, {"autoencoder": autoencoder, "scale_factor": scale_factor}, autoencoder_metadata,
        map_location=device,
    )  # fmt: skip
    load_checkpoint(diffusion_ckpt, {"ema_network": network}, diffusion_metadata, map_location=device)
    return DiffusionTarget(
        autoencoder=autoencoder.eval(),
        network=network.eval(),
        scheduler=scheduler,
        scale_factor=float(scale_factor),
        num_classes=None if num_classes is None else int(num_classes),
        spatial_size=[int(s) for s in spatial_size],
        device=device,
        description={
            "autoencoder_sha256": checkpoint_fingerprint(autoencoder_ckpt),
            "diffusion_sha256": checkpoint_fingerprint(diffusion_ckpt),
            "weights": "EMA",
        },
    )


def target_from_bundle(
    bundle_root: str | os.PathLike,
    autoencoder_ckpt: str | os.PathLike,
    diffusion_ckpt: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    config_files: Sequence[str | os.PathLike] | None = None,
    device: str = "cpu",
) -> DiffusionTarget:
    """The model of a bundle's checkpoints: networks and scheduler from the bundle's common configs (with the
    ``overrides`` its training used), weights from the two checkpoints (the diffusion model's EMA weights).

    Raises:
        FileNotFoundError: a checkpoint or the bundle's config is missing.
        KeyError: a checkpoint lacks the entry the bundle writes (``autoencoder``, ``scale_factor``, ``ema_network``).
    """
    from monai.bundle import ConfigParser

    from monai_synth.engines.latents import ScaleFactor

    root = Path(bundle_root)
    if config_files is None:
        from monai_synth.configs import common_files

        config_files = common_files(root)
    files = [Path(f) for f in config_files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(
                f"bundle config {f} not found; pass the bundle folder (it holds configs/common.yaml)"
            )
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser["bundle_root"] = str(root)
    for key, value in dict(overrides or {}).items():
        parser[key] = value
    parser["device"] = f"$torch.device('{device}')"
    return target_from_checkpoints(
        parser.get_parsed_content("autoencoder_def").to(device),
        ScaleFactor(),
        parser.get_parsed_content("network_def").to(device),
        parser.get_parsed_content("scheduler"),
        autoencoder_ckpt,
        diffusion_ckpt,
        num_classes=int(parser.get_parsed_content("num_classes")),
        spatial_size=list(parser.get_parsed_content("spatial_size")),
        device=device,
    )
