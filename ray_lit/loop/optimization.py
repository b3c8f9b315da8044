"""Optimizers and LR schedulers from ``configure_optimizers`` (every form of spec §3.6), their
stepping rules, gradient clipping and mixed precision."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from ray_lit.errors import MisconfigurationException

_FORMS = (
    "an Optimizer; a list of Optimizers; a tuple ([optimizers], [schedulers]); a dict "
    "{'optimizer': o, 'lr_scheduler': s, 'monitor': m}; a list of such dicts (optionally with "
    "'frequency'); or None"
)
_SCHED_KEYS = {"scheduler", "interval", "frequency", "monitor", "strict", "name",
               "reduce_on_plateau", "opt_idx"}


@dataclass
class LRSchedulerConfig:
    """One scheduler with its stepping rule (normalised from every accepted form)."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    reduce_on_plateau: bool = False
    strict: bool = True
    name: str | None = None
    opt_idx: int = 0


@dataclass
class OptimizerSetup:
    optimizers: list[Optimizer]
    schedulers: list[LRSchedulerConfig]
    frequencies: list[int]


class _NoOptimizer(Optimizer):
    """Stands in when ``configure_optimizers`` returns None (training runs without steps)."""

    def __init__(self) -> None:
        super().__init__([torch.zeros(1)], {"lr": 0.0})

    def step(self, closure: Any = None) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def _is_plateau(scheduler: Any) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _scheduler_config(entry: Any, default_monitor: str | None, optimizers: list[Optimizer]
                      ) -> LRSchedulerConfig:
    if isinstance(entry, Mapping):
        if "scheduler" not in entry:
            raise MisconfigurationException(
                "A scheduler dict from configure_optimizers needs the key 'scheduler'; got keys "
                f"{sorted(entry)}."
            )
        unknown = set(entry) - _SCHED_KEYS
        if unknown:
            warnings.warn(f"Unknown keys {sorted(unknown)} in a scheduler dict are ignored.",
                          stacklevel=3)
        interval = entry.get("interval", "epoch")
        if interval not in ("step", "epoch"):
            raise MisconfigurationException(
                f"Scheduler 'interval' must be 'step' or 'epoch', got {interval!r}."
            )
        config = LRSchedulerConfig(
            scheduler=entry["scheduler"], interval=interval,
            frequency=int(entry.get("frequency", 1)),
            monitor=entry.get("monitor", default_monitor),
            reduce_on_plateau=entry.get("reduce_on_plateau", _is_plateau(entry["scheduler"])),
            strict=entry.get("strict", True), name=entry.get("name"),
        )
    else:
        config = LRSchedulerConfig(scheduler=entry, monitor=default_monitor,
                                   reduce_on_plateau=_is_plateau(entry))
    if config.reduce_on_plateau and config.monitor is None:
        # 0.9 monitored 'val_loss' by default
        config.monitor = "val_loss"
    opt = getattr(config.scheduler, "optimizer", None)
    for idx, candidate in enumerate(optimizers):
        if candidate is opt:
            config.opt_idx = idx
    return config


def parse_optimizers(returned: Any) -> OptimizerSetup:
    """Normalise what ``configure_optimizers`` returned (spec §3.6, 0.9 and 2.x forms)."""
    if returned is None:
        warnings.warn("configure_optimizers returned None: training runs with no optimizer.",
                      stacklevel=2)
        return OptimizerSetup([_NoOptimizer()], [], [])
    if isinstance(returned, Optimizer):
        return OptimizerSetup([returned], [], [])
    if isinstance(returned, Mapping):
        return _from_dicts([returned])
    if isinstance(returned, (list, tuple)):
        items = list(returned)
        if items and all(isinstance(o, Mapping) for o in items):
            return _from_dicts(items)
        if len(items) == 2 and isinstance(items[0], (list, tuple)):
            opts = list(items[0])
            scheds = items[1] if isinstance(items[1], (list, tuple)) else [items[1]]
            _check_optimizers(opts)
            return OptimizerSetup(opts, [_scheduler_config(s, None, opts) for s in scheds], [])
        if items and all(isinstance(o, Optimizer) for o in items):
            return OptimizerSetup(items, [], [])
    raise MisconfigurationException(
        f"configure_optimizers returned {type(returned).__name__}: {returned!r:.200}. "
        f"Return {_FORMS}."
    )


def _check_optimizers(opts: Sequence[Any]) -> None:
    for o in opts:
        if not isinstance(o, Optimizer):
            raise MisconfigurationException(
                f"configure_optimizers returned {type(o).__name__} where an optimizer was "
                f"expected. Return {_FORMS}."
            )


def _from_dicts(dicts: list[Mapping]) -> OptimizerSetup:
    for d in dicts:
        if "optimizer" not in d:
            raise MisconfigurationException(
                f"An optimizer dict from configure_optimizers needs the key 'optimizer'; got "
                f"keys {sorted(d)}."
            )
    opts = [d["optimizer"] for d in dicts]
    _check_optimizers(opts)
    freqs = [d.get("frequency") for d in dicts]
    if any(f is not None for f in freqs) and not all(f is not None for f in freqs):
        raise MisconfigurationException(
            "'frequency' must be given for every optimizer dict or for none of them."
        )
    schedulers = []
    for d in dicts:
        if d.get("lr_scheduler") is not None:
            schedulers.append(_scheduler_config(d["lr_scheduler"], d.get("monitor"), opts))
    return OptimizerSetup(opts, schedulers, [int(f) for f in freqs if f is not None])


def _step_scheduler(scheduler: Any, metric: Any) -> None:
    if metric is None:
        scheduler.step()
    else:
        scheduler.step(metric)


def step_schedulers(configs: list[LRSchedulerConfig], interval: str, counter: int,
                    metrics: Mapping[str, Any], step_fn: Any = None) -> int:
    """Step the schedulers of ``interval`` that are due; returns how many stepped.

    ``counter`` is the 1-based count of that interval: batches in the epoch for ``step`` (0.9
    rule, spec §3.6) or epochs done for ``epoch``. ``step_fn(scheduler, metric)`` does the
    stepping (the module's 2.x ``lr_scheduler_step`` when it overrides it); ``metric`` is
    None except for ReduceLROnPlateau.
    """
    step_fn = step_fn or _step_scheduler
    stepped = 0
    for config in configs:
        if config.interval != interval or counter % config.frequency != 0:
            continue
        if config.reduce_on_plateau:
            value = metrics.get(config.monitor)
            if value is None:
                if not config.strict:
                    warnings.warn(f"ReduceLROnPlateau monitor {config.monitor!r} not found; "
                                  "skipped this step.", stacklevel=2)
                    continue
                raise MisconfigurationException(
                    f"ReduceLROnPlateau conditioned on metric {config.monitor!r}, which is not "
                    f"available. Available metrics are: {sorted(metrics)}. Set 'monitor' in the "
                    "scheduler dict to one of them."
                )
            step_fn(config.scheduler, float(value))
        else:
            step_fn(config.scheduler, None)
        stepped += 1
    return stepped


def clip_gradients(parameters: Iterator[torch.nn.Parameter], value: float,
                   algorithm: str = "norm") -> None:
    """Global 2-norm clipping (0.9) or clipping by value (2.x ``gradient_clip_algorithm``)."""
    params = [p for p in parameters if p.grad is not None]
    if not params or not value:
        return
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)


class Precision:
    """32, 16 (autocast float16, GradScaler on CUDA) or "bf16" (autocast bfloat16)."""

    def __init__(self, precision: int | str, device: torch.device) -> None:
        self.precision = precision
        self.device = device
        self.dtype = {16: torch.float16, "16": torch.float16, "16-mixed": torch.float16,
                      "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}.get(precision)
        self.scaler = None
        self._unscaled: set[int] = set()  # optimizers unscaled since the last scaler update
        if self.dtype is torch.float16 and device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: Optimizer) -> None:
        """Unscale ``optimizer``'s gradients once per step (the loop does it before
        ``on_before_optimizer_step``; a ``clip_gradients`` call after it must not again:
        GradScaler refuses a second unscale)."""
        if self.scaler is not None and id(optimizer) not in self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled.add(id(optimizer))

    def step(self, optimizer: Optimizer, step_fn: Any) -> None:
        """Run ``step_fn`` (the module's ``optimizer_step``) through the scaler when one is used."""
        if self.scaler is None:
            step_fn()
            return
        # GradScaler.step skips the step on inf/NaN grads: route the user's optimizer.step()
        # through it, with the real step back in place while the scaler calls it.
        def scaled_step(closure: Any = None, **kwargs: Any) -> Any:
            if closure is not None:
                closure()
            del optimizer.step
            try:
                return self.scaler.step(optimizer, **kwargs)
            finally:
                optimizer.step = scaled_step

        optimizer.step = scaled_step
        try:
            step_fn()
        finally:
            optimizer.__dict__.pop("step", None)
        self.scaler.update()
        self._unscaled.clear()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def validate_precision(precision: Any, device_type: str) -> None:
    valid = (32, "32", 64, "64", 16, "16", "16-mixed", "bf16", "bf16-mixed", "32-true")
    if precision not in valid:
        raise MisconfigurationException(
            f"precision={precision!r} is not supported; use 32, 16 or 'bf16'."
        )
    if precision in (16, "16", "16-mixed") and device_type == "cpu":
        warnings.warn("precision=16 on CPU autocasts to float16 without a GradScaler; "
                      "bf16 is usually the better choice on CPU.", stacklevel=3)


def accumulation_for_epoch(value: int | dict, epoch: int) -> int:
    """The accumulation factor in force at ``epoch`` (0.9 schedule: from that epoch on)."""
    if isinstance(value, int):
        return value
    current = 1
    for start in sorted(value):
        if epoch >= start:
            current = value[start]
    return current


@contextlib.contextmanager
def torch_flags(deterministic: bool | str | None, benchmark: bool | None) -> Iterator[None]:
    """``Trainer(deterministic=..., benchmark=...)`` for the length of a stage, in every
    process that runs the loop (in process, and each Ray worker); the previous settings come
    back afterwards, so a notebook's next cell is unaffected.

    ``deterministic=True`` turns on ``torch.use_deterministic_algorithms`` (an op with no
    deterministic implementation raises), ``"warn"`` the same with ``warn_only=True``; both
    set cuDNN to deterministic, non-benchmarking kernels and ``CUBLAS_WORKSPACE_CONFIG``
    (cuBLAS needs it for reproducible results on CUDA; it is left alone when already set).
    ``benchmark`` sets ``cudnn.benchmark`` when given (2.x; ``None`` leaves it, except that
    determinism turns it off).
    """
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if deterministic not in (None, False, True, "warn"):
        raise MisconfigurationException(
            f"deterministic={deterministic!r}: use True, False or 'warn'.")
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=deterministic == "warn")
            cudnn.deterministic = True
            # cuBLAS reads this when its handle is made: set before the first CUDA matmul
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if benchmark is not None:
            cudnn.benchmark = bool(benchmark)
        elif deterministic:
            cudnn.benchmark = False
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]
