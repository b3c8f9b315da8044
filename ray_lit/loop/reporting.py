"""Where the loop's metrics and progress go.

The loop never calls loggers or the progress bar directly: it calls an ``EventSink``. In
process (``num_workers=0``) the sink is ``DriverSink``, which feeds the loggers and the progress
bar at once. In a Ray worker, rank 0's sink records the same calls as events that the driver
drains in batches and replays into its own ``DriverSink``; other ranks use ``NullSink``. So
loggers and one progress bar always live in the driver process.
"""

from __future__ import annotations

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

    def wants_progress(self, n_done: int) -> bool:
        """Whether the loop should compute the progress-bar metrics for this batch."""
        return False


class NullSink(EventSink):
    """Ranks other than 0: nothing to report."""


class DriverSink(EventSink):
    """Feeds the driver's loggers and progress bar."""

    def __init__(self, loggers: list[Any], progress_bar: Any = None,
                 report_fn: Any = None) -> None:
        self.loggers = loggers
        self.report_fn = report_fn
        self.progress_bar = progress_bar if progress_bar is not None and getattr(
            progress_bar, "is_enabled", True) else None
        self._refresh = max(1, int(getattr(progress_bar, "refresh_rate", 1) or 1))

    def run_start(self, stage: str) -> None:
        if self.progress_bar is not None:
            self.progress_bar.on_run_start(stage)

    def run_end(self) -> None:
        if self.progress_bar is not None:
            self.progress_bar.on_run_end()

    def progress_start(self, stage: str, total: int | None, epoch: int,
                       max_epochs: int | None) -> None:
        if self.progress_bar is not None:
            self.progress_bar.start_stage(stage, total, epoch, max_epochs)

    def progress_update(self, stage: str, n_done: int, metrics: dict[str, Any]) -> None:
        if self.progress_bar is not None:
            self.progress_bar.update(stage, n_done, metrics)

    def progress_end(self, stage: str) -> None:
        if self.progress_bar is not None:
            self.progress_bar.end_stage(stage)

    def wants_progress(self, n_done: int) -> bool:
        return self.progress_bar is not None and n_done % self._refresh == 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            agg = getattr(logger, "agg_and_log_metrics", None)
            (agg or logger.log_metrics)(dict(metrics), step)

    def log_hyperparams(self, params: Any) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(params)

    def print(self, text: str) -> None:
        print(text)

    def report(self, metrics: dict[str, float], checkpoint_uri: str) -> None:
        """A Tune report from the loop (``ray_lit.tune``): runs in the trial's driver."""
        if self.report_fn is not None:
            self.report_fn(metrics, checkpoint_uri)

    def finalize(self, status: str) -> None:
        for logger in self.loggers:
            save = getattr(logger, "save", None)
            if save is not None:
                save()
            finalize = getattr(logger, "finalize", None)
            if finalize is not None:
                finalize(status)


class RecordingSink(EventSink):
    """Rank 0 of a Ray worker group: records calls as events for the driver to replay.

    Progress updates are throttled by time (``progress_interval_s``) so a fast loop does not
    flood the driver; every other event is kept in order.
    """

    def __init__(self, progress_interval_s: float = 0.5) -> None:
        self.events: list[tuple[str, tuple]] = []
        self.progress_interval_s = progress_interval_s
        self._last_progress = 0.0

    def _add(self, kind: str, *args: Any) -> None:
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

    def drain(self) -> list[tuple[str, tuple]]:
        events, self.events = self.events, []
        return events


def replay(events: list[tuple[str, tuple]], sink: EventSink) -> None:
    """Replay recorded events into a driver-side sink, in order."""
    for kind, args in events:
        getattr(sink, kind)(*args)
