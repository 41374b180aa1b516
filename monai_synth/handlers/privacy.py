"""Ignite handler that runs the privacy safeguard on every batch a sampling engine (MONAI evaluator) produces."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

from monai_synth.privacy.safeguard import PrivacySafeguard
from monai_synth.privacy.sampling import SampleRecord, summarise_records

__all__ = ["PrivacySafeguardHandler"]


def _pick(container: Any, key: str | None) -> Any:
    """``container[key]`` for a dict, per item for a list of dicts (MONAI's decollated output), else itself."""
    if key is None:
        return container
    if isinstance(container, dict):
        return container.get(key)
    if isinstance(container, (list, tuple)) and container and isinstance(container[0], dict):
        return [item.get(key) for item in container]
    return None


def _as_list(value: Any, n: int) -> list:
    if value is None:
        return [None] * n
    if torch.is_tensor(value):
        value = value.detach().cpu()
        value = value.reshape(value.shape[0], -1)[:, 0] if value.ndim > 1 else value
        return [v.item() for v in value] if value.ndim == 1 and len(value) == n else [value.tolist()] * n
    if isinstance(value, (list, tuple)) and len(value) == n:
        return [v.item() if torch.is_tensor(v) and v.numel() == 1 else v for v in value]
    return [value] * n


class PrivacySafeguardHandler:
    """Judge the generated images of each iteration with a :class:`PrivacySafeguard` and keep count.

    Attach it to a MONAI ``Evaluator`` (or any ignite engine) whose output holds generated model-space images.
    The same records as :func:`monai_synth.privacy.sampling.guarded_sample` are accumulated, so
    :func:`monai_synth.privacy.certificate.write_certificate` works on either. Each output item is also marked
    with ``flag_key`` (True/False) so a downstream saver can write only the released images, and at the end of
    every epoch the counts go to ``engine.state.metrics`` (``privacy_released``, ``privacy_rejected``,
    ``privacy_rejection_rate``) where MONAI's stats/MLflow handlers pick them up.

    Args:
        safeguard: the safeguard.
        key: key of the generated images in ``engine.state.output`` (a dict, or a list of dicts once decollated).
        output_transform: alternatively, ``engine.state.output -> (B, C, *spatial)`` images; overrides ``key``.
        condition_key: key in ``engine.state.batch`` holding each image's condition (e.g. ``"label"``).
        seed_key: key in ``engine.state.batch`` holding each image's seed, if the sampler records one.
        flag_key: key written into the output items (None: do not write).
        keep_images: keep released images in :attr:`images` (turn off for long runs that save as they go).
        name: logger name.
    """

    def __init__(
        self,
        safeguard: PrivacySafeguard,
        key: str = "pred",
        output_transform: Callable[[Any], Any] | None = None,
        condition_key: str | None = None,
        seed_key: str | None = None,
        flag_key: str | None = "privacy_passed",
        keep_images: bool = True,
        name: str | None = None,
    ) -> None:
        if not isinstance(safeguard, PrivacySafeguard):
            raise ValueError(f"safeguard must be a PrivacySafeguard, got {type(safeguard).__name__}")
        self.safeguard = safeguard
        self.key = key
        self.output_transform = output_transform
        self.condition_key = condition_key
        self.seed_key = seed_key
        self.flag_key = flag_key
        self.keep_images = keep_images
        self.logger = logging.getLogger(name or __name__)
        self.records: list[SampleRecord] = []
        self.images: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        """Run on every iteration; reset at the start of a run; publish counts after every epoch."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget previous records and images."""
        self.records, self.images = [], []

    def _images(self, output: Any) -> Any:
        if self.output_transform is not None:
            return self.output_transform(output)
        images = _pick(output, self.key)
        if images is None or (isinstance(images, list) and any(i is None for i in images)):
            raise KeyError(
                f"no {self.key!r} in the engine output; set key= or output_transform= to where the images are"
            )
        if isinstance(images, (list, tuple)):
            images = torch.stack([torch.as_tensor(i) for i in images])
        return images

    def __call__(self, engine: Engine) -> None:
        """Check this iteration's images and record the outcome."""
        images = self._images(engine.state.output)
        results = self.safeguard.check(images)
        n = len(results)
        batch = engine.state.batch
        conditions = _as_list(_pick(batch, self.condition_key) if self.condition_key else None, n)
        seeds = _as_list(_pick(batch, self.seed_key) if self.seed_key else None, n)
        for i, res in enumerate(results):
            seed = seeds[i]
            self.records.append(
                SampleRecord.from_result(
                    res,
                    condition=conditions[i],
                    seed=None if seed is None else int(seed),
                    batch_index=i,
                    attempt=0,
                    guidance=None,
                    source=f"iteration {engine.state.iteration}",
                )
            )
            if res.passed and self.keep_images:
                self.images.append(torch.as_tensor(images[i]).detach().cpu())
        self._flag(engine.state.output, [r.passed for r in results])

    def _flag(self, output: Any, passed: Sequence[bool]) -> None:
        if self.flag_key is None:
            return
        if isinstance(output, dict):
            output[self.flag_key] = list(passed)
        elif (
            isinstance(output, (list, tuple))
            and len(output) == len(passed)
            and all(isinstance(o, dict) for o in output)
        ):
            for item, ok in zip(output, passed):
                item[self.flag_key] = ok

    def summary(self) -> dict:
        """generated / rejected / released / rejection_rate / extra_sampling_cost so far."""
        return summarise_records(self.records)

    @property
    def released_records(self) -> list[SampleRecord]:
        """Records of the released images (aligned with :attr:`images` when ``keep_images``)."""
        return [r for r in self.records if r.passed]

    def _publish(self, engine: Engine) -> None:
        s = self.summary()
        engine.state.metrics.update(
            {
                "privacy_released": s["released"],
                "privacy_rejected": s["rejected"],
                "privacy_rejection_rate": s["rejection_rate"],
            }
        )
        self.logger.info(
            f"privacy safeguard: released {s['released']} of {s['generated']} generated images "
            f"({s['rejected']} rejected: {s['rejection_reasons']})"
        )
