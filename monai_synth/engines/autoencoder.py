"""Stage 1: training MONAI's ``AutoencoderKL`` (Rombach et al. 2022) on MONAI's ``Trainer`` base.

MONAI's ``AdversarialTrainer`` cannot add the KL term of a variational autoencoder nor unpack ``AutoencoderKL``'s
``(reconstruction, z_mu, z_sigma)`` output, so :class:`AutoencoderKLTrainer` writes the iteration itself, following
``SupervisedTrainer``/``GanTrainer`` (events, AMP via the engine's ``GradScaler``, ``optim_set_to_none``). The loss is

    L_G = recon_weight * L1(x, x_hat) + kl_weight * KL(q(z|x) || N(0, I))
          + perceptual_weight * P(x, x_hat) + adv_weight * L_adv(D(x_hat))        (adversarial after warm-up)

and the patch discriminator ``D`` (MONAI ``PatchDiscriminator``, best with ``norm="INSTANCE"``) is trained with its
own optimiser on the least-squares GAN loss. With ``recon_loss="laplace_nll"`` and a
:class:`~monai_synth.networks.LaplaceAutoencoderKL`, the L1 term becomes the Laplace negative log-likelihood with the
decoder's per-pixel scale (the L1 loss is its special case with a fixed scale). Perceptual loss is never downloaded: pass a module, or a TorchScript
feature extractor file via :class:`~monai_synth.losses.LocalPerceptualLoss`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, EventEnum
from ignite.metrics import Metric
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, PrepareBatch, default_metric_cmp_fn
from monai.losses import PatchAdversarialLoss
from monai.transforms import Transform
from monai.utils import CommonKeys as Keys
from monai.utils import look_up_option
from torch.optim import Optimizer

from monai_synth.engines.utils import unwrap_model
from monai_synth.losses import kl_divergence
from monai_synth.networks.autoencoder import LaplaceAutoencoderKL, laplace_nll
from monai_synth.networks.utils import check_spatial_size

__all__ = [
    "AutoencoderKLTrainer",
    "AutoencoderPrepareBatch",
]


class AutoencoderPrepareBatch(PrepareBatch):
    """Return ``(image, image)``: the autoencoder's input is its own target (also for a validation evaluator).

    Args:
        image_key: key of the image in dict batches.
    """

    def __init__(self, image_key: str = "image") -> None:
        self.image_key = image_key

    def __call__(
        self, batchdata: Any, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batchdata, dict):
            if self.image_key not in batchdata:
                raise KeyError(f"batch has no {self.image_key!r} key; it has {sorted(batchdata)}")
            images = batchdata[self.image_key]
        elif isinstance(batchdata, (list, tuple)):
            images = batchdata[0]
        else:
            images = batchdata
        images = torch.as_tensor(images).to(device=device, non_blocking=non_blocking, **kwargs)
        return images, images


class AutoencoderKLTrainer(Trainer):
    """Train an ``AutoencoderKL`` with L1 + KL (+ perceptual) (+ patch-adversarial after a warm-up).

    ``engine.state.output`` (per item when decollated) uses MONAI's ``CommonKeys``, so stock handlers and metrics
    read it: ``"image"`` (the input), ``"label"`` (the reconstruction target, the input itself), ``"pred"`` (the
    reconstruction), ``"loss"`` (total generator loss, the one ``StatsHandler``/``MLFlowHandler`` should log), and ``"recon_loss"``, ``"kl_loss"``, ``"perceptual_loss"``,
    ``"gen_adv_loss"``, ``"disc_loss"`` (losses detached; the adversarial ones are 0 during warm-up or without a
    discriminator). Put ``autoencoder``, ``optimizer``, ``discriminator``, ``disc_optimizer``, LR schedulers, the
    trainer itself, :class:`~monai_synth.engines.latents.ScaleFactor` and
    :class:`~monai_synth.engines.checkpoint.CheckpointMetadata` in the checkpoint ``save_dict`` to resume exactly.

    Args:
        device: device to train on.
        max_epochs: number of epochs.
        train_data_loader: batches of dicts with ``image_key`` (model-space images).
        autoencoder: MONAI ``AutoencoderKL``.
        optimizer: optimiser of the autoencoder.
        kl_weight: weight of the KL term (small, e.g. 1e-6, keeps the latent near-deterministic but regular).
        recon_weight: weight of the reconstruction term.
        recon_loss: ``"l1"`` (default, sharper), ``"l2"``, or ``"laplace_nll"`` (with a
            :class:`~monai_synth.networks.LaplaceAutoencoderKL`: L1 with the decoder's learned per-pixel scale).
        discriminator: optional MONAI ``PatchDiscriminator``; its last output is the patch logits.
        disc_optimizer: the discriminator's own optimiser (required with ``discriminator``).
        adv_weight: weight of the generator's adversarial term.
        adv_warmup_epochs: epochs trained without the adversarial terms (neither G nor D update from them), so the
            discriminator does not fight a still-blurry autoencoder; ignite epochs are 1-based, the adversarial part
            starts at epoch ``adv_warmup_epochs + 1``.
        adv_criterion: ``"least_squares"``, ``"hinge"`` or ``"bce"`` (MONAI ``PatchAdversarialLoss``).
        perceptual_loss: optional module ``(reconstruction, image) -> scalar`` (e.g. :class:`~monai_synth.losses.LocalPerceptualLoss`).
        perceptual_weight: its weight; must be 0 without ``perceptual_loss``.
        spatial_size: if given, checked against the autoencoder's levels at construction
            (:func:`~monai_synth.networks.utils.check_spatial_size`); the first batch's size is always checked before any update.
        image_key: image key in the batches.
        epoch_length, non_blocking, iteration_update, postprocessing, key_train_metric, additional_metrics,
        metric_cmp_fn, train_handlers, amp, event_names, event_to_attr, decollate, optim_set_to_none, to_kwargs,
        amp_kwargs: as in MONAI ``SupervisedTrainer``. With ``decollate=True`` (the default, as there) the output
            becomes a list of per-item dicts, each repeating the scalar losses, so MONAI's
            ``from_engine(["loss"], first=True)`` (used by ``--tracking mlflow``) reads the loss.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        autoencoder: torch.nn.Module,
        optimizer: Optimizer,
        kl_weight: float = 1e-6,
        recon_weight: float = 1.0,
        recon_loss: str = "l1",
        discriminator: torch.nn.Module | None = None,
        disc_optimizer: Optimizer | None = None,
        adv_weight: float = 0.01,
        adv_warmup_epochs: int = 0,
        adv_criterion: str = "least_squares",
        perceptual_loss: Callable | None = None,
        perceptual_weight: float = 0.0,
        spatial_size: int | Sequence[int] | None = None,
        image_key: str = "image",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        postprocessing: Transform | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        try:
            recon_loss = look_up_option(recon_loss, ("l1", "l2", "laplace_nll"))
        except ValueError as e:
            raise ValueError(f"recon_loss: {e}") from None
        if (recon_loss == "laplace_nll") != isinstance(unwrap_model(autoencoder), LaplaceAutoencoderKL):
            raise ValueError(
                "recon_loss 'laplace_nll' and a LaplaceAutoencoderKL go together (the loss needs the decoder's "
                f"per-pixel scale); got recon_loss {recon_loss!r} with {type(unwrap_model(autoencoder)).__name__}"
            )
        for name, value in (("kl_weight", kl_weight), ("recon_weight", recon_weight), ("adv_weight", adv_weight)):
            if float(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if discriminator is not None and disc_optimizer is None:
            raise ValueError("a discriminator needs its own optimiser: pass disc_optimizer")
        if disc_optimizer is not None and discriminator is None:
            raise ValueError("disc_optimizer given without a discriminator")
        if float(perceptual_weight) > 0 and perceptual_loss is None:
            raise ValueError("perceptual_weight > 0 needs perceptual_loss (e.g. LocalPerceptualLoss('<weights.pt>'))")
        if int(adv_warmup_epochs) < 0:
            raise ValueError(f"adv_warmup_epochs must be >= 0, got {adv_warmup_epochs}")
        inner = unwrap_model(autoencoder)
        self._levels = len(inner.encoder.channels) if hasattr(getattr(inner, "encoder", None), "channels") else None
        if spatial_size is not None and self._levels is not None:
            check_spatial_size(spatial_size, self._levels)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=AutoencoderPrepareBatch(image_key),
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.autoencoder = autoencoder
        self.network = autoencoder  # the name MONAI handlers and bundle conventions look for
        self.optimizer = optimizer
        self.discriminator = discriminator
        self.disc_optimizer = disc_optimizer
        self.kl_weight = float(kl_weight)
        self.recon_weight = float(recon_weight)
        self.recon_loss = recon_loss
        self.adv_weight = float(adv_weight)
        self.adv_warmup_epochs = int(adv_warmup_epochs)
        self.adv_loss = PatchAdversarialLoss(criterion=adv_criterion, reduction="mean")
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = float(perceptual_weight)
        self.optim_set_to_none = optim_set_to_none
        self._size_checked = False

    def adversarial_active(self, epoch: int) -> bool:
        """Whether the adversarial terms are used in (1-based) ``epoch``."""
        return self.discriminator is not None and self.adv_weight > 0 and epoch > self.adv_warmup_epochs

    def _reconstruction_loss(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(recon.float(), images.float()) if self.recon_loss == "l1" else F.mse_loss(recon, images)

    def _iteration(self, engine: AutoencoderKLTrainer, batchdata: Any) -> dict[str, torch.Tensor]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if not engine._size_checked and engine._levels is not None:
            check_spatial_size(tuple(images.shape[2:]), engine._levels)
            engine._size_checked = True
        use_adv = engine.adversarial_active(engine.state.epoch)
        scaler = engine.scaler if engine.amp else None
        zero = images.new_zeros(())

        def _autocast():
            return torch.autocast("cuda", **engine.amp_kwargs) if scaler is not None else nullcontext()

        engine.autoencoder.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with _autocast():
            if engine.recon_loss == "laplace_nll":
                recon, z_mu, z_sigma, log_scale = engine.autoencoder(images, return_log_scale=True)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                recon_loss = laplace_nll(recon.float(), log_scale.float(), images.float())
            else:
                recon, z_mu, z_sigma = engine.autoencoder(images)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                recon_loss = engine._reconstruction_loss(recon, images)
            kl_loss = kl_divergence(z_mu.float(), z_sigma.float())
            loss = engine.recon_weight * recon_loss + engine.kl_weight * kl_loss
            perc_loss = zero
            if engine.perceptual_loss is not None and engine.perceptual_weight > 0:
                perc_loss = engine.perceptual_loss(recon.float(), images.float()).mean()
                loss = loss + engine.perceptual_weight * perc_loss
            gen_adv = zero
            if use_adv:
                logits_fake = engine.discriminator(recon.contiguous().float())[-1]
                gen_adv = engine.adv_loss(logits_fake, target_is_real=True, for_discriminator=False)
                loss = loss + engine.adv_weight * gen_adv
        # MONAI's keys, so stock handlers and metrics read the output: the target of a reconstruction is its input
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: images, Keys.PRED: recon.detach(), Keys.LOSS: loss}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaler is not None:
            scaler.step(engine.optimizer)
        else:
            engine.optimizer.step()

        disc_loss = zero
        if use_adv:
            engine.discriminator.train()
            engine.disc_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with _autocast():
                logits_fake = engine.discriminator(recon.detach().contiguous().float())[-1]
                loss_fake = engine.adv_loss(logits_fake, target_is_real=False, for_discriminator=True)
                logits_real = engine.discriminator(images.detach().contiguous().float())[-1]
                loss_real = engine.adv_loss(logits_real, target_is_real=True, for_discriminator=True)
                disc_loss = 0.5 * (loss_fake + loss_real)
                weighted = engine.adv_weight * disc_loss
            if scaler is not None:
                scaler.scale(weighted).backward()
                scaler.step(engine.disc_optimizer)
            else:
                weighted.backward()
                engine.disc_optimizer.step()
        if scaler is not None:
            scaler.update()

        engine.state.output.update(
            {
                Keys.LOSS: loss.detach(),
                "recon_loss": recon_loss.detach(),
                "kl_loss": kl_loss.detach(),
                "perceptual_loss": perc_loss.detach(),
                "gen_adv_loss": gen_adv.detach(),
                "disc_loss": disc_loss.detach(),
            }
        )
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
