"""The stand-in for a driver-side logger inside the workers, and for its ``experiment``.

Loggers live on the driver. In a worker, ``trainer.loggers`` holds one ``LoggerProxy`` per driver
logger: ``log_metrics`` / ``log_hyperparams`` go into the rank's event sink, and
``logger.experiment`` is

- on global rank 0 (whose sink is a ``RecordingSink``), an ``ExperimentProxy``: each method call
  (``add_image``, ``add_histogram``, ``add_text``, ``add_figure``, ``add_scalar``, ...) is pickled
  with its arguments (tensors detached and copied to the CPU) into one event of the batched
  metric stream. The driver applies it to its real logger's ``experiment`` when it replays the
  stream (``driver.reporting.DriverSink.experiment_call``), in order with the metric events. No
  call makes a round trip of its own.
- on every other rank, a ``NoOpExperiment`` that accepts any call and does nothing, as
  Lightning's ``rank_zero_experiment`` gives the other DDP ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np
import torch

from ray_lit.loop.reporting import EventSink, RecordingSink

# attributes of a SummaryWriter that hold driver-side state (open files, buffers): a worker can
# not read them, and must not get a recording method in their place
_DRIVER_ONLY = frozenset({
    "file_writer", "all_writers", "default_bins", "scalar_dict", "purge_step", "max_queue",
    "flush_secs", "filename_suffix", "comment",
})


class LoggerProxy:
    """Stands in for a driver-side logger inside the workers: it carries the logger's name,
    version and directories (for checkpoint paths) and forwards ``log_metrics`` to the rank's
    event sink, so a callback that logs directly still reaches the driver's loggers.

    Args:
        name, version, save_dir, log_dir: the driver logger's values, read once at launch.
        index: the logger's position in the driver's ``trainer.loggers`` (where its
            experiment calls are applied).
    """

    def __init__(self, name: Any, version: Any, save_dir: Any, log_dir: Any,
                 index: int = 0) -> None:
        self.name, self.version, self.save_dir, self.log_dir = name, version, save_dir, log_dir
        self.index = index
        # set by the worker's job for this rank (``RecordingSink`` on rank 0, else ``NullSink``)
        self.sink: EventSink | None = None

    @classmethod
    def of(cls, logger: Any, index: int = 0) -> LoggerProxy:
        """The proxy of the driver's ``logger``, the ``index``-th of ``trainer.loggers``."""
        from ray_lit.loggers.model_artifacts import CheckpointStager, stages_every_checkpoint

        proxy = cls(getattr(logger, "name", None), getattr(logger, "version", None),
                    getattr(logger, "save_dir", None), getattr(logger, "log_dir", None), index)
        # log_model="all": rank 0 keeps each new checkpoint until the driver uploaded it
        proxy.stager = CheckpointStager() if stages_every_checkpoint(logger) else None
        return proxy

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

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Rank 0's ``ModelCheckpoint`` saved: its paths and scores go to the driver's logger
        (``log_model``), in order with the metrics."""
        if self.sink is not None:
            from ray_lit.loggers.model_artifacts import SavedCheckpoints

            saved = SavedCheckpoints.of(checkpoint_callback)
            stager = self.__dict__.get("stager")
            self.sink.checkpoint_saved(self.index, stager.stage(saved) if stager else saved)

    @property
    def experiment(self) -> Any:
        """Rank 0: an ``ExperimentProxy`` whose calls reach the driver logger's experiment;
        other ranks (and a proxy not attached to a rank yet): a ``NoOpExperiment``."""
        if isinstance(self.sink, RecordingSink):
            return ExperimentProxy(self)
        return NoOpExperiment()


class NoOpExperiment:
    """What ranks other than 0 get as ``logger.experiment``: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _no_op

    def __call__(self, *args: Any, **kwargs: Any) -> NoOpExperiment:
        return self

    def __getitem__(self, key: Any) -> NoOpExperiment:
        return self

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


class ExperimentProxy:
    """Rank 0's ``logger.experiment``: method calls are recorded for the driver's experiment.

    ``log_dir`` / ``logdir`` / ``get_logdir()`` give the driver logger's directory. Any other
    public attribute is taken to be a method: reading it gives a function that records the call
    (its return value is ``None``, since the driver applies it later). The few known value
    attributes of a ``SummaryWriter`` (``file_writer``, ...) raise ``AttributeError`` saying
    that they exist only on the driver.
    """

    def __init__(self, owner: LoggerProxy) -> None:
        self._owner = owner

    @property
    def log_dir(self) -> Any:
        return self._owner.log_dir

    logdir = log_dir

    def get_logdir(self) -> Any:
        return self._owner.log_dir

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in _DRIVER_ONLY:
            raise AttributeError(
                f"logger.experiment.{name} lives in the driver process (where loggers run); a "
                "Ray worker can only call the experiment's methods (add_image, add_histogram, "
                "...), which are sent to the driver with the logged metrics.")

        def record(*args: Any, **kwargs: Any) -> None:
            self._record(name, args, kwargs)

        record.__name__ = name
        return record

    def _record(self, name: str, args: tuple, kwargs: dict[str, Any]) -> None:
        if name == "add_figure":
            name, args, kwargs = _figure_as_image(args, kwargs)
        try:
            # pickled now, not when the stream is drained: the arguments are captured as they
            # are at the call (a weight tensor changes in place at the next optimizer step), an
            # unpicklable one fails here at the user's call, and the event travels as bytes
            call = cloudpickle.dumps((name, _to_cpu(args), _to_cpu(kwargs)))
        except Exception as err:
            raise TypeError(
                f"logger.experiment.{name}(...) in a Ray worker: its arguments are sent to the "
                f"driver's logger and must be picklable; {err}") from err
        sink = self._owner.sink
        if sink is not None:
            sink.experiment_call(self._owner.index, call)


def _to_cpu(value: Any) -> Any:
    """Tensors detached and copied to the CPU, NumPy arrays copied, inside lists, tuples and
    dicts (a copy even on the CPU: later in-place updates must not reach the recorded call)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _figure_as_image(args: tuple, kwargs: dict[str, Any]) -> tuple[str, tuple, dict[str, Any]]:
    """``add_figure(tag, figure, global_step=None, close=True, walltime=None)`` as the
    ``add_image`` call a SummaryWriter makes of it, rendered here: a matplotlib figure does not
    travel well (backend state), and ``close`` must close the worker's figure."""
    from tensorboardX.utils import figure_to_image

    names = ("tag", "figure", "global_step", "close", "walltime")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    figure = bound["figure"]
    image = figure_to_image(figure, bound.get("close", True))
    return "add_image", (bound["tag"], image, bound.get("global_step")), {
        "walltime": bound.get("walltime"),
        "dataformats": "NCHW" if isinstance(figure, list) else "CHW",
    }
