"""Twins: ray_lit's callbacks standing in for Lightning's built-in ones under a user's subclass.

A user's ``class MyCkpt(lightning.pytorch.callbacks.ModelCheckpoint)`` is rebased by
``ray_lit.adoption`` onto the twin of its Lightning parent: ray_lit's callback of the same name,
plus the members of Lightning's that subclasses commonly call or override with Lightning's
signature (``ModelCheckpoint.format_checkpoint_name(metrics, filename, ver, prefix)``,
``EarlyStopping._run_early_stopping_check(trainer)``, ``EarlyStopping.monitor_op``). Each twin
also reads ray_lit's constructor arguments back from the state Lightning's ``__init__`` left
on the user's instance (``arguments``), refusing the Lightning options ray_lit cannot honour.

Nothing here imports Lightning: the twins are found by the Lightning class's name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ray_lit.callbacks.early_stopping import EarlyStopping
from ray_lit.callbacks.lr_monitor import LearningRateMonitor
from ray_lit.callbacks.model_checkpoint import ModelCheckpoint
from ray_lit.callbacks.progress import ProgressBar
from ray_lit.errors import MisconfigurationException

__all__ = ["arguments", "twin_of"]


class _ModelCheckpointTwin(ModelCheckpoint):
    """ray_lit's ``ModelCheckpoint`` with Lightning's ``format_checkpoint_name`` signature."""

    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None,
                               ver: int | None = None, prefix: str | None = None) -> str:
        """Lightning's signature: ``metrics`` hold ``epoch`` and ``step``; returns the path
        under ``dirpath`` (the file name alone without one). Every rank."""
        values = dict(metrics)
        epoch, step = int(values.pop("epoch", 0)), int(values.pop("step", 0))
        template = self.filename
        self.filename = filename or template
        try:
            name = ModelCheckpoint.format_checkpoint_name(self, epoch, step, values, ver)
        finally:
            self.filename = template
        if prefix:
            name = f"{prefix}-{name}"
        return self._join(self.dirpath, name) if self.dirpath else name

    def _file_name(self, epoch: int, step: int, metrics: dict[str, Any],
                   ver: int | None = None, filename: str | None = None) -> str:
        # the user's override is called as Lightning calls it; ray_lit joins dirpath itself
        path = self.format_checkpoint_name({**metrics, "epoch": epoch, "step": step},
                                           filename, ver)
        folder = (self.dirpath or "").rstrip("/" + os.sep)
        for sep in {"/", os.sep}:
            if folder and path.startswith(folder + sep):
                return path[len(folder) + 1:]
        return path

    def _save_last(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """Every rank: ``last.ckpt`` named through ``format_checkpoint_name`` as Lightning
        names it (so an override renames it too); a renamed previous one is removed."""
        merged = {**trainer.logged_metrics, **metrics}
        path = self._join(self.dirpath, self._file_name(
            trainer.current_epoch, trainer.global_step, merged,
            filename=self.CHECKPOINT_NAME_LAST))
        previous = self.last_model_path
        self._write(trainer, path)
        self.last_model_path = path
        if previous and previous != path and previous not in self.best_k_models:
            self._remove(trainer, previous)


class _EarlyStoppingTwin(EarlyStopping):
    """ray_lit's ``EarlyStopping`` with Lightning's check method and comparison."""

    def _run_early_stopping_check(self, trainer: Any) -> None:
        """Lightning's name of the check (its docs teach calling it from another hook)."""
        self._run_check(trainer)

    @property
    def monitor_op(self) -> Callable[..., torch.Tensor]:
        return torch.lt if self.mode == "min" else torch.gt


class _LearningRateMonitorTwin(LearningRateMonitor):
    """ray_lit's ``LearningRateMonitor``."""


class _TQDMProgressBarTwin(ProgressBar):
    """ray_lit's progress bar (``TQDMProgressBar``); it runs on the driver.

    The user's ``init_*_tqdm``, ``get_metrics`` and ``*_description`` overrides run there
    (``ProgressBar``); overrides of the loop's hooks are refused (``on_init_end``).
    """

    def on_init_end(self, trainer: Any) -> None:
        """Driver, in ``Trainer.__init__``: refuse hook overrides, then attach the Trainer.

        Raises:
            MisconfigurationException: the user's subclass overrides a loop hook
                (``on_train_batch_end`` customising ``set_postfix``, say), naming them.
        """
        hooks = sorted({name for klass in type(self).__mro__
                        if not _is_library_class(klass)
                        for name in vars(klass) if _is_loop_hook(name)})
        if hooks:
            raise MisconfigurationException(
                f"callbacks: {type(self).__qualname__} (a subclass of Lightning's "
                f"TQDMProgressBar) overrides {hooks}. ray_lit's bar runs on the driver and "
                "draws the progress rank 0 reports, so the loop's hooks (with their batch, "
                "outputs and module) never reach it on workers. Put the postfix items in "
                "get_metrics(trainer, pl_module) and build the bars in init_*_tqdm() (both "
                "run), or move that work into a separate Callback.")
        super().on_init_end(trainer)


def _is_library_class(klass: type) -> bool:
    """Whether ``klass`` is ray_lit's or Lightning's (not a user's)."""
    root = (getattr(klass, "__module__", "") or "").split(".", 1)[0]
    return root in ("ray_lit", "lightning", "pytorch_lightning", "builtins")


def _is_loop_hook(name: str) -> bool:
    """A ``Callback`` hook the loop calls (not the Trainer's construction hooks)."""
    from ray_lit.callbacks.base import Callback

    return (name.startswith("on_") or name in ("setup", "teardown")) and \
        hasattr(Callback, name) and name not in ("on_init_start", "on_init_end")


def _model_checkpoint_arguments(state: dict[str, Any]) -> dict[str, Any]:
    _refuse_options("ModelCheckpoint", state, {
        "save_on_exception": False, "auto_insert_metric_name": True,
        "_train_time_interval": None, "_enable_version_counter": True})
    if state.get("save_last") == "link":
        raise MisconfigurationException(
            "ModelCheckpoint(save_last='link'): ray_lit writes last.ckpt as a file; pass "
            "save_last=True.")
    steps = state.get("_every_n_train_steps") or None
    return {
        "dirpath": state.get("dirpath"), "filename": state.get("filename"),
        "monitor": state.get("monitor"), "verbose": state.get("verbose", False),
        "save_last": state.get("save_last"), "save_top_k": state.get("save_top_k", 1),
        "save_weights_only": state.get("save_weights_only", False),
        "mode": state.get("mode", "min"), "every_n_train_steps": steps,
        # Lightning stores 0 when only steps were asked for; ray_lit's default checks epochs too
        "every_n_epochs": state.get("_every_n_epochs") or 1,
        "save_on_train_epoch_end": state.get("_save_on_train_epoch_end"),
    }


def _early_stopping_arguments(state: dict[str, Any]) -> dict[str, Any]:
    min_delta = state.get("min_delta", 0.0)
    return {
        "monitor": state.get("monitor", "val_loss"),
        # Lightning stores the delta signed by the mode
        "min_delta": abs(float(min_delta)),
        "patience": state.get("patience", 3), "verbose": state.get("verbose", False),
        "mode": state.get("mode", "min"), "strict": state.get("strict", True),
        "check_finite": state.get("check_finite", True),
        "stopping_threshold": state.get("stopping_threshold"),
        "divergence_threshold": state.get("divergence_threshold"),
        "check_on_train_epoch_end": state.get("_check_on_train_epoch_end"),
    }


def _lr_monitor_arguments(state: dict[str, Any]) -> dict[str, Any]:
    _refuse_options("LearningRateMonitor", state, {"log_weight_decay": False})
    return {"logging_interval": state.get("logging_interval"),
            "log_momentum": state.get("log_momentum", False)}


def _progress_bar_arguments(state: dict[str, Any]) -> dict[str, Any]:
    return {"refresh_rate": state.get("_refresh_rate", 1),
            "process_position": state.get("_process_position", 0),
            "leave": state.get("_leave", False)}


_TWINS: dict[str, tuple[type, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "ModelCheckpoint": (_ModelCheckpointTwin, _model_checkpoint_arguments),
    "EarlyStopping": (_EarlyStoppingTwin, _early_stopping_arguments),
    "LearningRateMonitor": (_LearningRateMonitorTwin, _lr_monitor_arguments),
    "TQDMProgressBar": (_TQDMProgressBarTwin, _progress_bar_arguments),
}


def twin_of(lightning_name: str) -> type | None:
    """The twin of Lightning's built-in callback called ``lightning_name``, if ray_lit has
    one."""
    found = _TWINS.get(lightning_name)
    return found[0] if found is not None else None


def arguments(lightning_name: str, state: dict[str, Any]) -> dict[str, Any]:
    """The twin's constructor arguments read from the ``__dict__`` Lightning's ``__init__``
    left on a user's instance (driver, at Trainer construction).

    Raises:
        MisconfigurationException: an option ray_lit's callback cannot honour, named with
            the fix.
    """
    return _TWINS[lightning_name][1](state)


def _refuse_options(name: str, state: dict[str, Any], defaults: dict[str, Any]) -> None:
    for attribute, default in defaults.items():
        value = state.get(attribute, default)
        if value != default:
            option = attribute.lstrip("_")
            raise MisconfigurationException(
                f"{name}({option}={value!r}): ray_lit's {name} does not support {option}; "
                f"leave it at {default!r} (its default).")
