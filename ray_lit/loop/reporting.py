"""Where the loop's metrics and progress go.

The loop never calls loggers or the progress bar directly: it calls an ``EventSink``. In
process (``num_workers=0``) the sink is ``ray_lit.driver.reporting.DriverSink``, which feeds the
loggers and the progress bar at once. In a Ray worker, rank 0's sink records the same calls as
events that the driver drains in batches and replays into its own ``DriverSink``; other ranks
use ``NullSink``. So loggers and one progress bar always live in the driver process.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ray_lit.loop.outputs import floats


class EventSink:
    """The calls the loop makes about metrics and progress (no-ops here)."""

    def run_start(self, stage: str) -> None: ...
    def run_end(self) -> None: ...
    def progress_start(self, stage: str, total: int | None, epoch: int,
                       max_epochs: int | None) -> None: ...
    def progress_update(self, stage: str, n_done: int, metrics: dict[str, Any]) -> None: ...
    def progress_end(self, stage: str) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_hyperparams(self, params: Any) -> None: ...
    def print(self, text: str) -> None: ...
    def finalize(self, status: str) -> None: ...
    def report(self, metrics: dict[str, float], checkpoint_uri: str) -> None: ...
    # a call on ``logger.experiment`` made in rank 0 (``worker.logger_proxy``): the logger's
    # index in ``trainer.loggers`` and the pickled ``(method, args, kwargs)``
    def experiment_call(self, logger_index: int, call: bytes) -> None: ...
    # ``ModelCheckpoint`` saved in rank 0: the index of the logger in ``trainer.loggers`` and
    # a ``loggers.model_artifacts.SavedCheckpoints`` snapshot (``log_model`` uploads)
    def checkpoint_saved(self, logger_index: int, saved: Any) -> None: ...

    def wants_progress(self, n_done: int) -> bool:
        """Whether the loop should compute the progress-bar metrics for this batch."""
        return False


class NullSink(EventSink):
    """Ranks other than 0: nothing to report."""


class RecordingSink(EventSink):
    """Rank 0 of a Ray worker group: records calls as events for the driver to replay.

    Progress updates are throttled by time (``progress_interval_s``) so a fast loop does not
    flood the driver; every other event is kept in order.
    """

    def __init__(self, progress_interval_s: float = 0.5) -> None:
        self.events: list[tuple[str, tuple]] = []
        # the loop thread appends while the actor's poll thread drains: one lock for both, or
        # an event appended to a list already handed to the driver would be lost
        self._lock = threading.Lock()
        self.progress_interval_s = progress_interval_s
        self._last_progress = 0.0

    def _add(self, kind: str, *args: Any) -> None:
        with self._lock:
            self.events.append((kind, args))

    def run_start(self, stage: str) -> None:
        self._add("run_start", stage)

    def run_end(self) -> None:
        self._add("run_end")

    def progress_start(self, stage, total, epoch, max_epochs) -> None:
        self._add("progress_start", stage, None if total is None else int(total), epoch,
                  max_epochs)

    def progress_update(self, stage: str, n_done: int, metrics: dict[str, Any]) -> None:
        self._last_progress = time.monotonic()
        self._add("progress_update", stage, n_done, dict(metrics))

    def progress_end(self, stage: str) -> None:
        self._add("progress_end", stage)

    def wants_progress(self, n_done: int) -> bool:
        return time.monotonic() - self._last_progress >= self.progress_interval_s

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._add("log_metrics", floats(metrics), step)

    def log_hyperparams(self, params: Any) -> None:
        self._add("log_hyperparams", params)

    def print(self, text: str) -> None:
        self._add("print", text)

    def finalize(self, status: str) -> None:
        self._add("finalize", status)

    def report(self, metrics: dict[str, float], checkpoint_uri: str) -> None:
        self._add("report", dict(metrics), checkpoint_uri)

    def experiment_call(self, logger_index: int, call: bytes) -> None:
        self._add("experiment_call", logger_index, call)

    def checkpoint_saved(self, logger_index: int, saved: Any) -> None:
        self._add("checkpoint_saved", logger_index, saved)

    def drain(self) -> list[tuple[str, tuple]]:
        with self._lock:
            events, self.events = self.events, []
        return events
