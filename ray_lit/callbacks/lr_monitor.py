"""``LearningRateMonitor``: log each optimizer's learning rate (and momentum) to the loggers.

It runs inside the loop like any callback. In a distributed fit ``trainer.loggers`` are proxies
that forward to rank 0's event stream, so the values reach the driver's loggers once.

Key names follow Lightning: ``lr-Adam``; ``lr-Adam-1`` for a second Adam; ``lr-Adam/pg1``,
``lr-Adam/pg2`` (or the param group's ``"name"``) when an optimizer has several param groups;
a scheduler config's ``name`` replaces the generated name.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch

from ray_lit.callbacks.base import Callback
from ray_lit.errors import MisconfigurationException


class LearningRateMonitor(Callback):
    """Log learning rates at the cadence of their schedulers.

    Schedulers with ``interval="step"`` are logged at training batch starts that fall on the
    ``log_every_n_steps`` cadence, ``interval="epoch"`` ones at each training epoch start.
    Optimizers without a scheduler are logged at ``logging_interval`` (epoch by default).

    Args:
        logging_interval: None (each scheduler's own interval), ``"step"`` or ``"epoch"``
            (everything at that interval).
        log_momentum: also log ``<lr key>-momentum``, e.g. ``lr-Adam-momentum`` (``betas[0]``
            for Adam-like optimizers, 0 for optimizers without momentum).

    Raises:
        MisconfigurationException: a bad ``logging_interval``, or (at train start) a trainer
            without a logger.
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False) -> None:
        if logging_interval not in (None, "step", "epoch"):
            raise MisconfigurationException(
                f"LearningRateMonitor(logging_interval={logging_interval!r}): use None, "
                "'step' or 'epoch'.")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.lrs: dict[str, list[float]] = {}
        self.last_momentum_values: dict[str, float] = {}
        self._warned_no_scheduler = False

    # --- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use LearningRateMonitor with Trainer that has no logger: pass "
                "logger=True (or a logger), or remove the callback.")
        if not trainer.lr_scheduler_configs and not self._warned_no_scheduler:
            self._warned_no_scheduler = True
            warnings.warn(
                "LearningRateMonitor: the module has no learning rate schedulers; logging the "
                "optimizers' learning rates every "
                f"{self.logging_interval or 'epoch'}.", RuntimeWarning, stacklevel=2)
        if self.log_momentum and not all(_has_momentum(o) for o in trainer.optimizers):
            warnings.warn("LearningRateMonitor(log_momentum=True): some optimizers have no "
                          "momentum; 0 is logged for them.", RuntimeWarning, stacklevel=2)
        self.lrs = {name: [] for name in self._names(trainer)}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        if self.logging_interval == "epoch":
            return
        every = getattr(trainer, "log_every_n_steps", None) or trainer.config.log_every_n_steps
        if trainer.global_step % max(1, int(every)) != 0:
            return
        self._log(trainer, "step" if self.logging_interval is None else "any")

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.logging_interval == "step":
            return
        self._log(trainer, "epoch" if self.logging_interval is None else "any")

    # --- collecting ----------------------------------------------------------------------------
    def _log(self, trainer: Any, interval: str) -> None:
        stats = self._extract_stats(trainer, interval)
        if not stats:
            return
        for logger in trainer.loggers:
            # aggregated like the trainer's own metrics, so in process and on Ray (where the
            # driver aggregates what the workers send) a step's values land in one record
            log = getattr(logger, "agg_and_log_metrics", None) or logger.log_metrics
            log(dict(stats), step=trainer.global_step)
        # as in Lightning, the values go to the loggers only: ``callback_metrics`` stays what
        # the module logged, so monitors and ``trainer.callback_metrics`` are unaffected

    def _extract_stats(self, trainer: Any, interval: str) -> dict[str, float]:
        """Values due at ``interval`` (``"step"``, ``"epoch"`` or ``"any"``)."""
        stats: dict[str, float] = {}
        scheduled, unscheduled = self._named_optimizers(trainer)
        for (name, optimizer), config in zip(scheduled, trainer.lr_scheduler_configs):
            if interval in ("any", config.interval):
                stats.update(self._optimizer_stats(optimizer, name))
        # optimizers without a scheduler follow ``logging_interval`` (None counts as epoch)
        if interval == "any" or interval == (self.logging_interval or "epoch"):
            for name, optimizer in unscheduled:
                stats.update(self._optimizer_stats(optimizer, name))
        return stats

    def _optimizer_stats(self, optimizer: torch.optim.Optimizer, name: str) -> dict[str, float]:
        stats: dict[str, float] = {}
        groups = optimizer.param_groups
        for idx, group in enumerate(groups):
            key = _group_name(name, groups, idx)
            lr = float(group["lr"])
            stats[key] = lr
            self.lrs.setdefault(key, []).append(lr)
            if self.log_momentum:
                momentum = _momentum(optimizer, group)
                momentum_key = _momentum_name(key)
                stats[momentum_key] = momentum
                self.last_momentum_values[momentum_key] = momentum
        return stats

    def _names(self, trainer: Any) -> list[str]:
        scheduled, unscheduled = self._named_optimizers(trainer)
        return [_group_name(name, opt.param_groups, idx) for name, opt in scheduled + unscheduled
                for idx in range(len(opt.param_groups))]

    @staticmethod
    def _named_optimizers(trainer: Any) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        """``(name, optimizer)`` per scheduler config, then for optimizers without one."""
        seen_types: dict[type, int] = defaultdict(int)
        seen: list[Any] = []
        scheduled = []
        for config in trainer.lr_scheduler_configs:
            optimizer = config.scheduler.optimizer
            seen_types[type(optimizer)] += 1
            name = config.name or _with_count(
                f"lr-{type(optimizer).__name__}", seen_types[type(optimizer)])
            scheduled.append((name, optimizer))
            seen.append(optimizer)
        unscheduled = []
        for optimizer in trainer.optimizers:
            if any(optimizer is s for s in seen):
                continue
            seen_types[type(optimizer)] += 1
            name = _with_count(f"lr-{type(optimizer).__name__}", seen_types[type(optimizer)])
            unscheduled.append((name, optimizer))
        return scheduled, unscheduled


LearningRateLogger = LearningRateMonitor


def _with_count(name: str, count: int) -> str:
    """``lr-Adam`` for the first Adam, ``lr-Adam-1`` for the second, ..."""
    return name if count <= 1 else f"{name}-{count - 1}"


def _group_name(name: str, groups: list[dict[str, Any]], idx: int) -> str:
    if len(groups) > 1:
        return f"{name}/{groups[idx].get('name', f'pg{idx + 1}')}"
    group_name = groups[idx].get("name")
    return f"{name}/{group_name}" if group_name else name


def _momentum_name(lr_key: str) -> str:
    """``lr-Adam/pg1`` -> ``lr-Adam/pg1-momentum`` (Lightning's key, custom names alike)."""
    return f"{lr_key}-momentum"


def _has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    return "betas" in optimizer.defaults or "momentum" in optimizer.defaults


def _momentum(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float:
    if "betas" in optimizer.defaults:
        return float(group["betas"][0])
    return float(group.get("momentum", 0.0))
