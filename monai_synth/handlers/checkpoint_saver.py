"""MONAI's ``CheckpointSaver`` with atomic writes, so an interrupted save never leaves a truncated checkpoint.

MONAI's :class:`~monai.handlers.CheckpointSaver` writes with ``atomic=False`` (a workaround for an old Ignite
permission issue that Ignite >= 0.4.x fixed by adding group/other read bits after the rename), so a crash during
``torch.save`` can leave a truncated file with the final checkpoint's name. :class:`AtomicCheckpointSaver` restores
Ignite's write-to-temporary-then-rename behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver"]


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
        super().attach(engine)
        engine.add_event_handler(Events.ITERATION_STARTED, self._set_in_iteration, True)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._set_in_iteration, False)

    def _set_in_iteration(self, engine: Engine, value: bool) -> None:
        self._in_iteration = value

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """Save the final checkpoint on an exception (e.g. Ctrl-C), then re-raise it.

        Ignite has already counted an iteration that was interrupted part-way, so a checkpoint saved as MONAI does
        would make the resumed run skip it. The interrupted iteration is not counted in the checkpoint instead: at
        worst (interrupted after the optimiser step) it is repeated on resume, it is never lost.
        """
        if not self._in_iteration:
            super().exception_raised(engine, e)
            return
        engine.state.iteration -= 1
        try:
            super().exception_raised(engine, e)
        finally:
            engine.state.iteration += 1
