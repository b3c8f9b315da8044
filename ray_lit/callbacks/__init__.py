"""Callbacks: they run where the loop runs (inside each worker when distributed); the progress
bar is the exception and runs on the driver."""

from ray_lit.callbacks.base import Callback
from ray_lit.callbacks.early_stopping import EarlyStopping
from ray_lit.callbacks.lr_monitor import LearningRateLogger, LearningRateMonitor
from ray_lit.callbacks.model_checkpoint import ModelCheckpoint
from ray_lit.callbacks.prediction_writer import BasePredictionWriter
from ray_lit.callbacks.progress import ProgressBar, TQDMProgressBar

__all__ = [
    "BasePredictionWriter",
    "Callback",
    "EarlyStopping",
    "LearningRateLogger",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ProgressBar",
    "TQDMProgressBar",
]
