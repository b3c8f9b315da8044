"""``EarlyStopping``: stop when a monitored metric stops improving.

Checks at each validation end, or at each training epoch end when the run has no validation loop
or the metric comes from the training loop (0.9 ``TrainResult(early_stop_on=...)``). It only
sets ``trainer.should_stop``; the loop broadcasts rank 0's decision so all ranks stop together,
and honours it once ``min_epochs`` are done.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ray_lit.callbacks.base import Callback, validation_ends_each_epoch
from ray_lit.errors import MisconfigurationException


class MonitorNotFoundError(MisconfigurationException, RuntimeError):
    """The monitored metric is not in ``trainer.callback_metrics`` (``strict=True``)."""


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved for ``patience`` checks.

    Args:
        monitor: metric in ``trainer.callback_metrics`` (0.9 Results switch it to
            ``val_early_stop_on`` / ``early_stop_on`` when those are given).
        min_delta: smallest change that counts as an improvement.
        patience: checks without improvement before stopping.
        mode: "min", "max" or "auto" (max only for "acc").
        strict: a missing monitor raises (True) or is skipped (False).
        check_finite: stop when the metric becomes NaN or infinite.
        stopping_threshold: stop as soon as the metric reaches this value.
        divergence_threshold: stop as soon as the metric is worse than this value.
        check_on_train_epoch_end: check at the training epoch end (True) or after validation
            (False); None (default): after validation, unless validation does not log the
            monitor and runs once per epoch at its end (a train metric logged
            ``on_epoch=True``), then at the epoch end (2.x).
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 3,
                 verbose: bool = False, mode: str = "min", strict: bool = True,
                 check_finite: bool = True, stopping_threshold: float | None = None,
                 divergence_threshold: float | None = None,
                 check_on_train_epoch_end: bool | None = None) -> None:
        if mode == "auto":
            mode = "max" if monitor == "acc" else "min"
        if mode not in ("min", "max"):
            raise MisconfigurationException(f"EarlyStopping(mode={mode!r}): use 'min' or 'max'.")
        self.monitor = monitor
        self._user_monitor = monitor
        self.min_delta = abs(min_delta)
        self.patience = patience
        self.verbose = verbose
        self.mode = mode
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stop_reason: str | None = None
        self._check_on_train_epoch_end = check_on_train_epoch_end
        self._deferred = False  # validation left this epoch's check to the epoch end
        self._at_epoch_end: bool | None = None  # where this fit checks (see on_validation_end)

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{'monitor': {self._user_monitor!r}, 'mode': {self.mode!r}}}"

    def state_dict(self) -> dict[str, Any]:
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch,
                "best_score": float(self.best_score), "patience": self.patience}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = state_dict["wait_count"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.best_score = float(state_dict["best_score"])
        self.patience = state_dict.get("patience", self.patience)

    # --- when -----------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._at_epoch_end, self._deferred = None, False

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.training:
            return
        metrics = trainer.callback_metrics
        if "val_early_stop_on" in metrics:
            if metrics["val_early_stop_on"] is not None:
                self.monitor = "val_early_stop_on"
            else:
                self.strict = False  # 0.9: a Result without early_stop_on turns strict off
        if self.monitor == "early_stop_on":
            return  # checked from the training loop
        if self._at_epoch_end is None:  # decided at the fit's first validation, then kept
            self._at_epoch_end = self._on_train_epoch_end(trainer)
        if self._at_epoch_end:
            self._deferred = True  # the epoch end checks, with the epoch's train metrics
            return
        self._run_check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        deferred, self._deferred = self._deferred, False
        if self.monitor == "val_early_stop_on":
            return
        if trainer.callback_metrics.get("early_stop_on") is not None:
            self.monitor = "early_stop_on"
            self._run_check(trainer)
        elif not trainer._val_enabled or deferred or self._check_on_train_epoch_end:
            self._run_check(trainer)

    def _on_train_epoch_end(self, trainer: Any) -> bool:
        """Whether to check at the training epoch end rather than after validation (every
        rank decides alike): ``check_on_train_epoch_end`` when given (2.x); otherwise only a
        monitor validation does not log, when validation runs once per epoch at its end."""
        if self._check_on_train_epoch_end is not None:
            return self._check_on_train_epoch_end
        if self.monitor in trainer.callback_metrics:
            return False
        return validation_ends_each_epoch(trainer)

    # --- what -----------------------------------------------------------------------------------
    def _improved(self, current: float) -> bool:
        if self.mode == "min":
            return current < self.best_score - self.min_delta
        return current > self.best_score + self.min_delta

    def _run_check(self, trainer: Any) -> None:
        if trainer.config.fast_dev_run:
            return
        metrics = trainer.callback_metrics
        value = metrics.get(self.monitor)
        if value is None:
            if self.strict:
                raise MonitorNotFoundError(
                    f"EarlyStopping is conditioned on metric {self.monitor!r}, which is not "
                    f"available. Available metrics are: "
                    f"{sorted(k for k, v in metrics.items() if v is not None)}. Log it, pass "
                    "another monitor, or set strict=False.")
            return
        current = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) \
            else float(value)
        stop, reason = False, None
        if self.check_finite and not math.isfinite(current):
            stop, reason = True, f"{self.monitor} = {current} is not finite"
        elif self.stopping_threshold is not None and not self._worse_than(
                current, self.stopping_threshold):
            stop, reason = True, f"{self.monitor} reached the threshold {self.stopping_threshold}"
        elif self.divergence_threshold is not None and self._worse_than(
                current, self.divergence_threshold):
            stop, reason = True, f"{self.monitor} diverged past {self.divergence_threshold}"
        elif self._improved(current):
            self.best_score = current
            self.wait_count = 0
        else:
            self.wait_count += 1
            if self.wait_count >= self.patience:
                stop = True
                reason = (f"{self.monitor} did not improve in the last {self.wait_count} "
                          f"checks; best {self.best_score:.6g}")
        if stop:
            self.stopped_epoch = trainer.current_epoch
            self.stop_reason = reason
            trainer.should_stop = True
            if self.verbose and trainer.is_global_zero:
                print(f"Epoch {trainer.current_epoch}: early stopping: {reason}")

    def _worse_than(self, current: float, threshold: float) -> bool:
        return current > threshold if self.mode == "min" else current < threshold
