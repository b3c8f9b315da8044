"""Loggers: they run on the driver only, fed by the metrics the loop (or the workers) report.

``Logger`` is the base class to subclass (0.9 name ``LightningLoggerBase``);
``TensorBoardLogger`` (the ``logger=True`` default) and ``CSVLogger`` write under
``save_dir/name/version_N``.
"""

from ray_lit.loggers.base import LightningLoggerBase, Logger
from ray_lit.loggers.csv_logs import CSVLogger
from ray_lit.loggers.tensorboard import TensorBoardLogger

__all__ = ["CSVLogger", "LightningLoggerBase", "Logger", "TensorBoardLogger"]
