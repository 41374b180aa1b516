"""Compute the latent scale factor over the whole training set when the autoencoder stage finishes."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from ignite.engine import Engine, Events

from monai_synth.engines.latents import (
    ScaleFactor,
    compute_scale_factor,
    latent_channel_stats,
    standardise_latent_channels,
)

__all__ = ["ScaleFactorHandler"]


class ScaleFactorHandler:
    """Set a :class:`~monai_synth.engines.latents.ScaleFactor` from the trained autoencoder at the end of training.

    It runs on the *last iteration* of the last epoch (``ITERATION_COMPLETED``), which Ignite fires before
    ``EPOCH_COMPLETED`` and ``COMPLETED``, so every checkpoint a ``CheckpointSaver`` writes at the end of training
    (final, interval or key-metric) already contains the new value, whatever order the handlers were attached in.
    A run stopped early with ``engine.terminate()`` (early stopping) computes it on ``TERMINATE``, which also comes
    before ``COMPLETED``. With ``interval`` it is also refreshed at the end of every ``interval``-th epoch, so interval checkpoints used
    for early stopping carry a current value.

    Args:
        autoencoder: the ``AutoencoderKL`` being trained.
        data_loader: the training data *without* random augmentation (the whole set is encoded).
        scale_factor: the module saved in the checkpoint.
        device: where to encode; defaults to the engine's device.
        image_key: image key in the batches.
        interval: also recompute every this many epochs (``None``: only at the end).
        progress: show a tqdm bar while encoding the training set.
        per_channel: at the end of training, first standardise each latent channel over the training set, folded into
            the autoencoder's weights (:func:`~monai_synth.engines.latents.standardise_latent_channels`), so the scale
            factor comes out about 1. Not at the interval refreshes: training goes on there, in its own parametrisation.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        data_loader: Iterable,
        scale_factor: ScaleFactor,
        device: str | torch.device | None = None,
        image_key: str = "image",
        interval: int | None = None,
        progress: bool = False,
        per_channel: bool = False,
    ) -> None:
        if not isinstance(scale_factor, ScaleFactor):
            raise TypeError(f"scale_factor must be a monai_synth ScaleFactor module, got {type(scale_factor).__name__}")
        if interval is not None and int(interval) < 1:
            raise ValueError(f"interval must be >= 1 or None, got {interval}")
        self.autoencoder = autoencoder
        self.data_loader = data_loader
        self.scale_factor = scale_factor
        self.device = device
        self.image_key = image_key
        self.interval = None if interval is None else int(interval)
        self.progress = progress
        self.per_channel = bool(per_channel)
        self.logger = logging.getLogger(__name__)

    def _due(self, engine: Engine, _event: int) -> bool:
        state = engine.state
        if state.epoch_length is None or state.iteration % state.epoch_length != 0:
            return False  # not the last iteration of an epoch
        last = state.max_epochs is not None and state.epoch >= state.max_epochs
        return last or (self.interval is not None and state.epoch % self.interval == 0)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=self._due), self)
        # an early stop (engine.terminate()) fires TERMINATE before COMPLETED, i.e. before the final checkpoint
        engine.add_event_handler(Events.TERMINATE, self)

    def _final(self, engine: Engine | None) -> bool:
        state = getattr(engine, "state", None)
        if state is None or getattr(engine, "should_terminate", False):
            return True  # called directly, or an early stop
        return state.max_epochs is not None and state.epoch >= state.max_epochs

    def __call__(self, engine: Engine | None = None) -> float:
        device = self.device if self.device is not None else getattr(getattr(engine, "state", None), "device", "cpu")
        if self.per_channel and self._final(engine):
            mean, std = latent_channel_stats(
                self.autoencoder, self.data_loader, device=device, image_key=self.image_key, progress=self.progress
            )
            standardise_latent_channels(self.autoencoder, mean, std)
            self.logger.info(
                f"latent channels standardised over the training set (means {[round(v, 3) for v in mean.tolist()]}, "
                f"SDs {[round(v, 3) for v in std.tolist()]}), folded into the autoencoder's weights"
            )
        value = compute_scale_factor(
            self.autoencoder, self.data_loader, device=device, image_key=self.image_key, progress=self.progress
        )
        self.scale_factor.set(value)
        self.logger.info(f"latent scale factor over the training set: {value:.6g}")
        return value
