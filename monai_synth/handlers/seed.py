"""Reseeding from the iteration number, so a resumed run draws the same random numbers as an uninterrupted one."""

from __future__ import annotations

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

__all__ = ["IterationSeedHandler"]


class IterationSeedHandler:
    """Reseed torch's global RNG from the epoch at ``EPOCH_STARTED`` and from the iteration at ``ITERATION_STARTED``.

    Training randomness (reparameterisation noise, diffusion noise and timesteps, condition dropout) then depends only
    on the iteration number, and a shuffling ``DataLoader`` (whose iterator is created right after ``EPOCH_STARTED``
    and draws its order from the global RNG) on the epoch number. A run resumed from an epoch-level checkpoint
    therefore continues with exactly the batches and random numbers the uninterrupted run would have used, and ends
    with the same weights (on the same hardware and thread count). Ignite restarts the data iterator when resuming
    mid-epoch, so iteration-level checkpoints resume the counters exactly but not the batch order.

    Under ``torch.distributed`` every rank adds its rank to the iteration seed, so ranks draw different noise.

    Args:
        seed: base seed.
    """

    EPOCH_STRIDE = 1_000_003  # keeps epoch seeds away from the iteration seeds of any realistic run
    RANK_STRIDE = 100_000_007

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def epoch_started(self, engine: Engine) -> None:
        torch.manual_seed(self.seed + self.EPOCH_STRIDE * (int(engine.state.epoch) + 1) ** 2)

    def __call__(self, engine: Engine) -> None:
        torch.manual_seed(self.seed + int(engine.state.iteration) + self.RANK_STRIDE * idist.get_rank())
