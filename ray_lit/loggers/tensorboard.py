"""``TensorBoardLogger``: scalars and hyperparameters as TensorBoard event files (tensorboardX).

Layout: ``save_dir/name/version_N/`` holds the event files and ``hparams.yaml``; the hparams
plugin summaries go to the same directory (not a timestamped sub-run, which is what
``SummaryWriter.add_hparams`` would do), so TensorBoard shows one run per version.
"""

from __future__ import annotations

import os
import warnings
from argparse import Namespace
from typing import Any

import torch

from ray_lit.loggers.base import _add_prefix, _FileLogger, _flatten_dict, _sanitize_params


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

    @property
    def experiment(self) -> Any:
        """The ``tensorboardX.SummaryWriter``, created (or re-created after ``finalize``) here."""
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
        writer = self.experiment
        for key, value in _add_prefix(metrics, self._prefix).items():
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

        params = self._update_hparams(params)
        if metrics is None and self._default_hp_metric:
            metrics = {"hp_metric": -1}
        if not metrics:
            # the plugin needs a metric column; the YAML alone is the record then (as Lightning)
            return
        self.log_metrics(metrics, 0)
        flat = _sanitize_params(_flatten_dict(params))
        writer = self.experiment._get_file_writer()
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
        if self._experiment is not None:
            self._experiment.flush()

    def finalize(self, status: str) -> None:
        """Flush and close the writer; a later log call opens a new event file."""
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.close()
            self._experiment = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger(save_dir={self.save_dir!r}, name={self.name!r}, " \
               f"version={self._version!r})"
