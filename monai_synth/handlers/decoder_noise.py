"""Fit the Laplace decoder's noise model to the training images when the autoencoder stage finishes."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from ignite.engine import Engine, Events

from monai_synth.engines.latents import _images_of
from monai_synth.engines.utils import unwrap_model
from monai_synth.networks.autoencoder import LaplaceAutoencoderKL

__all__ = ["DecoderNoiseHandler"]


class DecoderNoiseHandler:
    """Run :meth:`~monai_synth.networks.LaplaceAutoencoderKL.fit_noise` on the training set at the end of training.

    Like :class:`~monai_synth.handlers.ScaleFactorHandler`, it runs on the last iteration of the last epoch (and on
    ``TERMINATE``), before any end-of-training checkpoint is written, so the final checkpoint carries the fitted
    noise model next to the weights it was fitted for.

    Args:
        autoencoder: the :class:`~monai_synth.networks.LaplaceAutoencoderKL` being trained (``noise="fitted"``).
        data_loader: the training data *without* random augmentation.
        device: where to run the autoencoder; defaults to the engine's device.
        image_key: image key in the batches.
        seed: seed of the subsample the marginal's quantiles are taken from.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        data_loader: Iterable,
        device: str | torch.device | None = None,
        image_key: str = "image",
        seed: int = 0,
    ) -> None:
        if not isinstance(unwrap_model(autoencoder), LaplaceAutoencoderKL):
            raise TypeError(
                "DecoderNoiseHandler fits the noise of a LaplaceAutoencoderKL (decoder_likelihood: laplace); got "
                f"{type(unwrap_model(autoencoder)).__name__}"
            )
        self.autoencoder = autoencoder
        self.data_loader = data_loader
        self.device = device
        self.image_key = image_key
        self.seed = int(seed)
        self.logger = logging.getLogger(__name__)

    @staticmethod
    def _due(engine: Engine, _event: int) -> bool:
        state = engine.state
        if state.epoch_length is None or state.iteration % state.epoch_length != 0:
            return False  # not the last iteration of an epoch
        return state.max_epochs is not None and state.epoch >= state.max_epochs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=self._due), self)
        engine.add_event_handler(Events.TERMINATE, self)

    def __call__(self, engine: Engine | None = None) -> None:
        device = self.device if self.device is not None else getattr(getattr(engine, "state", None), "device", "cpu")
        net = unwrap_model(self.autoencoder)
        batches = (_images_of(batch, self.image_key).to(device) for batch in self.data_loader)
        net.fit_noise(batches, seed=self.seed)
        kernel, n = net.noise_kernel[0, 0], net.noise_kernel.shape[-1]
        # the correlation of neighbouring pixels the kernel gives unit-variance white noise, per axis
        lag1 = [float((kernel.narrow(d, 1, n - 1) * kernel.narrow(d, 0, n - 1)).sum()) for d in range(kernel.ndim)]
        self.logger.info(
            "decoder noise fitted on the training set: lag-1 correlation per axis %s, median %.3g",
            [round(v, 3) for v in lag1],
            float(net.noise_quantiles[0, net.noise_quantiles.shape[1] // 2]),
        )
