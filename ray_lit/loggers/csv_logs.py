"""``CSVLogger``: metrics as ``metrics.csv`` and hyperparameters as ``hparams.yaml``.

Rows are buffered in memory and appended on ``save``. The columns are the union of every key
seen; when a new key appears the file is rewritten with the wider header (as Lightning's
``ExperimentWriter``), so the file is always one valid CSV table.

A write that fails (a full disk, a read-only directory) does not end the run (``DiskGuard``):
the rows stay buffered and are written by a later ``save``, a torn append is cut off first, so
every row lands exactly once.
"""

from __future__ import annotations

import csv
import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import torch

from ray_lit.loggers.base import (
    _add_prefix,
    _convert_params,
    _FileLogger,
    _save_hparams_yaml,
)
from ray_lit.loggers.disk_faults import DiskGuard


class _ExperimentWriter:
    """Buffers metric rows for one ``metrics.csv`` and writes them out on ``save``."""

    NAME_METRICS_FILE = "metrics.csv"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self.metrics: list[dict[str, Any]] = []
        self.metrics_keys: list[str] = []
        self._header_read = False
        self.disk = DiskGuard(f"CSVLogger ({self.metrics_file_path})")

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is None:
            step = len(self.metrics)
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.item() if value.numel() == 1 else value.float().mean().item()
            row[key] = value
        self.metrics.append(row)

    def save(self, force: bool = False) -> None:
        """Append buffered rows, rewriting the file first if the header must grow. A failed
        write keeps the rows for the next ``save`` (after a pause while writes fail, unless
        ``force``)."""
        if self.metrics and (force or self.disk.ready()):
            self.disk.run(self._append, "write metrics.csv")

    def _append(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        path = self.metrics_file_path
        exists = os.path.isfile(path)
        keys = list(self.metrics_keys)
        if exists and not self._header_read:
            # a fresh writer on an existing file (resumed run, pickled copy): extend its header
            keys = _read_header(path)
        new_keys = list(dict.fromkeys(k for row in self.metrics for k in row if k not in keys))
        keys.extend(new_keys)
        if new_keys and exists:
            self._rewrite_with_header(keys)
        size = os.path.getsize(path) if exists else 0
        try:
            with open(path, "a" if exists else "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                if not exists:
                    writer.writeheader()
                writer.writerows(self.metrics)
        except OSError:
            # a full disk mid-append: cut the torn rows off, so that the retry appends them
            # whole and only once (truncating frees space; it works on a full disk)
            _truncate(path, size)
            raise
        self.metrics_keys, self._header_read, self.metrics = keys, True, []

    def _rewrite_with_header(self, keys: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        tmp = f"{self.metrics_file_path}.tmp"
        try:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.metrics_file_path)  # a reader never sees a half-written table
        except OSError:
            _truncate(tmp, None)
            raise


def _truncate(path: str, size: int | None) -> None:
    """Cut ``path`` back to ``size`` bytes (None or 0: remove it), if that is possible."""
    try:
        if size:
            os.truncate(path, size)
        else:
            os.remove(path)
    except OSError:
        pass  # the file system refuses even that: the next try finds out again


def _read_header(path: str) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


class CSVLogger(_FileLogger):
    """Log to ``save_dir/name/version_N/metrics.csv`` (plus ``hparams.yaml``).

    Args:
        save_dir: parent directory of the logs.
        name: experiment name, the directory level under ``save_dir`` ("" or None: none).
        version: int N for ``version_N``, a string used as the directory name, or None for
            the next free N.
        prefix: prepended to every metric name as ``"{prefix}-{name}"``.
        flush_logs_every_n_steps: write buffered rows when ``(step + 1)`` is a multiple of
            this (and always on ``save``/``finalize``).

    Example::

        trainer = pl.Trainer(logger=CSVLogger("logs"))
        pandas.read_csv(trainer.logger.log_dir + "/metrics.csv")
    """

    def __init__(self, save_dir: str | os.PathLike, name: str | None = "lightning_logs",
                 version: int | str | None = None, prefix: str = "",
                 flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(save_dir, name, version, prefix)
        self._flush_logs_every_n_steps = max(1, int(flush_logs_every_n_steps))
        self._experiment: _ExperimentWriter | None = None
        self._hparams_pending = False  # hparams.yaml is behind self.hparams (a failed write)

    @property
    def experiment(self) -> _ExperimentWriter:
        """The row buffer for ``metrics.csv`` (created on first use)."""
        if self._experiment is None:
            self._experiment = _ExperimentWriter(self.log_dir)
        return self._experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Buffer one row ``{step, **metrics}``; written on save or every N steps."""
        self.experiment.log_metrics(_add_prefix(metrics, self._prefix), step)
        if step is not None and (step + 1) % self._flush_logs_every_n_steps == 0:
            self.save()

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any,
                        **kwargs: Any) -> None:
        """Merge ``params`` into ``hparams.yaml`` (rewritten at once; after a failed write,
        again on ``save``)."""
        self.hparams.update(_convert_params(params))
        self._hparams_pending = True
        self._write_hparams()

    def _write_hparams(self) -> None:
        disk = self.experiment.disk
        if self._hparams_pending and disk.ready() and disk.run(self._hparams_yaml,
                                                               "write hparams.yaml"):
            self._hparams_pending = False

    def _hparams_yaml(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        _save_hparams_yaml(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), self.hparams)

    def save(self) -> None:
        """Write pending aggregated metrics and buffered rows to ``metrics.csv``."""
        super().save()
        if self._experiment is not None:
            self._experiment.save()
        if self.__dict__.get("_hparams_pending"):
            self._write_hparams()

    def finalize(self, status: str) -> None:
        """Write everything; rows held back by a pause after a failed write are tried now."""
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.save(force=True)

    def __repr__(self) -> str:
        return f"CSVLogger(save_dir={self.save_dir!r}, name={self.name!r}, " \
               f"version={self._version!r})"
