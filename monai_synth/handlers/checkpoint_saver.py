"""MONAI's ``CheckpointSaver`` with atomic writes, so an interrupted save never leaves a truncated checkpoint.

MONAI's :class:`~monai.handlers.CheckpointSaver` writes with ``atomic=False`` (a workaround for an old Ignite
permission issue that Ignite >= 0.4.x fixed by adding group/other read bits after the rename), so a crash during
``torch.save`` can leave a truncated file with the final checkpoint's name. :class:`AtomicCheckpointSaver` restores
Ignite's write-to-temporary-then-rename behaviour.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
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
        self._started_at: int | None = None  # iteration at STARTED, once the resumed state is loaded
        self._completed = 0  # iterations completed since STARTED

    def attach(self, engine: Engine) -> None:
        from monai_synth.engines.resume import remove_leftovers

        remove_leftovers(self.save_dir)  # temporary files of a killed run's checkpoint writes
        super().attach(engine)
        engine.add_event_handler(Events.ITERATION_STARTED, self._set_in_iteration, True)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._set_in_iteration, False)
        engine.add_event_handler(Events.STARTED, self._note_start)
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
        self._completed += not value

    def _note_start(self, engine: Engine) -> None:
        self._started_at, self._completed = int(engine.state.iteration), 0

    def completed(self, engine: Engine) -> None:
        """Save the final checkpoint (and a resumable one of the end), unless this run trained nothing and the final
        file is already there.

        Re-running a stage that had finished resumes at its last epoch and completes at once; writing the final file
        again would change its bytes (and the fingerprint later stages and releases were tied to) for nothing.
        """
        final = Path(self.save_dir) / self._final_filename if self._final_filename else None
        trained = self._started_at is None or int(engine.state.iteration) != self._started_at
        if not trained and final is not None and final.is_file():
            engine.logger.info(f"nothing trained in this run; kept the final checkpoint {final}")
            return
        if trained and self._interval_checkpoint is not None:
            step = engine.state.epoch if self.epoch_level else engine.state.iteration
            if step % self.save_interval:
                # the last interval fell before the end: without a resumable checkpoint of the end, a re-run of the
                # finished stage would train it again from the start (and stages after it would refuse the new one)
                self.interval_completed(engine)
        super().completed(engine)

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

        Nothing is written when no iteration completed in this run: an exception while starting (a refused resume)
        must not replace the checkpoint it refused with the untrained state.

        Ignite has already counted an iteration that was interrupted part-way, so a checkpoint saved as MONAI does
        would make the resumed run skip it. The interrupted iteration is not counted in the checkpoint instead: at
        worst (interrupted after the optimiser step) it is repeated on resume, it is never lost.
        """
        if self._started_at is None or self._completed == 0:
            # raised while starting (a refused resume, a checkpoint that cannot be loaded) or before one iteration
            # finished: nothing was trained, and the engine may hold a half-restored state that must not replace the
            # checkpoint on disk
            engine.logger.info(f"{type(e).__name__} raised before any iteration completed; no checkpoint written")
            raise e
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
