"""The driver's end of the metric stream: loggers and the one progress bar.

Rank 0 of a worker group records the loop's calls as events (``loop.reporting.RecordingSink``);
the controller drains them with each poll and replays them (``replay``) into a ``DriverSink``. In
process (``num_workers=0``) the loop calls the ``DriverSink`` directly.
"""

from __future__ import annotations

import warnings
from typing import Any

import cloudpickle

from ray_lit.loggers.base import flush_pending, log_now
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
            # each call reaches log_metrics now, not when the step changes (0.9)
            log_now(logger, dict(metrics), step)

    def log_hyperparams(self, params: Any) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(params)

    def print(self, text: str) -> None:
        print(text)

    def report(self, metrics: dict[str, float], checkpoint_uri: str) -> None:
        """A Tune report from the loop (``ray_lit.tune``): runs in the trial's driver."""
        if self.report_fn is not None:
            self.report_fn(metrics, checkpoint_uri)

    def experiment_call(self, logger_index: int, call: bytes) -> None:
        """Apply a ``logger.experiment.<method>(...)`` call made in rank 0 of the workers
        (``worker.logger_proxy.ExperimentProxy``) to this logger's real experiment.

        A call that fails here is reported as a warning, not raised: it ran long ago in the
        worker, and one bad image must not end the run from inside the driver's poll.
        """
        name, args, kwargs = cloudpickle.loads(call)
        logger = self.loggers[logger_index] if logger_index < len(self.loggers) else None
        try:
            getattr(logger.experiment, name)(*args, **kwargs)
        except Exception as err:
            warnings.warn(
                f"logger.experiment.{name}(...) called in rank 0 of the workers failed on the "
                f"driver's {type(logger).__name__}: {type(err).__name__}: {err}",
                RuntimeWarning, stacklevel=2)

    def checkpoint_saved(self, logger_index: int, saved: Any) -> None:
        """Rank 0's ``ModelCheckpoint`` saved: the logger's ``after_save_checkpoint`` gets the
        callback's snapshot (``log_model`` uploads run here, on the driver)."""
        logger = self.loggers[logger_index] if logger_index < len(self.loggers) else None
        hook = getattr(logger, "after_save_checkpoint", None)
        if hook is not None:
            hook(saved)

    def finalize(self, status: str) -> None:
        for logger in self.loggers:
            flush_pending(logger)  # the last step of a logger that merges one step's calls
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
