"""Exponential moving average of a network's weights, the weights diffusion samples are drawn from.

Averaging the weights over the last few thousand steps removes the step-to-step jitter of the diffusion network and
gives visibly cleaner samples (Song & Ermon 2020; Karras et al. 2024). The averaged copy is an ordinary
``nn.Module`` passed in from the config, so ``CheckpointSaver`` saves it, ``CheckpointLoader`` restores it and the
sampler uses it like any network. The update itself is torch's ``get_ema_multi_avg_fn`` (a fused ``lerp`` over all
parameters).
"""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from torch.optim.swa_utils import get_ema_multi_avg_fn

from monai_synth.engines.utils import unwrap_model

__all__ = ["EMAWeightsHandler"]


class EMAWeightsHandler:
    """Update ``ema_model <- decay * ema_model + (1 - decay) * model`` after every ``update_every`` iterations.

    Not ignite's ``EMAHandler``: that one deep-copies the model inside the handler and counts its momentum warm-up
    in handler-local state, so a bundle config could not hand the same EMA network to ``CheckpointSaver``,
    ``CheckpointLoader`` and the sampler before the handler exists, and a resumed run would restart the warm-up. Here
    the EMA network comes from the config and the warm-up is a function of ``engine.state.iteration`` alone.

    The effective decay warms up as ``min(decay, (1 + k) / (warmup_steps_scale + k))`` where ``k`` is the number of
    EMA updates so far, so early averages are not dominated by the random initialisation; ``k`` is derived from
    ``engine.state.iteration``, which a resumed run restores, so resuming needs nothing but ``ema_model`` in the
    checkpoint. Before ``start_iteration`` the EMA copy simply follows the model. Buffers (e.g. norm statistics)
    are copied, not averaged.

    ``ema_model`` is made equal to ``model`` when this handler is constructed (configs build both networks from the
    same definition), i.e. before ``CheckpointLoader`` restores a saved EMA at ``Events.STARTED``.

    Args:
        model: the trained network (a ``DistributedDataParallel`` wrapper is looked through).
        ema_model: a network of the same architecture that will hold the average; it is put in eval mode and its
            parameters do not require gradients.
        decay: the target decay (0.9999 for long runs; tiny demo runs need e.g. 0.99).
        warmup: use the ``(1 + k) / (10 + k)`` warm-up of the decay (``warmup_steps_scale`` = 10).
        update_every: update every N iterations (the decay applies per update).
        start_iteration: iterations during which the EMA copies the model instead of averaging.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ema_model: torch.nn.Module,
        decay: float = 0.9999,
        warmup: bool = True,
        update_every: int = 1,
        start_iteration: int = 0,
    ) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if int(update_every) < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        model, ema_model = unwrap_model(model), unwrap_model(ema_model)  # DDP / compiled wrappers
        if model is ema_model:
            raise ValueError("ema_model must be a separate copy of model (build a second instance of the network)")
        ema_model.load_state_dict(model.state_dict())
        ema_model.eval()
        ema_model.requires_grad_(False)
        self.model = model
        self.ema_model = ema_model
        self.decay = float(decay)
        self.warmup = warmup
        self.update_every = int(update_every)
        self.start_iteration = int(start_iteration)

    def current_decay(self, iteration: int) -> float:
        """Decay used at (1-based) ``iteration``; 0 means copy."""
        if iteration <= self.start_iteration:
            return 0.0
        k = (iteration - self.start_iteration) // self.update_every - 1  # updates already done before this one
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.update_every), self)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """One EMA step with the given decay."""
        ema_params = list(self.ema_model.parameters())
        params = [p.detach() for p in self.model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("ema_model and model have different parameters; build both from the same definition")
        get_ema_multi_avg_fn(decay)(ema_params, params, None)
        for ema_b, b in zip(self.ema_model.buffers(), self.model.buffers()):
            ema_b.copy_(b)

    def __call__(self, engine: Engine) -> None:
        self.update(self.current_decay(int(engine.state.iteration)))
