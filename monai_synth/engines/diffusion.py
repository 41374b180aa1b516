"""Stage 2 training on cached latents with MONAI's ``SupervisedTrainer`` + ``DiffusionInferer``.

The prepare-batch classes here turn a batch of :class:`~monai_synth.engines.latents.LatentDataset` items into what
``SupervisedTrainer`` hands to ``DiffusionInferer``: the scaled latents as input, the regression target, and the
keyword arguments ``noise``, ``timesteps`` and ``condition``. The inferer adds the noise with the scheduler and calls
``model(x=noisy, timesteps=t, context=condition)``.

Classifier-free guidance (Ho & Salimans 2022) needs the model to also learn the unconditional score. MONAI's
``DiffusionInferer.sample(cfg=...)`` builds the unconditional branch by filling the whole context with ``-1``, so
condition dropout here replaces whole context rows by ``-1`` with probability ``cond_drop_prob``: the model sees at
training exactly the null condition it is given at sampling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import DiffusionPrepareBatch
from monai.networks.schedulers import RFlowScheduler

from monai_synth.engines.latents import ScaleFactor, scale_factor_value

__all__ = [
    "make_condition",
    "drop_condition",
    "LatentDiffusionPrepareBatch",
    "RectifiedFlowPrepareBatch",
    "diffusion_prepare_batch",
    "WarmupCosine",
]

NULL_CONDITION_VALUE = -1.0  # MONAI's cfg_fill_value default


def make_condition(
    labels: torch.Tensor,
    num_classes: int,
    context: torch.Tensor | None = None,
    as_sequence: bool = True,
) -> torch.Tensor:
    """Condition vector = one-hot class (+ extra continuous values), as the diffusion model's ``context``.

    Args:
        labels: (B,) integer class ids (or (B, num_classes) one-hot/soft float rows).
        num_classes: number of classes.
        context: optional (B, K) float continuous conditions appended after the one-hot part.
        as_sequence: return (B, 1, D) (a one-token sequence, what MONAI's cross-attention UNet and the DiT take)
            instead of (B, D).

    Returns:
        float32 tensor (B, 1, num_classes + K) or (B, num_classes + K).
    """
    if labels.is_floating_point() and labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"soft labels have {labels.shape[1]} columns, expected num_classes={num_classes}")
        onehot = labels.float()
    else:
        labels = labels.reshape(-1).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class ids {labels.tolist()} out of range for num_classes={num_classes}")
        onehot = F.one_hot(labels, num_classes).float()
    if context is not None:
        context = context.reshape(onehot.shape[0], -1).to(onehot)
        onehot = torch.cat([onehot, context], dim=1)
    return onehot.unsqueeze(1) if as_sequence else onehot


def drop_condition(condition: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each row of ``condition`` by the null condition (all ``-1``) with probability ``prob``."""
    if prob <= 0:
        return condition
    keep = torch.rand(condition.shape[0], generator=generator, device="cpu") >= prob
    keep = keep.to(condition.device).reshape(-1, *([1] * (condition.ndim - 1)))
    return torch.where(keep, condition, torch.full_like(condition, NULL_CONDITION_VALUE))


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Prepare-batch for DDPM/DDIM training on cached latents (epsilon or v-prediction target).

    Returns ``(scaled_latents, target, (), {"noise", "timesteps", "condition"})`` for ``SupervisedTrainer`` with a
    MONAI ``DiffusionInferer``: noise has the latent shape, timesteps are uniform integers in
    ``[0, num_train_timesteps)``, the target is the noise (``"epsilon"``) or ``scheduler.get_velocity`` (``"v_prediction"``,
    Salimans & Ho 2022), latents are multiplied by the autoencoder's scale factor.

    Args:
        num_train_timesteps: the scheduler's ``num_train_timesteps``.
        num_classes: number of classes; the condition is ``make_condition(label, num_classes, context)``.
        condition_name: batch key of the class id; ``None`` trains unconditionally.
        cond_drop_prob: probability of replacing a row's condition by the null condition (classifier-free guidance).
            Use 0 for validation.
        scale_factor: the latent scale factor, a float or the stage-1 :class:`ScaleFactor` module (read at every call,
            so it may be loaded from the checkpoint after this object is built).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; must match the scheduler used to sample.
        scheduler: required for ``"v_prediction"`` (for ``get_velocity``); when given, its ``prediction_type`` and
            ``num_train_timesteps`` are checked against these arguments.
        latent_key: batch key of the latents.
        context_name: batch key of extra continuous conditions ((B, K) floats) or ``None``.
        context_as_sequence: shape the condition (B, 1, D) instead of (B, D).
        context_transform: applied to the extra conditions first, e.g. the training split's
            :class:`~monai_synth.engines.conditions.ConditionScaler`.
    """

    PREDICTION_TYPES = ("epsilon", "v_prediction")

    def __init__(
        self,
        num_train_timesteps: int,
        num_classes: int | None = None,
        condition_name: str | None = "label",
        cond_drop_prob: float = 0.1,
        scale_factor: float | ScaleFactor = 1.0,
        prediction_type: str = "epsilon",
        scheduler: Any = None,
        latent_key: str = "latent",
        context_name: str | None = None,
        context_as_sequence: bool = True,
        context_transform: Any = None,
    ) -> None:
        super().__init__(num_train_timesteps=int(num_train_timesteps), condition_name=condition_name)
        if prediction_type not in self.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {self.PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type == "v_prediction" and scheduler is None:
            raise ValueError("prediction_type='v_prediction' needs the scheduler (for get_velocity)")
        if scheduler is not None:
            sched_type = str(getattr(scheduler, "prediction_type", prediction_type))
            if sched_type != prediction_type:
                raise ValueError(
                    f"scheduler predicts {sched_type!r} but prediction_type={prediction_type!r}; set both the same or "
                    "sampling will misread the model's output"
                )
            if int(scheduler.num_train_timesteps) != int(num_train_timesteps):
                raise ValueError(
                    f"scheduler has num_train_timesteps={scheduler.num_train_timesteps}, got {num_train_timesteps}"
                )
        if condition_name is not None and (num_classes is None or int(num_classes) < 1):
            raise ValueError("a conditional prepare-batch needs num_classes >= 1 (or condition_name=None)")
        if not 0.0 <= float(cond_drop_prob) < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.cond_drop_prob = float(cond_drop_prob)
        self.scale_factor = scale_factor
        self.prediction_type = prediction_type
        self.scheduler = scheduler
        self.latent_key = latent_key
        self.context_name = context_name
        self.context_as_sequence = context_as_sequence
        self.context_transform = context_transform

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        return noise

    def get_condition(self, batchdata: Mapping[str, Any], device: Any) -> torch.Tensor | None:
        """The (possibly dropped-out) condition for this batch, or ``None`` when unconditional."""
        if self.condition_name is None:
            return None
        if self.condition_name not in batchdata:
            raise KeyError(f"batch has no {self.condition_name!r} key (condition_name); it has {sorted(batchdata)}")
        context = None
        if self.context_name is not None:
            if self.context_name not in batchdata:
                raise KeyError(f"batch has no {self.context_name!r} key (context_name); it has {sorted(batchdata)}")
            context = torch.as_tensor(batchdata[self.context_name], dtype=torch.float32)
            if self.context_transform is not None:
                context = self.context_transform(context)
        labels = torch.as_tensor(batchdata[self.condition_name])
        cond = make_condition(labels, self.num_classes, context, as_sequence=self.context_as_sequence)
        return drop_condition(cond, self.cond_drop_prob).to(device)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        if not isinstance(batchdata, Mapping) or self.latent_key not in batchdata:
            raise KeyError(f"batches must be dicts with a {self.latent_key!r} key (see LatentDataset)")
        latents = torch.as_tensor(batchdata[self.latent_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        latents = latents * scale_factor_value(self.scale_factor)
        noise = self.get_noise(latents)
        timesteps = self.get_timesteps(latents)
        target = self.get_target(latents, noise, timesteps)
        infer_kwargs: dict[str, Any] = {"noise": noise, "timesteps": timesteps}
        condition = self.get_condition(batchdata, latents.device)
        if condition is not None:
            infer_kwargs["condition"] = condition
        return latents, target, (), infer_kwargs


class RectifiedFlowPrepareBatch(LatentDiffusionPrepareBatch):
    """Prepare-batch for rectified-flow training (Liu et al. 2023; Esser et al. 2024) with MONAI's ``RFlowScheduler``.

    MONAI's ``RFlowScheduler.add_noise`` interpolates ``x_t = (1 - t/T) * x0 + (t/T) * noise`` and its ``step`` moves
    ``x <- x + v * (t - t_next) / T`` towards ``t = 0``, so the velocity the model must predict is ``x0 - noise``.
    Timesteps come from ``scheduler.sample_timesteps`` (uniform or logit-normal, possibly continuous).

    Args:
        scheduler: the ``RFlowScheduler`` shared with the inferer and the sampler.
        num_classes, condition_name, cond_drop_prob, scale_factor, latent_key, context_name, context_as_sequence,
            context_transform: as in :class:`LatentDiffusionPrepareBatch`.
    """

    def __init__(
        self,
        scheduler: RFlowScheduler,
        num_classes: int | None = None,
        condition_name: str | None = "label",
        cond_drop_prob: float = 0.1,
        scale_factor: float | ScaleFactor = 1.0,
        latent_key: str = "latent",
        context_name: str | None = None,
        context_as_sequence: bool = True,
        context_transform: Any = None,
    ) -> None:
        if not isinstance(scheduler, RFlowScheduler):
            raise TypeError(f"RectifiedFlowPrepareBatch needs a monai RFlowScheduler, got {type(scheduler).__name__}")
        super().__init__(
            num_train_timesteps=scheduler.num_train_timesteps,
            num_classes=num_classes,
            condition_name=condition_name,
            cond_drop_prob=cond_drop_prob,
            scale_factor=scale_factor,
            prediction_type="v_prediction",
            scheduler=scheduler,
            latent_key=latent_key,
            context_name=context_name,
            context_as_sequence=context_as_sequence,
            context_transform=context_transform,
        )

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        return self.scheduler.sample_timesteps(images)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return images - noise


def diffusion_prepare_batch(
    scheduler: Any,
    num_classes: int | None = None,
    cond_drop_prob: float = 0.1,
    scale_factor: float | ScaleFactor = 1.0,
    prediction_type: str = "epsilon",
    **kwargs: Any,
) -> LatentDiffusionPrepareBatch:
    """The prepare-batch that matches ``scheduler``, so a config switches objective by changing the scheduler only.

    An ``RFlowScheduler`` gets :class:`RectifiedFlowPrepareBatch` (velocity target, the scheduler's own timestep
    sampling; ``prediction_type`` does not apply), any other MONAI scheduler :class:`LatentDiffusionPrepareBatch`
    with ``prediction_type``. Extra keyword arguments go to the class.
    """
    if isinstance(scheduler, RFlowScheduler):
        return RectifiedFlowPrepareBatch(
            scheduler, num_classes=num_classes, cond_drop_prob=cond_drop_prob, scale_factor=scale_factor, **kwargs
        )
    return LatentDiffusionPrepareBatch(
        num_train_timesteps=scheduler.num_train_timesteps,
        num_classes=num_classes,
        cond_drop_prob=cond_drop_prob,
        scale_factor=scale_factor,
        prediction_type=prediction_type,
        scheduler=scheduler,
        **kwargs,
    )


def _warmup_cosine(warmup_steps: int, total_steps: int, final: float, step: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(functools.partial):
    """Learning-rate multiplier for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up, then cosine decay.

    Transformers trained with Adam are unstable in their first steps at full learning rate, and a decay to
    ``final`` lets the last weights (and their EMA) settle; both matter most for short runs, where a constant rate
    ends the run on a noisy iterate.

    The shape comes from this run's config, never from a checkpoint: ``LambdaLR`` saves and restores the attributes
    of a callable object, so a schedule holding ``total_steps`` as an attribute came back with the old total when a
    run was extended (more epochs) and trained its extra epochs at ``final`` (with ``final=0``: not at all). Its
    values live in the ``functools.partial`` arguments instead, so a resumed scheduler keeps its step count and
    follows the new total.

    Args:
        warmup_steps: steps of linear warm-up from ``1 / warmup_steps`` to 1 (0: none).
        total_steps: step at which the cosine reaches ``final`` (later steps stay there).
        final: multiplier at the end of the decay.
    """

    def __new__(cls, warmup_steps: int, total_steps: int, final: float = 0.0) -> WarmupCosine:
        if int(warmup_steps) < 0 or int(total_steps) < 1:
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
        if not 0.0 <= float(final) <= 1.0:
            raise ValueError(f"final must be in [0, 1], got {final}")
        return super().__new__(cls, _warmup_cosine, int(warmup_steps), int(total_steps), float(final))

    def __reduce__(self):
        return type(self), self.args

    @property
    def warmup_steps(self) -> int:
        return self.args[0]

    @property
    def total_steps(self) -> int:
        return self.args[1]

    @property
    def final(self) -> float:
        return self.args[2]
