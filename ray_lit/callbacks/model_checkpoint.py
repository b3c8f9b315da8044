"""``ModelCheckpoint``: keep the best ``save_top_k`` checkpoints of a monitored metric.

Runs in every process like any callback; files are written by global rank 0 only (with
``FSDPStrategy(state_dict_type="sharded")`` every rank writes its shards into a checkpoint
directory of the same name, ``trainer._save_sharded_checkpoint``; rank 0 alone removes old
ones). It checks at each validation end (never in the sanity check), at each training epoch end
when the run has no validation loop, and every ``every_n_train_steps`` optimizer steps. With
0.9 Results it monitors ``val_checkpoint_on`` / ``checkpoint_on`` when the user's monitor is not
logged (spec §1.7).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any

import torch

from ray_lit.callbacks.base import Callback, validation_ends_each_epoch
from ray_lit.errors import MisconfigurationException

_GROUP = re.compile(r"\{([^{}:]+)(:[^{}]*)?\}")
_RESULT_KEYS = ("val_checkpoint_on", "checkpoint_on")


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


def _writes_sharded(trainer: Any) -> bool:
    """Whether the run's strategy makes checkpoints directories of every rank's shards
    (``FSDPStrategy(state_dict_type="sharded")``; asked of the object: callbacks sit below
    strategies and do not import them)."""
    strategy = getattr(trainer, "strategy", None)
    return getattr(strategy, "state_dict_type", "full") == "sharded"


class ModelCheckpoint(Callback):
    """Save checkpoints by a monitored metric (or the latest one when ``monitor`` is None).

    Args:
        dirpath: directory for the files; default
            ``<logger save_dir>/<logger name>/version_<v>/checkpoints`` (or
            ``default_root_dir/checkpoints`` without a logger).
        filename: template such as ``"{epoch}-{val_loss:.2f}"``; default
            ``"epoch={epoch}-step={step}"``.
        monitor: metric in ``trainer.callback_metrics``; None keeps the latest checkpoint.
        mode: "min" or "max" ("auto": max for accuracy-like names).
        save_top_k: how many best files to keep; -1 keeps all, 0 none.
        save_last: also write ``last.ckpt`` at every save.
        every_n_epochs: check only every n-th epoch.
        every_n_train_steps: also check every n optimizer steps.
        save_on_train_epoch_end: check at the training epoch end (True) or after validation
            (False); None (default): after validation, unless validation does not log the
            monitor and runs once per epoch at its end (a train metric logged
            ``on_epoch=True``), then at the epoch end (2.x).
        save_weights_only: files hold only the weights and hparams.
    """

    FILE_EXTENSION = ".ckpt"
    CHECKPOINT_NAME_LAST = "last"

    def __init__(self, dirpath: str | os.PathLike | None = None, filename: str | None = None,
                 monitor: str | None = None, verbose: bool = False,
                 save_last: bool | None = None, save_top_k: int = 1,
                 save_weights_only: bool = False, mode: str = "min", every_n_epochs: int = 1,
                 every_n_train_steps: int | None = None, period: int | None = None,
                 filepath: str | os.PathLike | None = None, prefix: str = "",
                 save_on_train_epoch_end: bool | None = None) -> None:
        if filepath is not None:  # 0.9: a directory, or a directory plus a file template
            filepath = os.fspath(filepath)  # a pathlib.Path works too
            if os.path.isdir(filepath) or filepath.endswith(os.sep):
                dirpath = filepath
            else:
                dirpath, filename = os.path.split(filepath)
                filename = os.path.splitext(filename)[0] or None
        if mode == "auto":
            mode = "max" if monitor and ("acc" in monitor or monitor.startswith("fmeasure")) \
                else "min"
        if mode not in ("min", "max"):
            raise MisconfigurationException(f"ModelCheckpoint(mode={mode!r}): use 'min' or 'max'.")
        if save_top_k < -1:
            raise MisconfigurationException(f"ModelCheckpoint(save_top_k={save_top_k}) must "
                                            "be >= -1.")
        if dirpath is not None:
            dirpath = os.fspath(dirpath)
        if dirpath is not None and "://" not in dirpath:
            dirpath = os.path.abspath(dirpath)  # workers resolve paths in their own cwd
        self.dirpath = dirpath
        self.filename = filename
        self.monitor = monitor
        self._user_monitor = monitor
        self.verbose = verbose
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_weights_only = save_weights_only
        self.mode = mode
        self.every_n_epochs = period if period is not None else every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.prefix = prefix
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self._deferred = False  # validation left this epoch's check to the epoch end
        self._at_epoch_end: bool | None = None  # where this fit checks (see on_validation_end)
        self.best_k_models: dict[str, float] = {}
        self.kth_best_model_path = ""
        self.kth_value: float | None = None
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.last_model_path = ""
        self.current_score: float | None = None
        self._last_global_step_saved = -1
        self.saved_paths: list[str] = []

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint{{'monitor': {self._user_monitor!r}}}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor, "best_model_score": self.best_model_score,
            "best_model_path": self.best_model_path, "current_score": self.current_score,
            "dirpath": self.dirpath, "best_k_models": dict(self.best_k_models),
            "kth_best_model_path": self.kth_best_model_path, "kth_value": self.kth_value,
            "last_model_path": self.last_model_path,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            if key == "monitor":
                continue
            setattr(self, key, dict(value) if key == "best_k_models" else value)

    # --- when -----------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._at_epoch_end, self._deferred = None, False
        if self.dirpath is None:
            self.dirpath = trainer._ctx.default_checkpoint_dir()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.training:
            return
        if self._at_epoch_end is None:  # decided at the fit's first validation, then kept
            self._at_epoch_end = self._on_train_epoch_end(trainer)
        if self._at_epoch_end:
            self._deferred = True  # the epoch end checks, with the epoch's train metrics
            return
        self.check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        deferred, self._deferred = self._deferred, False
        if not trainer._val_enabled or deferred or self._save_on_train_epoch_end:
            self.check(trainer)

    def _on_train_epoch_end(self, trainer: Any) -> bool:
        """Whether this run checks at the training epoch end rather than after validation
        (every rank decides alike, from options and logged keys).

        ``save_on_train_epoch_end`` decides when given (2.x). Otherwise a monitor that
        validation does not log (``train_loss`` logged ``on_epoch=True``) is checked at the
        epoch end when validation runs once per epoch at its end, as 2.x does; a monitor that
        validation logs keeps 0.9's check after validation.
        """
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        monitor = self._user_monitor
        if monitor is None or monitor in trainer.callback_metrics or \
                any(trainer.callback_metrics.get(k) is not None for k in _RESULT_KEYS):
            return False
        return validation_ends_each_epoch(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                           dataloader_idx=0) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        if n and step > 0 and step % n == 0 and step != self._last_global_step_saved:
            self.check(trainer, force_epoch_rule=True)

    # --- what -----------------------------------------------------------------------------------
    def _resolve_monitor(self, metrics: dict[str, Any]) -> None:
        """0.9 Results: switch to ``val_checkpoint_on`` / ``checkpoint_on`` when present and the
        user's monitor is not logged."""
        if self._user_monitor is not None and self._user_monitor in metrics:
            self.monitor = self._user_monitor
            return
        for key in _RESULT_KEYS:
            if metrics.get(key) is not None:
                if self._user_monitor not in (None, "val_loss", "loss", *_RESULT_KEYS):
                    warnings.warn(f"ModelCheckpoint(monitor={self._user_monitor!r}) has no "
                                  f"effect: Results define {key!r}, which is used.", stacklevel=3)
                self.monitor = key
                return
        self.monitor = self._user_monitor

    def check(self, trainer: Any, force_epoch_rule: bool = False) -> None:
        """Save if the run is at a saving point and the score qualifies."""
        if self.save_top_k == 0 and not self.save_last:
            return
        if trainer.config.fast_dev_run or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        if not force_epoch_rule and self.every_n_epochs and (epoch + 1) % self.every_n_epochs:
            return
        step = trainer.global_step
        if step == self._last_global_step_saved:
            return
        metrics = dict(trainer.callback_metrics)
        self._resolve_monitor(metrics)
        if self.dirpath is None:
            self.dirpath = trainer._ctx.default_checkpoint_dir()
        self._last_global_step_saved = step
        if self.monitor is None or self.save_top_k == -1:
            current = _to_float(metrics.get(self.monitor)) if self.monitor else None
            self.current_score = current
            if self.save_top_k != 0:
                # no monitor: the latest is the best; ``save_top_k=1`` keeps only it, -1 keeps
                # every file (as 2.x does)
                self._save_new(trainer, current, metrics,
                               keep_only_latest=self.monitor is None and self.save_top_k == 1)
        else:
            if self.monitor not in metrics or metrics[self.monitor] is None:
                raise MisconfigurationException(
                    f"ModelCheckpoint(monitor={self.monitor!r}) could not find the metric. "
                    f"Available metrics: {sorted(k for k, v in metrics.items() if v is not None)}."
                    " Log it with self.log, or pass a monitor that is logged.")
            current = _to_float(metrics[self.monitor])
            self.current_score = current
            if self.save_top_k and self._qualifies(current):
                self._save_new(trainer, current, metrics)
        if self.save_last:
            self._save_last(trainer, metrics)
        if self.__dict__.pop("_wrote", False):
            self._notify_loggers(trainer)

    def _notify_loggers(self, trainer: Any) -> None:
        """Global rank 0, after a check that saved: ``logger.after_save_checkpoint(self)``, as
        2.x does (``log_model`` uploads). In a worker the loggers are proxies that forward a
        snapshot of this callback to the driver's loggers."""
        if not trainer.is_global_zero:
            return
        for logger in getattr(trainer, "loggers", None) or []:
            hook = getattr(logger, "after_save_checkpoint", None)
            if hook is not None:
                hook(self)

    def _qualifies(self, current: float) -> bool:
        if math.isnan(current):
            return False
        if len(self.best_k_models) < self.save_top_k:
            return True
        return current < self.kth_value if self.mode == "min" else current > self.kth_value

    def _save_new(self, trainer: Any, current: float | None, metrics: dict[str, Any],
                  keep_only_latest: bool = False) -> None:
        path = self._unique_path(trainer, metrics)
        self._write(trainer, path)
        self.saved_paths.append(path)
        if keep_only_latest:
            for old in list(self.best_k_models):
                if old != path:
                    self._remove(trainer, old)
            self.best_k_models = {path: current if current is not None else 0.0}
            self.best_model_path, self.best_model_score = path, current
            self.kth_best_model_path, self.kth_value = path, current
            return
        if current is None:  # no monitor, every file kept: the latest is the best
            self.best_k_models[path] = 0.0
            self.best_model_path, self.best_model_score = path, None
            self.kth_best_model_path, self.kth_value = path, None
            return
        self.best_k_models[path] = current
        if self.save_top_k != -1 and len(self.best_k_models) > self.save_top_k:
            worst = self._worst()
            self.best_k_models.pop(worst)
            self._remove(trainer, worst)
        reverse = self.mode == "max"
        ranked = sorted(self.best_k_models.items(), key=lambda kv: kv[1], reverse=reverse)
        self.best_model_path, self.best_model_score = ranked[0]
        self.kth_best_model_path, self.kth_value = ranked[-1]
        if self.verbose and trainer.is_global_zero:
            print(f"Epoch {trainer.current_epoch}: {self.monitor} reached {current:.5f}; saved "
                  f"{path}")

    def _worst(self) -> str:
        pick = max if self.mode == "min" else min
        return pick(self.best_k_models, key=self.best_k_models.get)

    def _save_last(self, trainer: Any, metrics: dict[str, Any]) -> None:
        path = self._join(self.dirpath, f"{self.prefix}{self.CHECKPOINT_NAME_LAST}"
                                        f"{self.FILE_EXTENSION}")
        self._write(trainer, path)
        self.last_model_path = path

    def _write(self, trainer: Any, path: str) -> None:
        """Every rank: a file (rank 0 writes) or, for a sharded strategy, a directory of
        every rank's shards (COLLECTIVE)."""
        self._wrote = True  # the check's end tells the loggers (``_notify_loggers``)
        if _writes_sharded(trainer):
            trainer._save_sharded_checkpoint(path, self.save_weights_only)
        else:
            trainer.save_checkpoint(path, self.save_weights_only)

    # --- file names -----------------------------------------------------------------------------
    def format_checkpoint_name(self, epoch: int, step: int, metrics: dict[str, Any],
                               ver: int | None = None) -> str:
        """``"{epoch}-{val_loss:.2f}"`` -> ``"epoch=3-val_loss=0.12.ckpt"``; missing metrics
        format as 0."""
        template = self.filename or "epoch={epoch}-step={step}"
        values = {"epoch": epoch, "step": step}
        for key, value in metrics.items():
            values[key] = _to_float(value) if isinstance(value, (torch.Tensor, int, float)) \
                else value

        def replace(match: re.Match) -> str:
            name, spec = match.group(1), match.group(2) or ""
            value = values.get(name, 0)
            value = 0 if value is None else value
            text = f"{{{spec}}}".format(value) if spec else str(value)
            prefix = "" if match.string[max(match.start() - 1, 0):match.start()] == "=" else \
                f"{name}="
            return f"{prefix}{text}"

        name = _GROUP.sub(replace, template)
        if self.prefix:
            name = f"{self.prefix}-{name}"
        if ver is not None:
            name = f"{name}-v{ver}"
        return f"{name}{self.FILE_EXTENSION}"

    def _file_name(self, epoch: int, step: int, metrics: dict[str, Any],
                   ver: int | None = None) -> str:
        """The file name of a new checkpoint: the seam where a subclass written for
        Lightning's ``format_checkpoint_name(metrics, ...)`` is called its way
        (``callbacks.lightning_twins``)."""
        return self.format_checkpoint_name(epoch, step, metrics, ver=ver)

    def _unique_path(self, trainer: Any, metrics: dict[str, Any]) -> str:
        merged = {**trainer.logged_metrics, **metrics}
        epoch, step = trainer.current_epoch, trainer.global_step
        path = self._join(self.dirpath, self._file_name(epoch, step, merged))
        version = 1
        while (path in self.best_k_models or path in self.saved_paths[-1:]
               or (trainer.is_global_zero and self._exists(path))):
            path = self._join(self.dirpath,
                              self._file_name(epoch, step, merged, ver=version))
            version += 1
        if _writes_sharded(trainer):
            # every rank writes into this directory: rank 0's name (it alone looked at what
            # exists) for all (COLLECTIVE, as the save that follows)
            path = trainer.strategy.broadcast(path)
        return path

    @staticmethod
    def _join(dirpath: str, name: str) -> str:
        return f"{dirpath.rstrip('/')}/{name}" if "://" in dirpath else os.path.join(dirpath, name)

    @staticmethod
    def _exists(path: str) -> bool:
        from ray_lit.storage.filesystem import Storage, split

        parent, name = split(path)
        return Storage(parent).exists(name)

    def _remove(self, trainer: Any, path: str) -> None:
        if not trainer.is_global_zero or path == self.last_model_path:
            return
        from ray_lit.storage.filesystem import Storage, split

        parent, name = split(path)
        Storage(parent).delete(name)
