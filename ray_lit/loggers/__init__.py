"""Loggers: they run on the driver only, fed by the metrics the loop (or the workers) report.

``Logger`` is the base class to subclass (0.9 name ``LightningLoggerBase``);
``TensorBoardLogger`` (the ``logger=True`` default) and ``CSVLogger`` write under
``save_dir/name/version_N``; ``MLFlowLogger`` and ``WandbLogger`` write to MLflow and Weights &
Biases (optional extras ``ray_lit[mlflow]``, ``ray_lit[wandb]``, imported on first use).
"""

from ray_lit.loggers.base import LightningLoggerBase, Logger
from ray_lit.loggers.csv_logs import CSVLogger
from ray_lit.loggers.mlflow import MLFlowLogger
from ray_lit.loggers.tensorboard import TensorBoardLogger
from ray_lit.loggers.wandb import WandbLogger

__all__ = ["CSVLogger", "LightningLoggerBase", "Logger", "MLFlowLogger", "TensorBoardLogger",
           "WandbLogger"]
