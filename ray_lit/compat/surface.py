"""What each aliased Lightning module holds: a table from module name to ray_lit objects.

Keys are module names below the root (``""`` is ``pytorch_lightning`` itself and
``lightning.pytorch``; ``"lightning"`` is the top of the 2.x ``lightning`` package). Each entry
lists ``(ray_lit module, names)`` sources; ``"*"`` takes the module's public names. The paths are
the ones real Lightning 0.9 code and bolts 0.2.2 import, plus the 2.x spellings of the same
things.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_Source = tuple[str, "tuple[str, ...] | str"]

_MODULE = "ray_lit.core.module"
_DATA = "ray_lit.core.datamodule"
_RESULTS = "ray_lit.core.results"
_UTIL = "ray_lit.compat.utilities"
_FUNCTIONAL = "ray_lit.metrics.functional"
_RANK_ZERO = (_UTIL, ("rank_zero_only", "rank_zero_warn", "rank_zero_info",
                      "rank_zero_debug"))

_ROOT: list[_Source] = [
    (_MODULE, ("LightningModule",)),
    (_DATA, ("LightningDataModule",)),
    (_RESULTS, ("TrainResult", "EvalResult")),
    ("ray_lit.callbacks.base", ("Callback",)),
    ("ray_lit.trainer", ("Trainer",)),
    ("ray_lit.core.seed", ("seed_everything",)),
]

TREE: dict[str, list[_Source]] = {
    "": [*_ROOT, (_UTIL, ("__version__",))],
    # the 2.x top-level ``lightning`` package: the same names, plus ``lightning.pytorch``
    "lightning": [*_ROOT, (_UTIL, ("__version__",))],
    "core": [(_MODULE, ("LightningModule",)), (_DATA, ("LightningDataModule",))],
    "core.lightning": [(_MODULE, ("LightningModule",))],
    "core.module": [(_MODULE, ("LightningModule",))],
    "core.datamodule": [(_DATA, ("LightningDataModule",))],
    "core.step_result": [(_RESULTS, ("Result", "TrainResult", "EvalResult"))],
    "core.decorators": [(_UTIL, ("auto_move_data",))],
    "core.saving": [("ray_lit.core.saving", ("load_hparams_from_yaml",))],
    "callbacks": [("ray_lit.callbacks", "*")],
    "callbacks.base": [("ray_lit.callbacks.base", ("Callback",))],
    "callbacks.callback": [("ray_lit.callbacks.base", ("Callback",))],
    "callbacks.model_checkpoint": [("ray_lit.callbacks.model_checkpoint",
                                    ("ModelCheckpoint",))],
    "callbacks.early_stopping": [("ray_lit.callbacks.early_stopping", ("EarlyStopping",))],
    "callbacks.lr_logger": [("ray_lit.callbacks.lr_monitor", ("LearningRateLogger",))],
    "callbacks.lr_monitor": [("ray_lit.callbacks.lr_monitor", ("LearningRateMonitor",))],
    "callbacks.progress": [("ray_lit.callbacks.progress", ("ProgressBar", "TQDMProgressBar")),
                           ("ray_lit.callbacks.rich_progress", ("RichProgressBar",))],
    "callbacks.progress.tqdm_progress": [("ray_lit.callbacks.progress", ("TQDMProgressBar",))],
    "callbacks.progress.rich_progress": [("ray_lit.callbacks.rich_progress",
                                          ("RichProgressBar", "RichProgressBarTheme"))],
    "callbacks.model_summary": [("ray_lit.callbacks.model_summary", ("ModelSummary",))],
    "callbacks.timer": [("ray_lit.callbacks.timer", ("Timer",))],
    "callbacks.stochastic_weight_avg": [("ray_lit.callbacks.swa",
                                         ("StochasticWeightAveraging",))],
    "loggers": [("ray_lit.loggers", "*")],
    "loggers.base": [("ray_lit.loggers.base", ("Logger", "LightningLoggerBase"))],
    "loggers.logger": [("ray_lit.loggers.base", ("Logger",))],
    "loggers.tensorboard": [("ray_lit.loggers.tensorboard", ("TensorBoardLogger",))],
    "loggers.csv_logs": [("ray_lit.loggers.csv_logs", ("CSVLogger",))],
    "loggers.wandb": [("ray_lit.loggers.wandb", ("WandbLogger",))],
    "loggers.mlflow": [("ray_lit.loggers.mlflow", ("MLFlowLogger",))],
    "metrics": [],
    "metrics.functional": [(_FUNCTIONAL, "*")],
    "metrics.functional.classification": [(_FUNCTIONAL, "*")],
    "metrics.functional.regression": [(_FUNCTIONAL, ("mse", "rmse", "mae"))],
    # 0.9 re-exported the functional metrics here (bolts imports ``accuracy`` from it)
    "metrics.classification": [(_FUNCTIONAL, "*")],
    "metrics.regression": [(_FUNCTIONAL, ("mse", "rmse", "mae"))],
    # 2.x ``LightningCLI`` (jsonargparse, the ``cli`` extra, is imported when this loads)
    "cli": [("ray_lit.cli", ("LightningCLI", "LightningArgumentParser", "SaveConfigCallback"))],
    "trainer": [("ray_lit.trainer", ("Trainer",)), ("ray_lit.core.seed", ("seed_everything",))],
    "trainer.trainer": [("ray_lit.trainer", ("Trainer",))],
    "utilities": [_RANK_ZERO, ("ray_lit.core.hparams", ("AttributeDict",)),
                  (_UTIL, ("move_data_to_device", "str_to_bool")),
                  ("ray_lit.core.seed", ("seed_everything",))],
    "utilities.distributed": [_RANK_ZERO],
    "utilities.rank_zero": [_RANK_ZERO],
    "utilities.seed": [("ray_lit.core.seed", ("seed_everything",))],
    "utilities.parsing": [("ray_lit.core.hparams", ("AttributeDict",)), (_UTIL,
                                                                          ("str_to_bool",))],
    "utilities.exceptions": [("ray_lit.errors", ("MisconfigurationException",))],
    "utilities.apply_func": [(_UTIL, ("move_data_to_device",))],
}

# names a module holds besides its sources: ``pl._logger`` (0.9) and the ``utilities`` aliases
_EXTRA: dict[str, dict[str, tuple[str, str]]] = {
    "": {"_logger": (_UTIL, "log")},
    "utilities": {"rank_zero_only": (_UTIL, "rank_zero_only")},
}


def is_package(key: str) -> bool:
    """Whether ``key`` has submodules in the table (it then gets a ``__path__``)."""
    if key == "lightning":
        return True
    prefix = f"{key}." if key else ""
    return any(k != key and k.startswith(prefix) and k != "lightning" for k in TREE)


def _public(module: Any) -> tuple[str, ...]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return tuple(names)


def build(key: str, fullname: str) -> dict[str, Any]:
    """The namespace of the alias module ``fullname`` served by table entry ``key``.

    Submodules listed in the table load on first attribute access (``pl.metrics.functional``
    works after ``import pytorch_lightning as pl``, as in Lightning).
    """
    namespace: dict[str, Any] = {}
    for module_name, names in TREE[key]:
        module = importlib.import_module(module_name)
        for name in _public(module) if names == "*" else names:
            namespace[name] = getattr(module, name)
    for name, (module_name, attr) in _EXTRA.get(key, {}).items():
        namespace[name] = getattr(importlib.import_module(module_name), attr)
    namespace["__getattr__"] = _submodule_getattr(key, fullname)
    return namespace


def _children(key: str) -> set[str]:
    if key == "lightning":
        return {"pytorch"}
    prefix = f"{key}." if key else ""
    return {k[len(prefix):].split(".", 1)[0] for k in TREE
            if k.startswith(prefix) and k not in (key, "lightning")}


def _submodule_getattr(key: str, fullname: str) -> Callable[[str], Any]:
    children = _children(key)

    def __getattr__(name: str) -> Any:
        if name in children:
            return importlib.import_module(f"{fullname}.{name}")
        raise AttributeError(
            f"module {fullname!r} (ray_lit's stand-in for Lightning) has no attribute {name!r}")

    return __getattr__
