"""Checkpoints that can be trusted: written atomically, tagged with what they were trained on, and resumable exactly.

MONAI's :class:`~monai.handlers.CheckpointSaver` writes with ``atomic=False`` (a workaround for an old Ignite
permission issue that Ignite >= 0.4.x fixed by adding group/other read bits after the rename), so a crash during
``torch.save`` can leave a truncated file with the final checkpoint's name. :class:`AtomicCheckpointSaver` restores
Ignite's write-to-temporary-then-rename behaviour. :class:`CheckpointMetadata` travels inside every checkpoint so that a
checkpoint from another bundle, modality, label set or image size is refused with a message instead of silently
producing garbage. :class:`IterationSeedHandler` reseeds torch from the iteration number so that a resumed run draws the
same noise, timesteps and condition dropout as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from monai_synth.atomic import atomic_file

__all__ = [
    "AtomicCheckpointSaver",
    "CheckpointMetadata",
    "CheckpointMismatchError",
    "IterationSeedHandler",
    "checkpoint_fingerprint",
    "load_checkpoint",
    "atomic_torch_save",
]


class CheckpointMismatchError(ValueError):
    """A checkpoint exists but was trained for something else (bundle, modality, labels, image size, stage)."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary sibling file, then ``os.replace`` it onto ``path``.

    A reader therefore sees either the previous complete file or the new complete file, never a partial one.

    Returns:
        The destination path.
    """
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return path


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file's bytes, used to tie derived artefacts (latent caches, releases) to it.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; train or point to the right stage first")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    return value


class CheckpointMetadata:
    """What a checkpoint was trained for; put it in ``save_dict`` (and ``load_dict``) under ``"metadata"``.

    Loading it (``load_state_dict``, called by MONAI's ``CheckpointLoader`` at ``Events.STARTED``, i.e. before any
    iteration) does not overwrite anything: it compares the stored values with this object's and raises
    :class:`CheckpointMismatchError` listing every difference. Only fields set on *both* sides are compared, so a
    stage-2 run can check just ``bundle``/``modality``/``labels``/``spatial_size`` of an autoencoder checkpoint.

    Args:
        bundle: bundle name, e.g. ``"breast_us_ldit"``.
        modality: modality key from :mod:`monai_synth.data.modalities`.
        labels: ordered class names the network was conditioned on (order defines the class ids).
        spatial_size: image spatial size in model space.
        stage: ``"autoencoder"`` or ``"diffusion"``; compared only when both sides set it.
        extra: further JSON-like values to store and compare (e.g. ``{"latent_channels": 3}``).
    """

    FIELDS = ("bundle", "modality", "labels", "spatial_size", "stage")

    def __init__(
        self,
        bundle: str | None = None,
        modality: str | None = None,
        labels: Sequence[str] | None = None,
        spatial_size: int | Sequence[int] | None = None,
        stage: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(spatial_size, int):
            spatial_size = [spatial_size]
        self.values: dict[str, Any] = {
            "bundle": bundle,
            "modality": None if modality is None else str(modality).lower(),
            "labels": None if labels is None else [str(v) for v in labels],
            "spatial_size": None if spatial_size is None else [int(s) for s in spatial_size],
            "stage": stage,
        }
        for k, v in (extra or {}).items():
            self.values[str(k)] = _normalise(v)

    def state_dict(self) -> dict[str, Any]:
        """Plain python values only, so MONAI's ``torch.load(weights_only=True)`` can read them back."""
        return {k: v for k, v in self.values.items() if v is not None}

    def check(self, stored: Mapping[str, Any], source: str = "checkpoint", ignore: Sequence[str] = ()) -> None:
        """Raise :class:`CheckpointMismatchError` if ``stored`` disagrees with this object's values.

        Args:
            stored: metadata read from a checkpoint.
            source: how to name the checkpoint in the message (usually its path).
            ignore: fields not to compare (e.g. ``("stage",)`` when reading an autoencoder for stage 2).
        """
        problems = []
        for key, expected in self.values.items():
            if key in ignore or expected is None or stored.get(key) is None:
                continue
            found = _normalise(stored[key])
            if key == "spatial_size" and len(found) != len(expected) and 1 in (len(found), len(expected)):
                # an int spatial size means the same size along every axis
                n = max(len(found), len(expected))
                found, expected = found * (n // len(found)), expected * (n // len(expected))
            if found != expected:
                problems.append(f"{key}: checkpoint has {found!r}, this run expects {expected!r}")
        if problems:
            data = ""
            if any(p.startswith("training_split:") for p in problems):
                data = (
                    " The training split differs (another datalist, split seed or fractions, or changed image files): "
                    "resume, continue or release only on the data the models were trained on."
                )
            raise CheckpointMismatchError(
                f"{source} was trained for something else ({'; '.join(problems)}). Point the config at a checkpoint "
                f"of this bundle/modality or retrain this stage.{data}"
            )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Compare (never overwrite): see :meth:`check`."""
        self.check(state_dict)


def load_checkpoint(
    path: str | os.PathLike,
    load_dict: Mapping[str, Any] | None = None,
    metadata: CheckpointMetadata | None = None,
    ignore: Sequence[str] = ("stage",),
    map_location: str | torch.device | None = "cpu",
    strict: bool = True,
) -> dict[str, Any]:
    """Read a checkpoint eagerly (e.g. at config instantiation, before any training) and check it.

    Args:
        path: checkpoint written by :class:`AtomicCheckpointSaver` / MONAI ``CheckpointSaver``.
        load_dict: objects with ``load_state_dict`` to fill, keyed as in the checkpoint (e.g.
            ``{"autoencoder": net, "scale_factor": sf}``). Missing keys raise ``KeyError`` naming what is there.
        metadata: expected metadata, compared with the checkpoint's ``"metadata"`` entry.
        ignore: metadata fields not to compare.
        map_location: passed to ``torch.load``.
        strict: passed to ``nn.Module.load_state_dict``.

    Returns:
        The raw checkpoint dict.

    Raises:
        FileNotFoundError: the checkpoint is missing (e.g. stage 2 started before stage 1 finished).
        CheckpointMismatchError: the checkpoint's metadata disagrees with ``metadata``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist. If this is the autoencoder checkpoint, run the autoencoder "
            "stage (train_autoencoder.yaml) first or set the config's checkpoint path to where it was saved."
        )
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if metadata is not None:
        if "metadata" not in ckpt:
            raise CheckpointMismatchError(
                f"{str(path)!r} carries no 'metadata' entry, so it cannot be checked against this bundle; "
                "it was not written by a monai_synth bundle"
            )
        metadata.check(ckpt["metadata"], source=repr(str(path)), ignore=ignore)
    for key, obj in (load_dict or {}).items():
        if key not in ckpt:
            raise KeyError(f"{str(path)!r} has no {key!r} entry; it holds {sorted(ckpt)}")
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(ckpt[key], strict=strict)
        else:
            obj.load_state_dict(ckpt[key])
    return ckpt


class _AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver(atomic=True)`` that removes superseded files only *after* the new one is safely written.

    Ignite's ``Checkpoint`` and MONAI's ``CheckpointSaver`` delete the previous file before saving the next one, so
    a crash during the save would leave no checkpoint at all; here deletions are queued and carried out after the
    next successful write (a fixed filename is simply replaced atomically).
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        pending, self._pending = self._pending, []
        for old in pending:
            if old != filename and (self.dirname / old).exists():
                super().remove(old)

    def remove(self, filename: str) -> None:
        self._pending.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI :class:`~monai.handlers.CheckpointSaver` whose files are written atomically.

    Same arguments as MONAI's class. Each file is written to a temporary file in ``save_dir`` and renamed over the
    destination (Ignite ``DiskSaver(atomic=True)``; Ignite adds group/other read permission after the rename, which is
    why MONAI's reason for ``atomic=False`` no longer applies), and a superseded checkpoint is deleted only after its
    successor is complete. An interrupted write therefore never leaves a truncated checkpoint, nor no checkpoint.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename=fixed)
        self._in_iteration = False

    def attach(self, engine: Engine) -> None:
        from monai_synth.engines.resume import remove_leftovers

        remove_leftovers(self.save_dir)  # temporary files of a killed run's checkpoint writes
        super().attach(engine)
        engine.add_event_handler(Events.ITERATION_STARTED, self._set_in_iteration, True)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._set_in_iteration, False)
        if self._final_checkpoint is not None:
            self._handle_exceptions_first(engine)

    def _handle_exceptions_first(self, engine: Engine) -> None:
        """Run this saver's ``EXCEPTION_RAISED`` handler before any other.

        Ignite stops at the first ``EXCEPTION_RAISED`` handler that re-raises, and MONAI's ``StatsHandler`` (attached
        with the trainer, before this saver) re-raises at once: Ctrl-C would save nothing. Ignite has no public way
        to order handlers, so this one is moved to the front of the engine's handler list.
        """
        handlers = engine._event_handlers.get(Events.EXCEPTION_RAISED, [])
        ours = [h for h in handlers if getattr(h[0], "__self__", None) is self]
        engine._event_handlers[Events.EXCEPTION_RAISED] = ours + [h for h in handlers if h not in ours]

    def _set_in_iteration(self, engine: Engine, value: bool) -> None:
        self._in_iteration = value

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        self._remove_stale_intervals()

    def _remove_stale_intervals(self) -> None:
        """Keep only this run's ``n_saved`` interval checkpoints in ``save_dir``.

        A resumed run's Ignite ``Checkpoint`` knows only the files it wrote itself, so the checkpoint it resumed
        from (a killed run's, gigabytes at real sizes) stayed forever. Once a newer checkpoint is safely written,
        interval checkpoints of the same name pattern that this run does not keep are deleted.
        """
        checkpoint = self._interval_checkpoint
        if checkpoint is None or checkpoint.n_saved is None or checkpoint.last_checkpoint is None:
            return
        newest = os.path.basename(str(checkpoint.last_checkpoint))
        pattern = re.compile("^" + re.sub(r"(epoch|iteration)=\d+", r"\1=\\d+", re.escape(newest)) + "$")
        keep = {os.path.basename(str(item.filename)) for item in checkpoint._saved}
        for path in Path(self.save_dir).iterdir():
            if path.is_file() and path.name not in keep and pattern.match(path.name):
                path.unlink(missing_ok=True)

    def exception_raised(self, engine: Engine, e: BaseException) -> None:
        """Save a resumable checkpoint on an exception (e.g. Ctrl-C), then re-raise it.

        With interval checkpoints the state is saved as one of them (``checkpoint_epoch=N.pt`` for the epoch that was
        interrupted), so re-running the stage resumes from it; the final file (``final_filename``) is kept for a
        finished stage, which the next stage takes it for. Without interval checkpoints the final file is written,
        as MONAI does.

        Ignite has already counted an iteration that was interrupted part-way, so a checkpoint saved as MONAI does
        would make the resumed run skip it. The interrupted iteration is not counted in the checkpoint instead: at
        worst (interrupted after the optimiser step) it is repeated on resume, it is never lost.
        """
        in_iteration = self._in_iteration
        if in_iteration:
            engine.state.iteration -= 1
        try:
            if self._interval_checkpoint is None:
                super().exception_raised(engine, e)
                return
            self._interval_checkpoint(engine)
            self._remove_stale_intervals()
            saved = self._interval_checkpoint.last_checkpoint
            engine.logger.info(f"{type(e).__name__} raised; saved a resumable checkpoint: {saved}")
        finally:
            if in_iteration:
                engine.state.iteration += 1
        raise e


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
