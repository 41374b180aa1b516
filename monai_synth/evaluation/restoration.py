"""Restoration utility: is a denoising or super-resolution network trained on synthetic images as good on real ones?

The CT/MRI/PET study this package follows (Shi et al., arXiv 2301.06604) trained such networks on synthetic and on
real images and compared them on real test images. Here both arms train the same small MONAI ``UNet`` (residual:
it predicts the correction of its input) with the same seed and budget (steps, batch size, learning rate), on clean
images degraded on the fly, and both are tested on the same degraded real holdout images:

* ``denoise``: simulated low-dose noise, modality-appropriate, applied in physical units where the modality has them:
  CT additive Gaussian noise in Hounsfield units (``sigma_hu``, default 40 HU); PET Poisson counts on the SUV image
  (``counts_per_suv``, default 5: a low-count scan); MRI Rician noise on the magnitude image (``sigma`` of the
  [0, 1] range); ultrasound multiplicative speckle (gamma with ``looks`` looks);
* ``superres``: the image is downsampled x2 (area averaging) and upsampled back (linear interpolation); the network
  restores the detail.

PSNR and SSIM (data range 2: model space is [-1, 1]) of every restored holdout image; a patient's value is the mean
over their images, and the arms are compared on the same patients with a paired equivalence test (TOST, statsmodels
``ttost_paired``): equivalence within +/- ``margin`` is shown when its p-value is below 0.05. A p-value of a
difference test above 0.05 would show nothing, which is why equivalence is tested, with its margin stated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.nets import UNet
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "TASKS",
    "degrade",
    "restoration_network",
    "train_restorer",
    "restore",
    "image_quality",
    "evaluate_restoration",
]

TASKS = ("denoise", "superres")

MARGINS = {"psnr": 0.5, "ssim": 0.02}
"""Default equivalence margins: +/- 0.5 dB PSNR and +/- 0.02 SSIM (mean paired difference per patient)."""


def _noisy(images: torch.Tensor, modality: str, gen: torch.Generator, options: Mapping[str, Any]) -> torch.Tensor:
    from monai_synth.transforms.presets import intensity_transform

    x = images.float()
    if modality == "ct":
        tf = intensity_transform("ct")
        hu = tf.inverse(x)
        return tf(hu + float(options.get("sigma_hu", 40.0)) * torch.randn(x.shape, generator=gen)).float()
    if modality == "pet":
        tf = intensity_transform("pet")
        k = float(options.get("counts_per_suv", 5.0))
        suv = tf.inverse(x).clamp_min(0)
        return tf(torch.poisson(suv * k, generator=gen) / k).float()
    if modality == "mri":
        s = float(options.get("sigma", 0.05))
        m = (x + 1) / 2
        noisy = (
            (m + s * torch.randn(x.shape, generator=gen)) ** 2 + (s * torch.randn(x.shape, generator=gen)) ** 2
        ).sqrt()
        return noisy * 2 - 1
    if modality == "us":
        looks = float(options.get("looks", 4.0))
        gamma = torch.distributions.Gamma(torch.tensor(looks), torch.tensor(looks))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            speckle = gamma.sample(x.shape)
        return (((x + 1) / 2 * speckle).clamp(0, 1) * 2 - 1).float()
    raise ValueError(f"no noise model for modality {modality!r}; choose ct, pet, mri or us")


def _downsampled(images: torch.Tensor) -> torch.Tensor:
    x = images.float()
    dims = x.ndim - 2
    if any(s % 2 for s in x.shape[2:]):
        raise ValueError(f"super-resolution x2 needs even image sizes, got {tuple(x.shape[2:])}")
    small = nn.functional.avg_pool2d(x, 2) if dims == 2 else nn.functional.avg_pool3d(x, 2)
    mode = "bilinear" if dims == 2 else "trilinear"
    return nn.functional.interpolate(small, size=x.shape[2:], mode=mode, align_corners=False)


def degrade(
    images: torch.Tensor, task: str, modality: str, seed: int = 0, options: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """The network's input for clean model-space images: noisy (``denoise``) or downsampled x2 (``superres``).

    Raises:
        ValueError: unknown task or modality, or odd sizes for ``superres``.
    """
    if task == "denoise":
        return _noisy(images, modality, torch.Generator().manual_seed(int(seed)), dict(options or {}))
    if task == "superres":
        return _downsampled(images)
    raise ValueError(f"unknown restoration task {task!r}; choose from {TASKS}")


class _Residual(nn.Module):
    """``x + g * net(x)`` with ``g`` starting at 0 (ReZero, Bachlechner et al. 2020): training starts from the
    identity, so a short budget cannot end worse than the degraded input by an untrained correction."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gain * self.net(x)


def restoration_network(spatial_dims: int) -> nn.Module:
    """The small residual MONAI ``UNet`` both arms train (two halvings: image sizes must be multiples of 4)."""
    net = UNet(spatial_dims, 1, 1, channels=(16, 32, 64), strides=(2, 2), num_res_units=1)
    return _Residual(net)


def train_restorer(
    images: torch.Tensor,
    task: str,
    modality: str,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    desc: str = "training restoration network",
) -> nn.Module:
    """Train :func:`restoration_network` (L1 loss) on clean ``images``, degraded afresh in every batch.

    Raises:
        ValueError: no images.
    """
    if images.shape[0] == 0:
        raise ValueError("cannot train a restoration network on no images")
    if any(int(s) % 4 for s in images.shape[2:]):
        raise ValueError(f"restoration needs image sizes that are multiples of 4, got {tuple(images.shape[2:])}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = restoration_network(images.ndim - 2)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(int(seed))
        net.train()
        for step in tqdm(range(int(steps)), desc=desc, leave=False):
            idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=gen)
            clean = images[idx].float()
            for axis in range(2, clean.ndim):
                if torch.rand((), generator=gen) < 0.5:
                    clean = clean.flip(axis)
            noisy = degrade(clean, task, modality, seed=int(seed) * 1_000_003 + step, options=options)
            opt.zero_grad()
            loss = nn.functional.l1_loss(net(noisy), clean)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def restore(net: nn.Module, degraded: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The network's output for every degraded image."""
    return torch.cat([net(degraded[s : s + batch_size].float()) for s in range(0, degraded.shape[0], batch_size)])


def image_quality(restored: torch.Tensor, clean: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image PSNR (dB) and SSIM against the clean images, data range 2 (model space [-1, 1])."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    restored, clean = restored.float().clamp(-1, 1), clean.float()
    mse = (restored - clean).flatten(1).square().mean(1).clamp_min(1e-10)
    psnr = 10 * torch.log10(4.0 / mse)
    s = ssim(restored, clean, data_range=2.0, reduction="none")
    return {"psnr": psnr.numpy().astype(float), "ssim": torch.as_tensor(s).reshape(-1).numpy().astype(float)}


def _per_patient(values: np.ndarray, patients: Sequence[str]) -> tuple[list[str], np.ndarray]:
    ids = sorted({str(p) for p in patients})
    pids = np.asarray([str(p) for p in patients])
    return ids, np.asarray([values[pids == p].mean() for p in ids])


def evaluate_restoration(
    task: str,
    modality: str,
    train_images: torch.Tensor,
    holdout_images: torch.Tensor,
    holdout_patients: Sequence[str],
    synthetic_images: torch.Tensor,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    margins: Mapping[str, float] | None = None,
    options: Mapping[str, Any] | None = None,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Train on synthetic and on real images, test both on the degraded real holdout, test their equivalence.

    Returns:
        ``{"psnr_synthetic", "psnr_real", "ssim_synthetic", "ssim_real", "psnr_degraded", "ssim_degraded",
        "tost": {"psnr": {"difference", "margin", "p_value", "equivalent"}, "ssim": {...}}, ...}``; means over
        holdout patients.

    Raises:
        ValueError: fewer than two holdout patients (no paired test).
    """
    from statsmodels.stats.weightstats import ttost_paired

    margins = {**MARGINS, **dict(margins or {})}
    if len(set(map(str, holdout_patients))) < 2:
        raise ValueError("the restoration equivalence test needs at least two holdout patients")
    degraded = degrade(holdout_images, task, modality, seed=int(seed) + 7, options=options)
    arms = {"synthetic": synthetic_images, "real": train_images}
    quality = {"degraded": image_quality(degraded, holdout_images)}
    for arm, images in arms.items():
        net = train_restorer(images, task, modality, steps, batch_size, lr, seed, options, f"restoration: {arm} arm")
        quality[arm] = image_quality(restore(net, degraded), holdout_images)
    out: dict[str, Any] = {
        "task": task,
        "network": "residual monai UNet(channels=(16, 32, 64), strides=(2, 2), num_res_units=1), L1 loss",
        "budget": {"steps": int(steps), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed)},
        "degradation": _describe(task, modality, options),
        "holdout_images": int(holdout_images.shape[0]),
        "tost": {},
    }
    for metric in ("psnr", "ssim"):
        per = {arm: _per_patient(q[metric], holdout_patients)[1] for arm, q in quality.items()}
        for arm, v in per.items():
            out[f"{metric}_{arm}"] = float(v.mean())
        diff = per["synthetic"] - per["real"]
        m = float(margins[metric])
        if np.allclose(diff, diff[0]):  # no spread: the t statistics are undefined, the difference is exact
            p = 0.0 if abs(diff[0]) < m else 1.0
        else:
            p = float(ttost_paired(per["synthetic"], per["real"], -m, m)[0])
        out["tost"][metric] = {
            "difference": float(diff.mean()),
            "margin": m,
            "p_value": p,
            "equivalent": bool(p < alpha),
            "patients": int(len(diff)),
        }
    out["patients"] = int(len(set(map(str, holdout_patients))))
    return out


def _describe(task: str, modality: str, options: Mapping[str, Any] | None) -> str:
    o = dict(options or {})
    if task == "superres":
        return "x2 area downsampling, linear upsampling back to the grid"
    return {
        "ct": f"Gaussian noise, sigma {o.get('sigma_hu', 40.0)} HU",
        "pet": f"Poisson counts, {o.get('counts_per_suv', 5.0)} counts per SUV unit",
        "mri": f"Rician noise, sigma {o.get('sigma', 0.05)} of the [0, 1] range",
        "us": f"multiplicative gamma speckle, {o.get('looks', 4.0)} looks",
    }[modality]
