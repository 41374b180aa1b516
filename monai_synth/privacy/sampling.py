"""Guarded sampling: generate, check with the privacy safeguard, resample what is rejected, count what never passes.

The generator is any callable ``generate(n, seed, condition) -> (n, C, *spatial)`` model-space tensor, e.g. a
plain loop around MONAI's ``DiffusionInferer.sample`` / ``LatentDiffusionInferer.sample``::

    def generate(n, seed, condition, guidance_scale=3.0):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *latent_shape), generator=g)
        ctx = torch.full((n, 1, 1), float(condition))
        return inferer.sample(noise, diffusion_model=model, scheduler=scheduler, conditioning=ctx,
                              cfg=guidance_scale, autoencoder_model=autoencoder)

A rejected image is replaced by a fresh one from a new seed. Lower classifier-free guidance often trades a
little fidelity for diversity (strong guidance is associated with memorisation), so with ``guidance_scale`` and
``guidance_decay`` every retry uses ``guidance_scale * guidance_decay ** attempt``; the generator then has to accept a
``guidance_scale`` keyword (as :class:`monai_synth.engines.sampler.LatentSampler` does).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from monai_synth.privacy.safeguard import PrivacySafeguard, SafeguardResult

if TYPE_CHECKING:
    from monai_synth.engines.sampler import Generator

__all__ = ["SampleRecord", "GuardedSamplingResult", "guarded_sample", "summarise_records"]


@dataclass
class SampleRecord:
    """One generated image and what the safeguard said about it (the certificate's row).

    Attributes:
        condition: the requested condition (label, or whatever the generator takes).
        seed: seed of the generator call that made the image (None if unknown, e.g. an external candidate).
        batch_index: position of the image in that call's output (image = generate(n, seed, ...)[batch_index]).
        attempt: 0 for the first try, k for the k-th resample of the request.
        guidance: guidance scale used (None if left to the generator).
        passed, distances, thresholds, reason: from :class:`SafeguardResult`.
        source: where the image came from (candidate file name for external generators).
        file: path of the released image in the release folder, set when it is written.
        nearest_patients: PRIVATE, for the audit file only.
    """

    condition: Any
    seed: int | None
    batch_index: int
    attempt: int
    guidance: float | None
    passed: bool
    distances: dict[str, float]
    thresholds: dict[str, float]
    reason: str | None = None
    source: str | None = None
    file: str | None = None
    nearest_patients: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_result(cls, result: SafeguardResult, **kwargs: Any) -> SampleRecord:
        """Record for an image judged by the safeguard."""
        return cls(
            passed=result.passed,
            distances=dict(result.distances),
            thresholds=dict(result.thresholds),
            reason=result.reason,
            nearest_patients=dict(result.nearest_patients),
            **kwargs,
        )


def summarise_records(records: Sequence[SampleRecord], requested: int | None = None) -> dict:
    """Counts for a certificate: generated, rejected, released, rejection_rate, extra_sampling_cost, reasons.

    ``extra_sampling_cost = generated / released - 1``: the fraction of additional generator calls the safeguard
    cost (0 when nothing was rejected; infinite if nothing was released).
    """
    generated = len(records)
    released = sum(r.passed for r in records)
    rejected = generated - released
    reasons = Counter(r.reason.split(" (")[0] for r in records if not r.passed and r.reason)
    summary = {
        "generated": generated,
        "rejected": rejected,
        "released": released,
        "rejection_rate": rejected / generated if generated else 0.0,
        "extra_sampling_cost": (generated / released - 1.0) if released else float("inf"),
        "rejection_reasons": dict(reasons),
    }
    if requested is not None:
        summary["requested"] = int(requested)
        summary["unreleased"] = int(requested) - released
    return summary


@dataclass
class GuardedSamplingResult:
    """Released images and the record of every generated image.

    Attributes:
        images: released model-space images ``(C, *spatial)``, in the order of ``released_records``.
        records: every generated image, released or not.
        requested: images asked for in total.
    """

    images: list[torch.Tensor]
    records: list[SampleRecord]
    requested: int

    @property
    def released_records(self) -> list[SampleRecord]:
        """Records of the released images, aligned with :attr:`images`."""
        return [r for r in self.records if r.passed]

    def summary(self) -> dict:
        """See :func:`summarise_records`; ``unreleased`` = requested images that never passed."""
        return summarise_records(self.records, self.requested)


def _judge(safeguard: PrivacySafeguard, batch: Any, encoder: Any | None) -> tuple[list, list[SafeguardResult]]:
    """The images to keep and their verdicts; with an encoder, the stored arrays (an image that cannot be stored
    fails closed with the reason)."""
    if encoder is None:
        return [torch.as_tensor(batch[i]).detach().cpu() for i in range(batch.shape[0])], safeguard.check(batch)
    kept: list = [None] * batch.shape[0]
    results: list = [None] * batch.shape[0]
    for i in range(batch.shape[0]):
        try:
            kept[i] = encoder.store_generated(batch[i])
        except Exception as err:
            results[i] = SafeguardResult(
                False, dict.fromkeys(safeguard.thresholds, float("nan")), dict(safeguard.thresholds),
                f"cannot be stored for release: {err}",
            )  # fmt: skip
    ok = [i for i in range(len(kept)) if results[i] is None]
    for i, res in zip(ok, encoder.judge(safeguard, [kept[i] for i in ok])):
        results[i] = res
    return kept, results


def guarded_sample(
    generate: Generator,
    safeguard: PrivacySafeguard,
    requests: Sequence[tuple[Any, int]],
    max_retries: int = 4,
    seed: int = 0,
    guidance_scale: float | None = None,
    guidance_decay: float | None = None,
    max_batch: int | None = None,
    encoder: Any | None = None,
) -> GuardedSamplingResult:
    """Generate the requested images, releasing only those the safeguard passes.

    For each ``(condition, count)`` request the generator is called for all images still needed; rejected ones
    are regenerated with a new seed up to ``max_retries`` more times. Images that never pass are not released and
    show up as ``unreleased`` in the summary. Seeds are ``seed, seed + 1, ...`` in call order, so a run is
    reproducible and each record says how to regenerate its image.

    Args:
        generate: a :class:`~monai_synth.engines.sampler.Generator`, ``generate(n, seed, condition, **guidance)`` ->
            ``(n, C, *spatial)`` model-space images; ``guidance_scale=`` is passed when given.
        safeguard: the :class:`PrivacySafeguard`.
        requests: ``(condition, count)`` pairs.
        max_retries: resampling rounds after the first attempt.
        seed: first seed.
        guidance_scale: guidance scale of the first attempt, passed as ``guidance_scale=`` (None: not passed, the
            generator's default applies).
        guidance_decay: factor in (0, 1] applied to the guidance scale at every retry (needs ``guidance_scale``).
        max_batch: most images per generator call (default: all still needed).
        encoder: a :class:`~monai_synth.privacy.release.ReleaseEncoder`: each generated image is first turned into
            the array its release file will hold, that array is judged (through the encoder's views) and kept as the
            released image, so what is released is exactly what was judged. ``None``: the model-space images are
            judged and kept as they are.

    Raises:
        ValueError: bad arguments, or a generator that returns the wrong number of images.
    """
    if not isinstance(safeguard, PrivacySafeguard):
        raise ValueError(f"safeguard must be a PrivacySafeguard, got {type(safeguard).__name__}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if guidance_decay is not None:
        if guidance_scale is None:
            raise ValueError("guidance_decay needs the starting guidance_scale=; give both or neither")
        if not 0.0 < guidance_decay <= 1.0:
            raise ValueError(f"guidance_decay must be in (0, 1], got {guidance_decay}")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    requests = [(cond, int(count)) for cond, count in requests]
    if any(count < 0 for _, count in requests):
        raise ValueError(f"request counts must be >= 0, got {[c for _, c in requests]}")

    images: list[torch.Tensor] = []
    records: list[SampleRecord] = []
    call_seed = int(seed)
    for condition, count in requests:
        needed = count
        for attempt in range(max_retries + 1):
            if needed == 0:
                break
            g = None if guidance_scale is None else guidance_scale * (guidance_decay or 1.0) ** attempt
            while_needed = needed
            while while_needed > 0:
                n = while_needed if max_batch is None else min(max_batch, while_needed)
                kwargs = {} if g is None else {"guidance_scale": g}
                with torch.no_grad():
                    try:
                        batch = generate(n, call_seed, condition, **kwargs)
                    except TypeError as err:
                        if kwargs and "guidance_scale" in str(err):
                            raise ValueError(
                                "guidance_scale was given but generate() has no 'guidance_scale' keyword argument (the "
                                "Generator protocol passes guidance overrides as keywords); add one or drop it"
                            ) from err
                        raise
                if not hasattr(batch, "shape") or batch.shape[0] != n:
                    raise ValueError(
                        f"generate({n}, ...) returned {getattr(batch, 'shape', type(batch))}, not {n} images"
                    )
                kept, results = _judge(safeguard, batch, encoder)
                for i, res in enumerate(results):
                    rec = SampleRecord.from_result(
                        res, condition=condition, seed=call_seed, batch_index=i, attempt=attempt, guidance=g
                    )
                    records.append(rec)
                    if res.passed:
                        images.append(kept[i])
                        needed -= 1
                call_seed += 1
                while_needed -= n
    return GuardedSamplingResult(images=images, records=records, requested=sum(c for _, c in requests))
