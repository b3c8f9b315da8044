"""The stand-in for a driver-side logger inside the workers."""

from __future__ import annotations

from typing import Any

from ray_lit.loop.reporting import EventSink


class LoggerProxy:
    """Stands in for a driver-side logger inside the workers: it carries the logger's name,
    version and directories (for checkpoint paths) and forwards ``log_metrics`` to the rank's
    event sink, so a callback that logs directly still reaches the driver's loggers."""

    def __init__(self, name: Any, version: Any, save_dir: Any, log_dir: Any) -> None:
        self.name, self.version, self.save_dir, self.log_dir = name, version, save_dir, log_dir
        self.sink: EventSink | None = None

    @classmethod
    def of(cls, logger: Any) -> LoggerProxy:
        return cls(getattr(logger, "name", None), getattr(logger, "version", None),
                   getattr(logger, "save_dir", None), getattr(logger, "log_dir", None))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.sink is not None:
            self.sink.log_metrics(dict(metrics), step if step is not None else 0)

    def log_hyperparams(self, params: Any) -> None:
        if self.sink is not None:
            self.sink.log_hyperparams(params)

    def agg_and_log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.log_metrics(metrics, step)

    def save(self) -> None: ...
    def finalize(self, status: str) -> None: ...

    @property
    def experiment(self) -> Any:
        raise AttributeError("logger.experiment is only available on the driver; log metrics "
                             "with self.log, which reaches the driver's loggers.")
