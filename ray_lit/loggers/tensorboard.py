"""``TensorBoardLogger``: scalars and hyperparameters as TensorBoard event files (tensorboardX).

Layout: ``save_dir/name/version_N/`` holds the event files and ``hparams.yaml``; the hparams
plugin summaries go to the same directory (not a timestamped sub-run, which is what
``SummaryWriter.add_hparams`` would do), so TensorBoard shows one run per version.

A full disk or a read-only directory does not end the run (``DiskGuard``): tensorboardX
writes events in a background thread that dies on a failed write (and would then block the
next ``add_scalar`` on its full queue), so a dead writer is dropped, one warning is logged, the
scalars of that moment are lost, and a new event file is opened after a pause. ``hparams.yaml``
is written again on ``save`` after a failed write.
"""

from __future__ import annotations

import os
import warnings
from argparse import Namespace
from typing import Any

import torch

from ray_lit.loggers.base import (
    _add_prefix,
    _convert_params,
    _FileLogger,
    _flatten_dict,
    _sanitize_params,
    _save_hparams_yaml,
)
from ray_lit.loggers.disk_faults import DiskGuard


class TensorBoardLogger(_FileLogger):
    """Log to ``save_dir/name/version_N`` in TensorBoard format.

    Args:
        save_dir: parent directory of the logs.
        name: experiment name, the directory level under ``save_dir`` ("" or None: none).
        version: int N for ``version_N``, a string used as the directory name, or None for
            the next free N.
        log_graph: whether ``log_graph`` writes the model graph (uses
            ``model.example_input_array`` when no input is given).
        default_hp_metric: log a placeholder ``hp_metric=-1`` with the hyperparameters so the
            hparams tab has a metric column; log ``hp_metric`` yourself to fill it.
        prefix: prepended to every metric name as ``"{prefix}-{name}"``.
        **kwargs: passed to ``tensorboardX.SummaryWriter`` (``flush_secs``, ``max_queue``...).

    Example::

        trainer = pl.Trainer(logger=TensorBoardLogger("logs", name="mnist"))
    """

    def __init__(self, save_dir: str | os.PathLike, name: str | None = "lightning_logs",
                 version: int | str | None = None, log_graph: bool = False,
                 default_hp_metric: bool = True, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(save_dir, name, version, prefix)
        self._log_graph = log_graph
        self._default_hp_metric = default_hp_metric
        self._kwargs = kwargs
        self._experiment: Any = None
        self._writers_opened = 0
        self._hparams_pending = False  # hparams.yaml is behind self.hparams (a failed write)
        self.disk = DiskGuard(f"TensorBoardLogger ({os.fspath(save_dir)})")

    @property
    def experiment(self) -> Any:
        """The ``tensorboardX.SummaryWriter``, created (or re-created after ``finalize``, or
        after its event thread died on a failed write: a dead one would block the caller)."""
        if self._experiment is not None and not _alive(self._experiment):
            self.disk.failed(OSError("its event-writer thread stopped on a failed write"),
                             "write its event file")
            self._drop_writer()
        if self._experiment is None:
            from tensorboardX import SummaryWriter

            os.makedirs(self.log_dir, exist_ok=True)
            kwargs = dict(self._kwargs)
            # tensorboardX names event files by the second and host only: a writer reopened
            # after finalize (test() after fit()) would truncate the file of the first one
            kwargs["filename_suffix"] = \
                f".{os.getpid()}.{self._writers_opened}{kwargs.get('filename_suffix', '')}"
            self._writers_opened += 1
            self._experiment = SummaryWriter(logdir=self.log_dir, **kwargs)
        return self._experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Write each metric as a scalar at ``step`` (a dict value becomes ``add_scalars``).

        Raises:
            ValueError: a value is neither a number, a one-element tensor nor a dict.
        """
        writer = self._writer()
        for key, value in _add_prefix(metrics, self._prefix).items():
            if writer is not None and not _alive(writer):
                writer = self._writer()  # the event thread died meanwhile: never block on it
            if writer is None:
                return  # writes fail: these scalars are dropped, the run goes on
            if isinstance(value, torch.Tensor):
                value = value.item() if value.numel() == 1 else value.float().mean().item()
            if isinstance(value, dict):
                writer.add_scalars(key, value, step)
                continue
            try:
                writer.add_scalar(key, float(value), step)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"TensorBoardLogger cannot log {key}={value!r}: log a number, a one-element "
                    "tensor or a dict of numbers.") from err

    def log_hyperparams(self, params: dict[str, Any] | Namespace,
                        metrics: dict[str, float] | None = None) -> None:
        """Write ``hparams.yaml`` and the TensorBoard hparams-plugin summaries.

        Args:
            params: hyperparameters (nested dicts become ``a/b`` keys in TensorBoard; the
                YAML keeps the nesting).
            metrics: metrics to show next to them; default ``{"hp_metric": -1}`` when
                ``default_hp_metric``.
        """
        from tensorboardX.summary import hparams

        params = _convert_params(params)
        self.hparams.update(params)
        self._hparams_pending = True
        self._write_hparams()
        if metrics is None and self._default_hp_metric:
            metrics = {"hp_metric": -1}
        if not metrics:
            # the plugin needs a metric column; the YAML alone is the record then (as Lightning)
            return
        self.log_metrics(metrics, 0)
        flat = _sanitize_params(_flatten_dict(params))
        experiment = self._writer()
        if experiment is None:
            return
        writer = experiment._get_file_writer()
        for summary in hparams(flat, {k: float(v) for k, v in metrics.items()}):
            writer.add_summary(summary)

    def log_graph(self, model: torch.nn.Module, input_array: Any = None) -> None:
        """Write the model graph when the logger was built with ``log_graph=True``."""
        if not self._log_graph:
            return
        if input_array is None:
            input_array = getattr(model, "example_input_array", None)
        if input_array is None:
            warnings.warn("TensorBoardLogger(log_graph=True) needs an input: pass input_array "
                          "or set model.example_input_array.", stacklevel=2)
            return
        self.experiment.add_graph(model, input_array)

    def save(self) -> None:
        """Flush pending aggregated metrics and the writer's queue to disk."""
        super().save()
        if self.__dict__.get("_hparams_pending"):
            self._write_hparams()
        writer = self._experiment
        if writer is not None and _alive(writer):
            if not self.disk.run(writer.flush, "flush its event file"):
                self._drop_writer()
        elif writer is not None:
            self._writer()  # records the failure and drops the dead writer

    def finalize(self, status: str) -> None:
        """Flush and close the writer; a later log call opens a new event file."""
        super().finalize(status)
        if self._experiment is not None:
            self.disk.run(self._experiment.close, "close its event file")  # a failure is recorded
            self._experiment = None

    # --- disk faults ----------------------------------------------------------------------------
    def _writer(self) -> Any:
        """The writer to log to now, or None while writes fail (``DiskGuard``'s pause)."""
        disk = self.disk
        writer = self._experiment
        if writer is not None and not _alive(writer):
            disk.failed(OSError("its event-writer thread stopped on a failed write (a full "
                                "disk or a read-only directory?)"), "write its event file")
            self._drop_writer()
            writer = None
        if writer is None:
            if not disk.ready():
                return None
            try:
                writer = self.experiment
            except OSError as err:
                disk.failed(err, "open an event file")
                return None
        return writer

    def _drop_writer(self) -> None:
        writer, self._experiment = self._experiment, None
        if writer is None:
            return
        for file_writer in (writer.all_writers or {}).values():
            events = getattr(file_writer, "event_writer", None)
            try:  # release the file handle; the dead thread is not waited for
                events._closed = True
                events._ev_writer.close()
            except (AttributeError, OSError):
                pass

    def _write_hparams(self) -> None:
        if self.disk.ready() and self.disk.run(self._hparams_yaml, "write hparams.yaml"):
            self._hparams_pending = False

    def _hparams_yaml(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        _save_hparams_yaml(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), self.hparams)

    def __repr__(self) -> str:
        return f"TensorBoardLogger(save_dir={self.save_dir!r}, name={self.name!r}, " \
               f"version={self._version!r})"


def _alive(writer: Any) -> bool:
    """Whether every event-writer thread of a ``SummaryWriter`` still runs (tensorboardX
    internals, read defensively: when they cannot be read the writer counts as alive)."""
    for file_writer in (getattr(writer, "all_writers", None) or {}).values():
        events = getattr(file_writer, "event_writer", None)
        thread = getattr(events, "_worker", None)
        if thread is not None and not getattr(events, "_closed", False) and \
                not thread.is_alive():
            return False
    return True
