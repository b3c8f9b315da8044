"""Callbacks: they run where the loop runs (inside each worker when distributed); the progress
bars (``ProgressBar``, ``RichProgressBar``) are the exception and run on the driver."""

from ray_lit.callbacks.base import Callback
from ray_lit.callbacks.early_stopping import EarlyStopping
from ray_lit.callbacks.lr_monitor import LearningRateLogger, LearningRateMonitor
from ray_lit.callbacks.model_checkpoint import ModelCheckpoint
from ray_lit.callbacks.model_summary import ModelSummary
from ray_lit.callbacks.prediction_writer import BasePredictionWriter
from ray_lit.callbacks.progress import ProgressBar, TQDMProgressBar
from ray_lit.callbacks.rich_progress import RichProgressBar, RichProgressBarTheme
from ray_lit.callbacks.swa import StochasticWeightAveraging
from ray_lit.callbacks.timer import Timer

__all__ = [
    "BasePredictionWriter",
    "Callback",
    "EarlyStopping",
    "LearningRateLogger",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelSummary",
    "ProgressBar",
    "RichProgressBar",
    "RichProgressBarTheme",
    "StochasticWeightAveraging",
    "TQDMProgressBar",
    "Timer",
]
