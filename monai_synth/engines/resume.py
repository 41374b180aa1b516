"""A resumed stage continues the run it resumes, never a mix of two runs, and leaves nothing of the killed one behind.

Restoring a checkpoint restores the optimiser, including its learning rate, and Ignite's epoch length: a run resumed
with another ``dit_lr`` or batch size silently kept the old ones while MLflow recorded the new ones.
:class:`TrainingParams` travels in every checkpoint with the hyper-parameters the stage trained with; on resume it
compares them with this run's and refuses any difference, naming each one, or, when asked to, applies changed learning
rates explicitly (the only change that can be applied without mixing: a batch size changes what an epoch is).

:func:`remove_leftovers` deletes what killed runs leave in output folders: Ignite's temporary checkpoint files and
``.partial`` files of :func:`monai_synth.atomic.atomic_file` (gigabytes each at real sizes).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["ResumeMismatchError", "TrainingParams", "remove_leftovers", "resume_state"]

logger = logging.getLogger(__name__)

#: Files older than this process are leftovers of an earlier run; newer ones may be a concurrent writer's.
_PROCESS_START = time.time()
#: Ignite's ``DiskSaver(atomic=True)`` writes through ``tempfile.NamedTemporaryFile(dir=...)``: ``tmp`` + 8 characters.
_IGNITE_TMP = re.compile(r"^tmp[a-z0-9_]{8}$")
_PARTIAL = re.compile(r"^\..+\.[0-9a-f]{8}\.partial$")


def _apply_flag(value: bool | str) -> bool:
    """``apply`` / ``refuse`` (or a boolean, also as command-line text); anything else is refused."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("apply", "true", "yes", "1"):
        return True
    if text in ("refuse", "false", "no", "0"):
        return False
    raise ValueError(f"--resume_changes must be 'refuse' or 'apply', got {value!r}")


class ResumeMismatchError(ValueError):
    """The checkpoint a stage resumes from was trained with other hyper-parameters than this run's."""


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value) if isinstance(value, float) else int(value)
    return str(value)


class TrainingParams:
    """The hyper-parameters a stage trains with: saved in its checkpoints, compared when a run resumes.

    Put it in the stage's ``save_dict`` / ``load_dict`` (e.g. under ``"training_params"``) and attach it to the trainer
    *after* MONAI's ``CheckpointLoader``. Loading it never overwrites this run's values: every value that differs
    from the checkpoint's is refused with :class:`ResumeMismatchError` before the first iteration, unless
    ``apply_changes`` is set and the value is a learning rate, which is then set on its optimiser once the
    checkpoint (and the optimiser's old learning rate with it) has been restored. ``max_epochs`` is not a training
    parameter here: raising it is how a run is extended.

    A learning-rate schedule restored from the checkpoint keeps the old rate as its base (``LambdaLR`` sets every
    step's rate from its saved ``base_lrs``) and would silently undo the change at the next step: an applied rate
    therefore rescales the base rates of the optimiser's schedulers given in ``lr_schedulers`` too, so training goes
    on along the same schedule (warm-up, cosine) at the new peak rate.

    Args:
        values: name -> value (JSON-like), e.g. ``{"ae_lr": 1e-4, "ae_batch_size": 16}``.
        learning_rates: name (a key of ``values``) -> the optimiser whose learning rate it is.
        apply_changes: ``False`` (or ``"refuse"``) refuses every change; ``True`` (or ``"apply"``) applies changed
            learning rates and refuses the rest.
        lr_schedulers: the learning-rate schedulers of those optimisers (each is matched to its optimiser).
    """

    def __init__(
        self,
        values: Mapping[str, Any],
        learning_rates: Mapping[str, torch.optim.Optimizer] | None = None,
        apply_changes: bool | str = False,
        lr_schedulers: Sequence[Any] = (),
    ) -> None:
        self.values = {str(k): _plain(v) for k, v in values.items()}
        self.learning_rates = dict(learning_rates or {})
        self.lr_schedulers = [s for s in lr_schedulers if s is not None]
        for scheduler in self.lr_schedulers:
            if not hasattr(scheduler, "optimizer") or not hasattr(scheduler, "base_lrs"):
                raise ValueError(f"{type(scheduler).__name__} is not a torch learning-rate scheduler")
        unknown = sorted(set(self.learning_rates) - set(self.values))
        if unknown:
            raise ValueError(f"learning_rates names {unknown}, which are not among the values {sorted(self.values)}")
        self.apply_changes = _apply_flag(apply_changes)
        self._pending: dict[str, tuple[float, float]] = {}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, stored: Mapping[str, Any]) -> None:
        """Compare with the checkpoint's values: refuse, or queue the learning rates to apply (see the class)."""
        changed = {k: (_plain(stored[k]), v) for k, v in self.values.items() if k in stored and _plain(stored[k]) != v}
        if not changed:
            return
        listed = "; ".join(f"{k}: checkpoint {old!r}, this run {new!r}" for k, (old, new) in changed.items())
        refused = [k for k in changed if not (self.apply_changes and k in self.learning_rates)]
        if refused:
            hint = ""
            if not self.apply_changes and any(k in self.learning_rates for k in changed):
                hint = " or, to change only the learning rate(s), pass --resume_changes apply"
            raise ResumeMismatchError(
                f"this run resumes a checkpoint trained with other hyper-parameters ({listed}); resuming would mix "
                "two runs. Resume with the checkpoint's values, or start a new run in another output_dir"
                f"{hint}."
            )
        self._pending = {k: (float(old), float(new)) for k, (old, new) in changed.items()}
        logger.warning(f"resuming with changed learning rate(s), applied from the next iteration on: {listed}")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.apply_pending)

    def apply_pending(self, engine: Engine | None = None) -> None:
        """Scale the restored learning rates of each optimiser, and its schedulers' base rates, from the checkpoint's
        value to this run's (after ``CheckpointLoader`` restored the old ones)."""
        for name, (old, new) in self._pending.items():
            optimizer = self.learning_rates[name]
            factor = new / old if old else None
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor if factor is not None else new
                if "initial_lr" in group:
                    group["initial_lr"] = new
            for scheduler in self.lr_schedulers:
                if scheduler.optimizer is optimizer:
                    scheduler.base_lrs = [b * factor if factor is not None else new for b in scheduler.base_lrs]
                    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        self._pending = {}


def remove_leftovers(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files that killed runs left in ``directory`` (not recursive); return their names.

    Only Ignite's ``tmpXXXXXXXX`` checkpoint files and ``.<name>.<8 hex>.partial`` files of
    :func:`monai_synth.atomic.atomic_file` are touched, and only those older than this process (a newer one may be
    another process's write in progress).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if not path.is_file() or not (_IGNITE_TMP.match(path.name) or _PARTIAL.match(path.name)):
            continue
        try:
            if path.stat().st_mtime < _PROCESS_START - 1.0:
                path.unlink()
                removed.append(path.name)
        except FileNotFoundError:
            continue
    if removed:
        logger.info(f"removed {len(removed)} leftover file(s) of an interrupted run from {directory}: {removed}")
    return removed


def resume_state(path: str | os.PathLike, state: Mapping[str, Any], metadata: Any = None) -> dict[str, Any]:
    """What a stage restores from the checkpoint it resumes (the ``load_dict`` of its ``CheckpointLoader``).

    Checked before the trainer starts: the checkpoint's metadata against ``metadata`` (a
    :class:`~monai_synth.engines.checkpoint.CheckpointMetadata`), and that it holds every entry of ``state``. A
    checkpoint written by an earlier version lacks some (``training_params``, ``mlflow_run``, a ``training_split`` in
    its metadata): it is refused saying how to go on, or, when ``metadata`` accepts legacy checkpoints, the entries it
    has are restored and the rest start fresh, with a warning.

    Args:
        path: the checkpoint to resume ("" when starting fresh: ``state`` is returned as it is).
        state: the stage's ``save_dict``.
        metadata: the stage's expected metadata (its ``legacy`` setting decides about missing entries).

    Raises:
        LegacyCheckpointError: missing entries, and legacy checkpoints are refused.
        CheckpointMismatchError: metadata that disagrees with this run's.
    """
    from monai_synth.engines.checkpoint import LEGACY_HINT, CheckpointMismatchError, LegacyCheckpointError

    if not path:
        return dict(state)
    stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "metadata" in state and "metadata" not in stored:
        raise CheckpointMismatchError(f"{str(path)!r} carries no 'metadata' entry; it was not written by this bundle")
    if metadata is not None and "metadata" in stored:
        metadata.check(stored["metadata"], source=repr(str(path)))
    missing = [k for k in state if k not in stored]
    if not missing:
        return dict(state)
    if not getattr(metadata, "accept_legacy", False):
        raise LegacyCheckpointError(
            f"{str(path)!r} was written by an earlier version of monai_synth: it has no {missing}, so this run cannot "
            f"check that it continues the same training. {LEGACY_HINT}"
        )
    logger.warning(f"resuming {path} without its {missing} (--legacy_checkpoints accept): they start afresh")
    return {k: v for k, v in state.items() if k in stored}
