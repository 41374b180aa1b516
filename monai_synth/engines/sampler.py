"""Generating model-space images from a trained latent diffusion model (use the EMA weights).

:func:`sample_latent_images` is one call of MONAI's ``LatentDiffusionInferer.sample`` with classifier-free guidance,
made reproducible by seed without disturbing the caller's random state. :class:`LatentSampler` binds the trained
pieces once and is the :class:`Generator` that the sample grids and
:func:`monai_synth.privacy.sampling.guarded_sample` drive.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import RFlowScheduler
from monai.networks.utils import eval_mode

from monai_synth.engines.diffusion import make_condition
from monai_synth.engines.latents import ScaleFactor, encode_labels, scale_factor_value
from monai_synth.engines.utils import unwrap_model

__all__ = ["Generator", "sample_latent_images", "LatentSampler"]


@runtime_checkable
class Generator(Protocol):
    """What every consumer of a trained model calls: the sample grids, guarded sampling and the release.

    ``generate(n, seed, condition, **guidance)`` returns ``(n, C, *spatial)`` model-space images of ``condition`` (a
    label name, a class id, or ``{"label": ..., <context key>: value}``); the same arguments give the same images.
    ``guidance`` holds optional overrides such as ``guidance_scale`` and ``num_inference_steps``.
    """

    def __call__(self, n: int, seed: int, condition: Any, **guidance: Any) -> torch.Tensor: ...


def _set_timesteps(scheduler: Any, num_inference_steps: int, latent_shape: Sequence[int], device: Any) -> None:
    if isinstance(scheduler, RFlowScheduler):
        scheduler.set_timesteps(
            num_inference_steps=num_inference_steps, device=device, input_img_size_numel=math.prod(latent_shape[1:])
        )
    else:
        scheduler.set_timesteps(num_inference_steps=num_inference_steps, device=device)


@torch.no_grad()
def sample_latent_images(
    diffusion_model: torch.nn.Module,
    autoencoder: torch.nn.Module,
    scheduler: Any,
    scale_factor: float | ScaleFactor,
    labels: torch.Tensor | Sequence[int] | None,
    latent_shape: Sequence[int],
    num_classes: int | None = None,
    guidance_scale: float | None = None,
    num_inference_steps: int = 50,
    seed: int = 0,
    device: str | torch.device = "cpu",
    context: torch.Tensor | None = None,
    context_as_sequence: bool = True,
    verbose: bool = False,
    autocast_dtype: torch.dtype | None = None,
    decode_roi_size: Sequence[int] | None = None,
    guidance_interval: Sequence[float] | None = None,
) -> torch.Tensor:
    """Sample one batch of images in model space.

    Args:
        diffusion_model: the (EMA) diffusion network, called as ``model(x, timesteps=t, context=c)``.
        autoencoder: stage-1 ``AutoencoderKL`` used to decode ``latent / scale_factor``.
        scheduler: the MONAI scheduler the model was trained with (DDPM, DDIM or RFlow); its inference timesteps are
            (re)set to ``num_inference_steps``.
        scale_factor: latent scale factor of the autoencoder.
        labels: (B,) class ids, one image per entry; ``None`` for an unconditional model (then ``B`` must be implied
            by ``context`` and there is no guidance).
        latent_shape: (C, *spatial) of one latent.
        num_classes: number of classes of the conditional model.
        guidance_scale: classifier-free guidance weight ``w`` in ``uncond + w * (cond - uncond)``; ``None`` or 1 runs
            only the conditional branch.
        num_inference_steps: sampling steps.
        seed: makes the result reproducible; the caller's global RNG state is left untouched.
        device: where to sample.
        context: optional (B, K) extra continuous conditions.
        context_as_sequence: condition shape (B, 1, D) instead of (B, D); must match training.
        verbose: show MONAI's tqdm bar over the sampling steps.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the networks under CUDA autocast (ignored off a GPU);
            ``None`` runs in float32.
        decode_roi_size: latent window of sliding-window decoding
            (:class:`~monai_synth.inferers.SlidingWindowDecoder`) for latents larger than the autoencoder decodes at
            once; ``None`` decodes the whole latent in one pass.
        guidance_interval: ``(low, high)`` fractions of the scheduler's training timesteps (0: clean, 1: pure noise):
            guidance is applied only at steps whose timestep lies in that range, the conditional prediction alone
            elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"): guidance at the noisiest
            steps pulls each image's global layout to its class's mode. On the quickstart, leaving the first of 10
            steps unguided moved realism by less than the spread between seeds (``docs/benchmarks.md``).
            ``None``: every step.

    Returns:
        (B, C_image, *spatial) float tensor on ``device``.
    """
    if labels is None:
        if context is None:
            raise ValueError("unconditional sampling needs the batch size; pass labels or context")
        batch, condition = context.shape[0], None
    else:
        labels = torch.as_tensor(labels).reshape(-1).long()
        if num_classes is None:
            raise ValueError("conditional sampling needs num_classes")
        batch = labels.shape[0]
        condition = make_condition(labels, num_classes, context, as_sequence=context_as_sequence).to(device)
    cfg = None if guidance_scale is None or condition is None or float(guidance_scale) == 1.0 else float(guidance_scale)
    diffusion_model, autoencoder = unwrap_model(diffusion_model), unwrap_model(autoencoder)
    interval = checked_guidance_interval(guidance_interval)
    if cfg is not None and interval is not None and interval != (0.0, 1.0):
        total = float(getattr(scheduler, "num_train_timesteps", 1000))
        diffusion_model = _IntervalGuidance(diffusion_model, interval[0] * total, interval[1] * total)
    if decode_roi_size is None:
        decoder = autoencoder
    else:
        from monai_synth.inferers import SlidingWindowDecoder  # monai_synth.inferers imports from this package

        decoder = SlidingWindowDecoder(autoencoder, decode_roi_size)
    on_gpu = torch.device(device).type == "cuda"
    autocast = (
        torch.autocast("cuda", dtype=autocast_dtype)
        if autocast_dtype is not None and on_gpu
        else contextlib.nullcontext()
    )
    inferer = LatentDiffusionInferer(scheduler=scheduler, scale_factor=scale_factor_value(scale_factor))
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn((batch, *latent_shape), generator=generator).to(device)
    fork_devices = [torch.device(device)] if on_gpu else []
    with eval_mode(diffusion_model, autoencoder), autocast:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(int(seed))
            _set_timesteps(scheduler, int(num_inference_steps), latent_shape, device)
            images = inferer.sample(
                input_noise=noise,
                autoencoder_model=decoder,
                diffusion_model=diffusion_model,
                scheduler=scheduler,
                conditioning=condition,
                mode="crossattn",
                verbose=verbose,
                cfg=cfg,
            )
    return images.float()


def checked_guidance_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    """``(low, high)`` with ``0 <= low < high <= 1``, or None; anything else is refused with what to pass."""
    if interval is None:
        return None
    values = tuple(float(v) for v in interval)
    if len(values) != 2 or not 0.0 <= values[0] < values[1] <= 1.0:
        raise ValueError(
            f"guidance_interval must be (low, high) fractions of the training timesteps with 0 <= low < high <= 1 "
            f"(e.g. [0.0, 0.8]: no guidance at the noisiest fifth), got {interval}"
        )
    return values


class _IntervalGuidance(torch.nn.Module):
    """The diffusion network as MONAI's guided sampling calls it (unconditional half, then conditional half of the
    batch), answering with the conditional prediction in both halves at timesteps outside ``[low, high]``, so that
    ``uncond + w * (cond - uncond)`` is the conditional prediction there."""

    def __init__(self, network: torch.nn.Module, low: float, high: float) -> None:
        super().__init__()
        self.network, self.low, self.high = network, float(low), float(high)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        out = self.network(x, timesteps=timesteps, context=context)
        t = float(torch.as_tensor(timesteps).flatten()[0])
        if self.low <= t <= self.high:
            return out
        cond = out[out.shape[0] // 2 :]
        return torch.cat([cond, cond])


class LatentSampler(Generator):
    """The trained latent diffusion model as a :class:`Generator`.

    Args:
        diffusion_model: the EMA diffusion network (the one to release samples from).
        autoencoder: stage-1 ``AutoencoderKL``.
        scheduler: the scheduler used in training (DDPM/DDIM/RFlow).
        scale_factor: latent scale factor (float or the stage-1 :class:`ScaleFactor`, read at call time).
        labels: ordered class names of the model; ``condition`` values are names from this list (or ids).
        latent_shape: (C, *spatial) of one latent, e.g. ``(3, 16, 16)``.
        num_inference_steps: default sampling steps.
        guidance_scale: default classifier-free guidance weight (``None``: no guidance).
        guidance_interval: ``(low, high)`` fractions of the training timesteps where guidance applies (see
            :func:`sample_latent_images`); ``None``: every step.
        device: where to sample.
        batch_size: images per forward batch; ``n`` larger than this is sampled in chunks.
        context_keys: names of extra continuous conditions, read from a mapping ``condition``.
        context_as_sequence: condition shape (B, 1, D) instead of (B, D); must match training.
        clip: optional (low, high) clamp of the decoded images (model space is about [-1, 1]).
        verbose: show MONAI's tqdm bar during sampling.
        autocast_dtype: CUDA autocast dtype of sampling (e.g. ``torch.bfloat16``); ``None``: float32.
        decode_roi_size: latent window of sliding-window decoding; ``None`` decodes in one pass.
        context_transform: applied to the requested values of ``context_keys`` first, e.g. the training split's
            :class:`~monai_synth.engines.conditions.ConditionScaler` the model was trained with.
        context_defaults: values of ``context_keys`` for a condition that does not give them (e.g. a label alone,
            as the training sample grids ask), such as the training split's means; ``None`` requires them.
    """

    def __init__(
        self,
        diffusion_model: torch.nn.Module,
        autoencoder: torch.nn.Module,
        scheduler: Any,
        scale_factor: float | ScaleFactor,
        labels: Sequence[str],
        latent_shape: Sequence[int],
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        context_keys: Sequence[str] = (),
        context_as_sequence: bool = True,
        clip: Sequence[float] | None = None,
        verbose: bool = False,
        autocast_dtype: torch.dtype | None = None,
        decode_roi_size: Sequence[int] | None = None,
        context_transform: Any = None,
        context_defaults: Mapping[str, float] | None = None,
        guidance_interval: Sequence[float] | None = None,
    ) -> None:
        if not labels:
            raise ValueError("LatentSampler needs the model's ordered class names (labels)")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.diffusion_model = diffusion_model
        self.autoencoder = autoencoder
        self.scheduler = scheduler
        self.scale_factor = scale_factor
        self.labels = [str(v) for v in labels]
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = guidance_scale
        self.guidance_interval = checked_guidance_interval(guidance_interval)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.context_keys = list(context_keys)
        self.context_as_sequence = context_as_sequence
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.verbose = verbose
        self.autocast_dtype = autocast_dtype
        self.context_transform = context_transform
        self.context_defaults = None if context_defaults is None else {k: float(v) for k, v in context_defaults.items()}
        self.decode_roi_size = None if decode_roi_size is None else tuple(int(r) for r in decode_roi_size)

    def _parse_condition(self, condition: Any) -> tuple[int, list[float] | None]:
        extras = None
        if isinstance(condition, Mapping):
            if "label" not in condition:
                raise ValueError(f"condition mapping needs a 'label' key, got {sorted(condition)}")
            missing = [k for k in self.context_keys if k not in condition and k not in (self.context_defaults or {})]
            if missing:
                raise ValueError(f"condition is missing the continuous conditions {missing}")
            given = {**(self.context_defaults or {}), **condition}
            extras = [float(given[k]) for k in self.context_keys] if self.context_keys else None
            condition = condition["label"]
        elif self.context_keys and self.context_defaults is not None:
            extras = [self.context_defaults[k] for k in self.context_keys]
        elif self.context_keys:
            raise ValueError(f"this model also needs {self.context_keys}; pass condition as a dict with those keys")
        return int(encode_labels([condition], self.labels)[0]), extras

    def __call__(self, n: int, seed: int, condition: Any, **guidance: Any) -> torch.Tensor:
        """Generate ``n`` model-space images of ``condition`` reproducibly from ``seed``.

        Args:
            n: number of images.
            seed: random seed; the same ``(n, seed, condition, guidance)`` gives the same images.
            condition: a label name (``"4a"``), a class id, or ``{"label": ..., <context key>: value}``.
            guidance: optional overrides ``guidance_scale`` and ``num_inference_steps``.

        Returns:
            (n, C, *spatial) float32 tensor on CPU.
        """
        unknown = set(guidance) - {"guidance_scale", "num_inference_steps"}
        if unknown:
            raise TypeError(f"unknown guidance options {sorted(unknown)}; use guidance_scale, num_inference_steps")
        n = int(n)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        class_id, extras = self._parse_condition(condition)
        out = []
        for start in range(0, n, self.batch_size):
            size = min(self.batch_size, n - start)
            context = None if extras is None else torch.tensor([extras] * size, dtype=torch.float32)
            if context is not None and self.context_transform is not None:
                context = self.context_transform(context)
            images = sample_latent_images(
                diffusion_model=self.diffusion_model,
                autoencoder=self.autoencoder,
                scheduler=self.scheduler,
                scale_factor=self.scale_factor,
                labels=torch.full((size,), class_id, dtype=torch.long),
                latent_shape=self.latent_shape,
                num_classes=len(self.labels),
                guidance_scale=guidance.get("guidance_scale", self.guidance_scale),
                guidance_interval=self.guidance_interval,
                num_inference_steps=guidance.get("num_inference_steps", self.num_inference_steps),
                # one seed per chunk so a chunk is reproducible on its own; 1_000_003 keeps chunks of seed s and s+1 apart
                seed=int(seed) * 1_000_003 + start,
                device=self.device,
                context=context,
                context_as_sequence=self.context_as_sequence,
                verbose=self.verbose,
                autocast_dtype=self.autocast_dtype,
                decode_roi_size=self.decode_roi_size,
            )
            out.append(images.float().cpu())
        images = torch.cat(out)
        if self.clip is not None:
            images = images.clamp(*self.clip)
        return images
