"""One MLflow run per training of a stage, however often it is interrupted and resumed.

MONAI's ``MLFlowHandler`` starts a new run per process and closes it only on completion: a run stopped by Ctrl-C or
an error stayed RUNNING forever, and its resume became a second, unlinked run. :class:`MLflowRunLink` travels in the
stage's checkpoints with the id of the run that wrote them; a resume continues that run (status RUNNING again,
parameters that changed recorded as ``resumed.<name>`` tags, since MLflow parameters cannot change), and an
exception ends it as KILLED (Ctrl-C) or FAILED before the checkpoint saver re-raises. Re-running a stage that had
already finished (a quickstart run again) logs into its run and uploads no artifact (checkpoint) a second time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["MLflowRunLink"]

logger = logging.getLogger(__name__)


def _mlflow_handlers(*roots: Engine) -> list[Any]:
    """MLflow handlers attached to ``engine`` and to the validator it runs (e.g. those ``--tracking mlflow`` adds).

    They are found by their start hooks; the validator through the ``validator`` of MONAI's ``ValidationHandler``.
    """
    from monai.handlers import MLFlowHandler

    found: list[Any] = []
    engines, seen = list(roots), set()
    while engines:
        current = engines.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for handlers in current._event_handlers.values():
            for handler, *_ in handlers:
                handler = getattr(handler, "__wrapped__", handler)  # Ignite wraps filtered (every=N) handlers
                owner = getattr(handler, "__self__", None)
                if isinstance(owner, MLFlowHandler) and owner not in found:
                    found.append(owner)
                validator = getattr(owner, "validator", None)
                if isinstance(validator, Engine):
                    engines.append(validator)
    return found


class MLflowRunLink:
    """Tie a stage's MLflow run to its checkpoints (put it in ``save_dict`` / ``load_dict``) and end it on errors.

    Attach it to the trainer after MONAI's ``CheckpointLoader`` and before the MLflow handler(s), so that at
    ``STARTED`` the restored run id is known and the handlers have not yet created a run.

    Args:
        handlers: the stage's ``MLFlowHandler`` objects (``None`` entries, i.e. disabled ones, are skipped); MLflow
            handlers attached to the trainer itself are found too.
        engines: other engines of the stage (e.g. its evaluator) whose MLflow handlers must log into the same run.
    """

    def __init__(self, handlers: Sequence[Any | None] = (), engines: Sequence[Engine | None] = ()) -> None:
        self.handlers = [h for h in handlers if h is not None]
        self.engines = [e for e in engines if e is not None]
        self._resumed_run_id: str | None = None
        self._engine: Engine | None = None

    def _all_handlers(self) -> list[Any]:
        found = list(self.handlers)
        roots = [e for e in (self._engine, *self.engines) if e is not None]
        found += [h for h in _mlflow_handlers(*roots) if h not in found]
        return found

    def state_dict(self) -> dict[str, str]:
        run = next((h.cur_run for h in self._all_handlers() if h.cur_run is not None), None)
        return {"run_id": "" if run is None else str(run.info.run_id)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed_run_id = str(state.get("run_id") or "") or None

    def attach(self, engine: Engine) -> None:
        from monai.handlers import MLFlowHandler

        self._engine = engine
        engine.add_event_handler(Events.STARTED, self.continue_run)
        # MLflow handlers attached with the trainer (``--tracking mlflow``) would start a new run before the
        # checkpoint is loaded: their start moves after this link's
        started = engine._event_handlers[Events.STARTED]
        trackers = [h for h in started if isinstance(getattr(h[0], "__self__", None), MLFlowHandler)]
        engine._event_handlers[Events.STARTED] = [h for h in started if h not in trackers] + trackers
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.end_run)
        # before any other exception handler: the first one that re-raises stops Ignite from calling the rest
        handlers = engine._event_handlers[Events.EXCEPTION_RAISED]
        ours = [h for h in handlers if getattr(h[0], "__self__", None) is self]
        engine._event_handlers[Events.EXCEPTION_RAISED] = ours + [h for h in handlers if h not in ours]

    def continue_run(self, engine: Engine | None = None) -> None:
        """Make every MLflow handler of the stage log into the run the restored checkpoint was written by."""
        handlers = self._all_handlers()
        if not self._resumed_run_id or not handlers:
            return
        from mlflow.exceptions import MlflowException

        client = handlers[0].client
        try:
            run = client.get_run(self._resumed_run_id)
        except MlflowException:
            logger.warning(
                f"the checkpoint's MLflow run {self._resumed_run_id} is not in this tracking store; starting a new run"
            )
            return
        client.update_run(run.info.run_id, status="RUNNING")
        logged = dict(run.data.params)
        # a re-run of a stage that had already finished trains nothing: its artifacts are in the run already
        finished = engine is not None and engine.state.max_epochs is not None
        finished = finished and engine.state.epoch >= engine.state.max_epochs
        for handler in handlers:
            handler.cur_run = run
            if finished:
                handler.artifacts = ()
            params = dict(handler.experiment_param or {})
            changed = {k: str(v) for k, v in params.items() if k in logged and logged[k] != str(v)}
            for key, value in changed.items():
                client.set_tag(run.info.run_id, f"resumed.{key}", value)
            handler.experiment_param = {k: v for k, v in params.items() if k not in logged}
        logger.info(f"resuming MLflow run {run.info.run_name} ({run.info.run_id})")

    def end_run(self, engine: Engine, e: BaseException) -> None:
        """End the run as KILLED (Ctrl-C) or FAILED; re-raise only if no other exception handler will."""
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        ended = set()
        for handler in self._all_handlers():
            run = handler.cur_run
            if run is not None and run.info.run_id not in ended:
                try:
                    handler.client.set_terminated(run.info.run_id, status)
                    ended.add(run.info.run_id)
                except Exception as err:  # tracking must never hide the exception that stopped training
                    logger.warning(f"could not mark MLflow run {run.info.run_id} {status}: {err}")
        if len(engine._event_handlers.get(Events.EXCEPTION_RAISED, [])) <= 1:
            raise e
