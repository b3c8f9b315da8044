"""``CSVLogger``: metrics as ``metrics.csv`` and hyperparameters as ``hparams.yaml``.

Rows are buffered in memory and appended on ``save``. The columns are the union of every key
seen; when a new key appears the file is rewritten with the wider header (as Lightning's
``ExperimentWriter``), so the file is always one valid CSV table.
"""

from __future__ import annotations

import csv
import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import torch

from ray_lit.loggers.base import _add_prefix, _FileLogger


class _ExperimentWriter:
    """Buffers metric rows for one ``metrics.csv`` and writes them out on ``save``."""

    NAME_METRICS_FILE = "metrics.csv"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self.metrics: list[dict[str, Any]] = []
        self.metrics_keys: list[str] = []
        self._header_read = False

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is None:
            step = len(self.metrics)
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.item() if value.numel() == 1 else value.float().mean().item()
            row[key] = value
        self.metrics.append(row)

    def save(self) -> None:
        """Append buffered rows, rewriting the file first if the header must grow."""
        if not self.metrics:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        exists = os.path.isfile(self.metrics_file_path)
        if exists and not self._header_read:
            # a fresh writer on an existing file (resumed run, pickled copy): extend its header
            self.metrics_keys = _read_header(self.metrics_file_path)
        self._header_read = True
        new_keys = [k for row in self.metrics for k in row if k not in self.metrics_keys]
        new_keys = list(dict.fromkeys(new_keys))
        if new_keys:
            self.metrics_keys.extend(new_keys)
            if exists:
                self._rewrite_with_header()
        with open(self.metrics_file_path, "a" if exists else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            if not exists:
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics = []

    def _rewrite_with_header(self) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)  # a reader never sees a half-written table


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
        """Merge ``params`` into ``hparams.yaml`` (rewritten at once)."""
        self._update_hparams(params)

    def save(self) -> None:
        """Write pending aggregated metrics and buffered rows to ``metrics.csv``."""
        super().save()
        if self._experiment is not None:
            self._experiment.save()

    def __repr__(self) -> str:
        return f"CSVLogger(save_dir={self.save_dir!r}, name={self.name!r}, " \
               f"version={self._version!r})"
