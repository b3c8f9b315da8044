"""The metric store behind ``self.log`` (2.x API, spec §2).

One store per running loop stage (train, validate, test, sanity check). ``log`` records a value
under its 2.x name with the per-hook defaults of spec §2.2; the loop asks for the step view after
each batch and the epoch view at epoch end. Values stay tensors: nothing here calls ``.item()``
(no host sync per step); the loop converts only what it shows or logs.

A ``torchmetrics.Metric`` may be logged too, as in Lightning 2.x: its step value is what its
last ``forward`` returned (``_forward_cache``), its epoch value is ``compute()`` (which syncs
across ranks by itself, so nothing here reduces it again), and it is ``reset()`` once the epoch
value is taken. torchmetrics stays optional: it is never imported here; a value is a Metric
only if torchmetrics is already imported (the user made one) and the value is an instance.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_lit.core import collectives
from ray_lit.errors import MisconfigurationException

# hook -> (default on_step, default on_epoch, on_step allowed)
_STEP = (True, False, True)
_EVAL_STEP = (False, True, True)
_EPOCH = (False, True, False)
HOOK_DEFAULTS: dict[str, tuple[bool, bool, bool]] = {
    **dict.fromkeys(
        ["training_step", "training_step_end", "on_train_batch_start", "on_train_batch_end",
         "on_batch_start", "on_batch_end", "on_before_backward", "backward", "on_after_backward",
         "on_before_optimizer_step", "optimizer_step", "on_before_zero_grad",
         "optimizer_zero_grad", "configure_gradient_clipping"], _STEP),
    **dict.fromkeys(
        ["validation_step", "validation_step_end", "test_step", "test_step_end",
         "on_validation_batch_start", "on_validation_batch_end", "on_test_batch_start",
         "on_test_batch_end"], _EVAL_STEP),
    **dict.fromkeys(
        ["on_train_start", "on_validation_start", "on_test_start", "on_train_epoch_start",
         "on_train_epoch_end", "on_validation_epoch_start", "on_validation_epoch_end",
         "on_test_epoch_start", "on_test_epoch_end", "on_epoch_start", "on_epoch_end",
         "training_epoch_end", "validation_epoch_end", "test_epoch_end"], _EPOCH),
}

_REDUCE = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


def _reduce_name(reduce_fx: str | Callable) -> str:
    if isinstance(reduce_fx, str) and reduce_fx.lower() in _REDUCE:
        return _REDUCE[reduce_fx.lower()]
    for name, fn in (("mean", torch.mean), ("sum", torch.sum), ("max", torch.max),
                     ("min", torch.min)):
        if reduce_fx is fn:
            return name
    raise MisconfigurationException(
        f"self.log(reduce_fx={reduce_fx!r}) is not supported: use 'mean', 'sum', 'max' or 'min'."
    )


def to_scalar_tensor(name: str, value: Any) -> torch.Tensor:
    """A logged value as a 0-dim float tensor, or a clear error naming the metric."""
    if isinstance(value, bool):
        value = float(value)
    if isinstance(value, (int, float)):
        return torch.tensor(float(value))
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise MisconfigurationException(
                f"self.log({name!r}, ...) got a tensor of shape {tuple(value.shape)}; log a "
                "scalar (reduce it first, e.g. value.mean())."
            )
        if value.dim():
            value = value.reshape(())
        return value if value.is_floating_point() else value.float()
    if isinstance(value, Mapping):
        raise MisconfigurationException(
            f"self.log({name!r}, ...) got a dict; use self.log_dict for several values."
        )
    raise MisconfigurationException(
        f"self.log({name!r}, ...) got a {type(value).__name__}; log a Python number or a "
        "one-element tensor."
    )


def _torchmetrics_class(name: str) -> type | None:
    """``torchmetrics.<name>`` if the user already imported torchmetrics, else None.

    Never imports torchmetrics: whoever holds a Metric object has imported it already.
    """
    module = sys.modules.get("torchmetrics")
    return getattr(module, name, None) if module is not None else None


def as_torchmetric(value: Any) -> Any:
    """``value`` if it is a ``torchmetrics.Metric`` (not a MetricCollection), else None."""
    metric_cls = _torchmetrics_class("Metric")
    if metric_cls is not None and isinstance(value, metric_cls):
        return value
    return None


def dict_items(dictionary: Any) -> Iterable[tuple[str, Any]]:
    """The ``(name, value)`` pairs ``self.log_dict`` logs.

    A ``torchmetrics.MetricCollection`` gives its members under their prefixed/postfixed names,
    with the states of a compute group passed by reference (as Lightning does: copying them
    each step would cost a deep copy per batch, and compute/reset work on the shared state).
    """
    collection_cls = _torchmetrics_class("MetricCollection")
    if collection_cls is not None and isinstance(dictionary, collection_cls):
        kwargs = {"keep_base": False}
        if getattr(dictionary, "_enable_compute_groups", False):
            kwargs["copy_state"] = False
        return list(dictionary.items(**kwargs))
    return list(dictionary.items())


def _is_collection(value: Any) -> bool:
    collection_cls = _torchmetrics_class("MetricCollection")
    return collection_cls is not None and isinstance(value, collection_cls)


def infer_batch_size(batch: Any) -> int:
    """Size of dim 0 of the first tensor found in ``batch`` (1 if none), as 2.x does."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, Mapping):
        for value in batch.values():
            size = infer_batch_size(value)
            if size:
                return size
        return 1
    if isinstance(batch, (list, tuple)):
        for value in batch:
            size = infer_batch_size(value)
            if size:
                return size
        return 1
    return 1


@dataclass
class _Metric:
    """One logged name: its options, the latest step value and the epoch accumulator.

    For a logged ``torchmetrics.Metric`` (``source``), the metric object itself accumulates:
    ``value`` is its forward value of the batch, and ``computed`` caches its ``compute()`` at
    epoch end (taken once, then the source is reset).
    """

    name: str
    fx: str
    on_step: bool
    on_epoch: bool
    prog_bar: bool
    logger: bool
    reduce: str
    sync_dist: bool
    sync_dist_group: Any
    value: torch.Tensor | None = None
    total: torch.Tensor | None = None
    weight: float = 0.0
    updated: bool = field(default=False)
    source: Any = None
    computed: torch.Tensor | None = None
    source_reset: bool = False

    def update_source(self, source: Any, enable_graph: bool) -> None:
        """A logged torchmetrics Metric: its batch value is its last ``forward`` result.

        ``None`` when the user called ``update()`` only: then there is no step value (as in
        Lightning), the epoch value still comes from ``compute()``.
        """
        self.source = source
        self.source_reset = False
        self.computed = None
        cache = getattr(source, "_forward_cache", None)
        if cache is None:
            return
        value = _metric_tensor(self.name, cache, "forward value")
        self.value = value if enable_graph else value.detach()
        self.updated = True

    def update(self, value: torch.Tensor, batch_size: int) -> None:
        self.value = value
        self.updated = True
        if not self.on_epoch:
            return
        detached = value.detach()
        if self.total is None:
            self.total = detached * batch_size if self.reduce == "mean" else detached.clone()
        elif self.reduce == "mean":
            self.total = self.total + detached * batch_size
        elif self.reduce == "sum":
            self.total = self.total + detached
        elif self.reduce == "max":
            self.total = torch.maximum(self.total, detached)
        else:
            self.total = torch.minimum(self.total, detached)
        self.weight += batch_size

    def epoch_value(self) -> torch.Tensor | None:
        if self.source is not None:
            return self._source_epoch_value()
        if self.total is None:
            return None
        total, weight = self.total, torch.tensor(self.weight, device=self.total.device)
        if self.sync_dist and collectives.is_distributed():
            # mean: reduce Σv·bs and Σbs separately so the result is the global weighted mean
            if self.reduce == "mean":
                packed = collectives.sync_value(torch.stack([total.float(), weight.float()]),
                                                "sum", self.sync_dist_group)
                return packed[0] / packed[1]
            total = collectives.sync_value(total, self.reduce, self.sync_dist_group)
        return total / weight if self.reduce == "mean" else total

    def _source_epoch_value(self) -> torch.Tensor | None:
        """``compute()`` of the logged Metric, once per epoch (``epoch_views`` resets it after).

        COLLECTIVE in DDP: torchmetrics gathers the states of every rank inside ``compute()``
        (no extra reduction here). Cached, so reading the epoch views twice (the eval loop's
        per-dataloader results) neither computes nor syncs twice.
        """
        if self.computed is None and not self.source_reset:
            value = _metric_tensor(self.name, self.source.compute(), "compute() value")
            self.computed = value.detach()
        return self.computed

    def reset_source(self) -> None:
        """End of the epoch for a logged Metric: reset it (once), as Lightning does."""
        if self.source is not None and not self.source_reset:
            self.source.reset()
            self.source_reset = True


def _metric_tensor(name: str, value: Any, what: str) -> torch.Tensor:
    """A Metric's forward or compute value as a 0-dim float tensor, or an error naming it."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise MisconfigurationException(
            f"self.log({name!r}, metric): the metric's {what} is {shape}, not a scalar. Log a "
            "metric that computes one number (e.g. average='micro'), or log its parts with "
            "self.log_dict."
        )
    value = value.reshape(()) if value.dim() else value
    return value if value.is_floating_point() else value.float()


class MetricStore:
    """Values logged with ``self.log`` during one stage of the loop.

    The loop sets ``batch`` (for batch-size inference) and ``dataloader_idx`` /
    ``num_dataloaders`` before each batch, and calls ``reset`` at each epoch end.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.metrics: dict[str, _Metric] = {}
        self.batch: Any = None
        self._batch_size: int | None = None
        self.dataloader_idx = 0
        self.num_dataloaders = 1

    def set_batch(self, batch: Any, dataloader_idx: int = 0) -> None:
        self.batch = batch
        self._batch_size = None
        self.dataloader_idx = dataloader_idx

    def _current_batch_size(self) -> int:
        if self._batch_size is None:
            self._batch_size = infer_batch_size(self.batch) if self.batch is not None else 1
        return self._batch_size

    def log(self, fx: str | None, name: str, value: Any, *, prog_bar: bool = False,
            logger: bool | None = None, on_step: bool | None = None,
            on_epoch: bool | None = None, reduce_fx: str | Callable = "mean",
            enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any = None,
            add_dataloader_idx: bool = True, batch_size: int | None = None,
            rank_zero_only: bool = False) -> None:
        """Record ``value``; raises MisconfigurationException for a hook that may not log."""
        if fx not in HOOK_DEFAULTS:
            raise MisconfigurationException(
                f"self.log({name!r}) was called from `{fx}`, where logging is not supported. "
                "Log from a step, batch or epoch hook (see the per-hook table in the docs)."
            )
        default_step, default_epoch, step_allowed = HOOK_DEFAULTS[fx]
        on_step = default_step if on_step is None else on_step
        on_epoch = default_epoch if on_epoch is None else on_epoch
        if on_step and not step_allowed:
            raise MisconfigurationException(
                f"self.log({name!r}, on_step=True) is not allowed in `{fx}`: it runs once per "
                "epoch. Use on_step=False."
            )
        if not on_step and not on_epoch:
            raise MisconfigurationException(
                f"self.log({name!r}, on_step=False, on_epoch=False) would log nothing; set one."
            )
        if "/dataloader_idx_" in name:
            raise MisconfigurationException(
                f"Metric name {name!r} contains '/dataloader_idx_', which ray_lit adds itself."
            )
        # tensors and numbers skip the torchmetrics checks (the per-step fast path)
        if not isinstance(value, (torch.Tensor, int, float)):
            source = as_torchmetric(value)
            if source is not None:
                self._log_source(fx, name, source, prog_bar=prog_bar, logger=logger,
                                 on_step=on_step, on_epoch=on_epoch, enable_graph=enable_graph,
                                 add_dataloader_idx=add_dataloader_idx)
                return
            if _is_collection(value):
                raise MisconfigurationException(
                    f"self.log({name!r}, ...) got a MetricCollection; log it with "
                    "self.log_dict(collection), which logs each member under its own name."
                )
        tensor = to_scalar_tensor(name, value)
        if not enable_graph and tensor.requires_grad:
            tensor = tensor.detach()
        reduce = _reduce_name(reduce_fx)
        if sync_dist and on_step:
            tensor = collectives.sync_value(tensor, reduce, sync_dist_group)
        key = self._key(fx, name, add_dataloader_idx)
        metric = self.metrics.get(key)
        if metric is None:
            metric = _Metric(key, fx, on_step, on_epoch, prog_bar, True if logger is None else
                             logger, reduce, sync_dist, sync_dist_group)
            self.metrics[key] = metric
        elif metric.fx == fx and (metric.on_step, metric.on_epoch, metric.reduce) != (
                on_step, on_epoch, reduce):
            raise MisconfigurationException(
                f"self.log({name!r}) was called twice in `{fx}` with different options."
            )
        elif metric.source is not None:
            raise MisconfigurationException(
                f"self.log({name!r}) got a tensor where a torchmetrics Metric was logged under "
                "the same name before; log one kind of value per name."
            )
        size = batch_size if batch_size is not None else (
            self._current_batch_size() if on_epoch and reduce == "mean" else 1)
        metric.update(tensor, size)

    def _key(self, fx: str, name: str, add_dataloader_idx: bool) -> str:
        """The stored name: ``/dataloader_idx_i`` added for a batch-level hook of a run over
        several dataloaders. Epoch-level hooks (``on_validation_epoch_end``) run once for all
        loaders, so their values keep the plain name, as in Lightning (whose result collection
        has no dataloader index there)."""
        if add_dataloader_idx and self.num_dataloaders > 1 and HOOK_DEFAULTS[fx][2]:
            return f"{name}/dataloader_idx_{self.dataloader_idx}"
        return name

    def _log_source(self, fx: str, name: str, source: Any, *, prog_bar: bool,
                    logger: bool | None, on_step: bool, on_epoch: bool, enable_graph: bool,
                    add_dataloader_idx: bool) -> None:
        """Record a logged ``torchmetrics.Metric`` (on every rank, from the hook that logs it).

        ``reduce_fx``, ``sync_dist`` and ``batch_size`` do not apply (Lightning ignores them
        too): the Metric accumulates its own state and syncs it in ``compute()``.
        """
        key = self._key(fx, name, add_dataloader_idx)
        metric = self.metrics.get(key)
        if metric is None:
            metric = _Metric(key, fx, on_step, on_epoch, prog_bar, True if logger is None else
                             logger, "mean", False, None)
            self.metrics[key] = metric
        elif metric.source is None:  # an existing entry without a source holds tensors
            raise MisconfigurationException(
                f"self.log({name!r}) got a torchmetrics Metric where a tensor was logged under "
                "the same name before; log one kind of value per name."
            )
        elif metric.fx == fx and (metric.on_step, metric.on_epoch) != (on_step, on_epoch):
            raise MisconfigurationException(
                f"self.log({name!r}) was called twice in `{fx}` with different options."
            )
        metric.update_source(source, enable_graph)

    # --- views -----------------------------------------------------------------------------
    def step_views(self) -> tuple[dict, dict, dict]:
        """(logger, progress bar, callback) metrics of the batch just finished."""
        log, pbar, callback = {}, {}, {}
        for key, m in self.metrics.items():
            if not m.on_step or not m.updated:
                continue
            forked = f"{key}_step" if m.on_epoch else key
            if m.logger:
                log[forked] = m.value
            if m.prog_bar:
                pbar[forked] = m.value
            callback[forked] = m.value
            callback[key] = m.value
        for m in self.metrics.values():
            m.updated = False
        return log, pbar, callback

    def epoch_views(self, dataloader_idx: int | None = None) -> tuple[dict, dict, dict]:
        """(logger, progress bar, callback) metrics at epoch end; ``sync_dist`` reductions run
        here, so every rank must call this at the same point."""
        log, pbar, callback = {}, {}, {}
        for key, m in self.metrics.items():
            if not m.on_epoch:
                continue
            if dataloader_idx is not None and self.num_dataloaders > 1 and \
                    "/dataloader_idx_" in key and not key.endswith(
                        f"/dataloader_idx_{dataloader_idx}"):
                continue  # another loader's metric; unsuffixed ones belong to every loader
            value = m.epoch_value()
            if value is None:
                continue
            forked = f"{key}_epoch" if m.on_step else key
            if m.logger:
                log[forked] = value
            if m.prog_bar:
                pbar[forked] = value
            callback[forked] = value
            callback[key] = value
        # the epoch is over: reset the Metrics whose value was taken, and those logged on_step
        # only, as Lightning does. After all computes, not each after its own: one Metric object
        # logged under two names (two dataloaders) gives both the same value.
        for m in self.metrics.values():
            if m.computed is not None or not m.on_epoch:
                m.reset_source()
        return log, pbar, callback

    def reset(self) -> None:
        """End of the epoch: forget the logged values; Metrics not yet reset are reset here."""
        for m in self.metrics.values():
            m.reset_source()
        self.metrics.clear()
