"""The driver's end of the metric stream: loggers and the one progress bar.

Rank 0 of a worker group records the loop's calls as events (``loop.reporting.RecordingSink``);
the controller drains them with each poll and replays them (``replay``) into a ``DriverSink``. In
process (``num_workers=0``) the loop calls the ``DriverSink`` directly.
"""

from __future__ import annotations

from typing import Any

from ray_lit.loop.reporting import EventSink


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


def replay(events: list[tuple[str, tuple]], sink: EventSink) -> None:
    """Replay recorded events into a driver-side sink, in order."""
    for kind, args in events:
        getattr(sink, kind)(*args)
