"""0.9 structured results: ``TrainResult`` and ``EvalResult``.

A Result is a ``dict``: every logged value and every reserved value (``minimize``,
``checkpoint_on``, ``early_stop_on``, ``hiddens``) is an item, and the item ``meta`` records how
each key is logged. The loop reads a Result through the ``*_metrics`` views below; the epoch-end
``gather`` and ``reduce_on_epoch`` helpers implement spec §1.4 and §1.6 with ray_lit's decisions:
epoch means are weighted by the true batch size, a zero ``checkpoint_on`` tensor is kept, and
``sync_dist`` reduces a clone so the caller's tensor is never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ray_lit.core import collectives
from ray_lit.errors import MisconfigurationException

_RESERVED = ("minimize", "checkpoint_on", "early_stop_on", "hiddens")
_META = "meta"


class Result(dict):
    """Base of ``TrainResult`` and ``EvalResult``: a dict of values plus per-key log options."""

    _LOG_ON_STEP = False
    _LOG_ON_EPOCH = True
    _LOG_DICT_ON_STEP = False
    _LOG_DICT_ON_EPOCH = True

    def __init__(
        self,
        minimize: torch.Tensor | None = None,
        early_stop_on: torch.Tensor | None = None,
        checkpoint_on: torch.Tensor | bool | None = None,
        hiddens: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        dict.__setitem__(self, _META, {"_internal": {"_reduce_on_epoch": False, "batch_sizes": []}})
        if minimize is not None:
            if not isinstance(minimize, torch.Tensor) or minimize.grad_fn is None:
                raise AssertionError(
                    "TrainResult(minimize=...) needs a tensor with a graph: minimize can only be "
                    "used in training_step, training_step_end and training_epoch_end."
                )
            self.minimize = minimize
            if checkpoint_on is None:
                checkpoint_on = minimize.detach()
        # DECISION (spec §1.2): any tensor counts, even one equal to 0; only False/None drop it.
        if checkpoint_on is not None and checkpoint_on is not False:
            self.checkpoint_on = checkpoint_on
        if early_stop_on is not None:
            self.early_stop_on = early_stop_on
        if hiddens is not None:
            self.hiddens = hiddens

    # --- dict with attribute access ----------------------------------------------------------
    def __setattr__(self, key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor) and key != "minimize":
            value = value.detach()
        self[key] = value

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        return self.get(key)  # a missing attribute reads as None, as in 0.9

    def __getitem__(self, key: str) -> Any:
        if key not in self and f"step_{key}" in self:
            key = f"step_{key}"
        return dict.__getitem__(self, key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({ {k: v for k, v in self.items() if k != _META} })"

    __str__ = __repr__

    def __reduce__(self):
        return (_rebuild, (type(self), dict(self)))

    def __copy__(self) -> Result:
        new = _rebuild(type(self), {})
        for k, v in self.items():
            dict.__setitem__(new, k, copy.copy(v) if k == _META else v)
        return new

    copy = __copy__

    @property
    def meta(self) -> dict:
        return dict.__getitem__(self, _META)

    # --- logging -----------------------------------------------------------------------------
    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool = True,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: Callable = torch.mean,
        tbptt_reduce_fx: Callable = torch.mean,
        tbptt_pad_token: int = 0,
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_op: Any = "mean",
        sync_dist_group: Any = None,
    ) -> None:
        """Log ``value`` under ``name``; both ``on_step`` and ``on_epoch`` give two keys
        ``step_<name>`` and ``epoch_<name>`` (0.9 naming)."""
        on_step = self._LOG_ON_STEP if on_step is None else on_step
        on_epoch = self._LOG_ON_EPOCH if on_epoch is None else on_epoch
        if not isinstance(value, (torch.Tensor, int, float)):
            _refuse_torchmetrics(type(self).__name__, name, value)
        if isinstance(value, torch.Tensor) and not enable_graph:
            value = value.detach()
        if sync_dist and isinstance(value, (torch.Tensor, int, float)):
            value = collectives.sync_value(value, sync_dist_op, sync_dist_group)
        options = {
            "prog_bar": prog_bar, "logger": logger, "reduce_fx": reduce_fx,
            "tbptt_reduce_fx": tbptt_reduce_fx, "tbptt_pad_token": tbptt_pad_token,
        }
        if on_step and on_epoch:
            self._set_meta(f"step_{name}", value, on_step=True, on_epoch=False, **options)
            self._set_meta(f"epoch_{name}", value, on_step=False, on_epoch=True, **options)
        else:
            self._set_meta(name, value, on_step=on_step, on_epoch=on_epoch, **options)

    def _set_meta(self, name: str, value: Any, **options: Any) -> None:
        dict.__setitem__(self, name, value)
        self.meta[name] = {**options, "value": value}
        if options["on_epoch"]:
            self.meta["_internal"]["_reduce_on_epoch"] = True

    def log_dict(self, dictionary: dict[str, Any], **kwargs: Any) -> None:
        """``log`` for each item, with the class's ``log_dict`` defaults (epoch-level)."""
        kwargs.setdefault("on_step", self._LOG_DICT_ON_STEP)
        kwargs.setdefault("on_epoch", self._LOG_DICT_ON_EPOCH)
        for name, value in dictionary.items():
            self.log(name, value, **kwargs)

    def rename_keys(self, map_dict: dict[str, str]) -> None:
        """Move items (and their meta) from each source key to its destination key."""
        for src, dst in map_dict.items():
            value = dict.__getitem__(self, src) if src in self else self[src]
            real_src = src if src in self else f"step_{src}"
            dict.__setitem__(self, dst, value)
            if real_src in self.meta:
                self.meta[dst] = self.meta.pop(real_src)
            dict.__delitem__(self, real_src)

    def track_batch_size(self, batch_size: int) -> None:
        self.meta["_internal"]["batch_sizes"].append(batch_size)

    def drop_hiddens(self) -> None:
        self.pop("hiddens", None)

    def detach(self) -> Result:
        for k, v in list(self.items()):
            if isinstance(v, torch.Tensor):
                dict.__setitem__(self, k, v.detach())
        return self

    # --- views the loop reads ----------------------------------------------------------------
    def _select(self, *, logger: bool | None = None, prog_bar: bool | None = None,
                on_step: bool | None = None, on_epoch: bool | None = None) -> dict[str, Any]:
        out = {}
        for key, opts in self.meta.items():
            if key == "_internal" or key not in self:
                continue
            if logger is not None and opts["logger"] != logger:
                continue
            if prog_bar is not None and opts["prog_bar"] != prog_bar:
                continue
            if on_step is not None and opts["on_step"] != on_step:
                continue
            if on_epoch is not None and opts["on_epoch"] != on_epoch:
                continue
            out[key] = dict.__getitem__(self, key)
        return out

    def batch_log_metrics(self) -> dict[str, Any]:
        return self._select(logger=True, on_step=True)

    def batch_pbar_metrics(self) -> dict[str, Any]:
        return self._select(prog_bar=True, on_step=True)

    def epoch_log_metrics(self) -> dict[str, Any]:
        return self._select(logger=True, on_epoch=True)

    def epoch_pbar_metrics(self) -> dict[str, Any]:
        return self._select(prog_bar=True, on_epoch=True)

    def callback_values(self) -> dict[str, Any]:
        keys = ("checkpoint_on", "early_stop_on")
        return {k: self.get(k) for k in keys if self.get(k) is not None}

    @property
    def should_reduce_on_epoch_end(self) -> bool:
        return bool(self.meta["_internal"]["_reduce_on_epoch"])


class TrainResult(Result):
    """Returned from ``training_step``: ``minimize`` is the loss that is backpropagated.

    ``log`` defaults to step-level, ``log_dict`` to epoch-level (as in 0.9, spec §1.3).
    """

    _LOG_ON_STEP = True
    _LOG_ON_EPOCH = False
    _LOG_DICT_ON_STEP = False
    _LOG_DICT_ON_EPOCH = True

    def __init__(
        self,
        minimize: torch.Tensor | None = None,
        early_stop_on: torch.Tensor | None = None,
        checkpoint_on: torch.Tensor | bool | None = None,
        hiddens: torch.Tensor | None = None,
    ) -> None:
        super().__init__(minimize, early_stop_on, checkpoint_on, hiddens)


class EvalResult(Result):
    """Returned from ``validation_step`` / ``test_step``; ``log`` defaults to epoch-level."""

    def __init__(
        self,
        early_stop_on: torch.Tensor | None = None,
        checkpoint_on: torch.Tensor | bool | None = None,
        hiddens: torch.Tensor | None = None,
    ) -> None:
        super().__init__(None, early_stop_on, checkpoint_on, hiddens)

    def write(self, name: str, values: Any, filename: str = "predictions.pt") -> None:
        """Collect a prediction column; ``trainer.test`` writes the columns to ``filename``."""
        predictions = self.setdefault("predictions", {})
        column = predictions.setdefault(filename, {}).setdefault(name, [])
        column.extend(values if isinstance(values, list) else [values])

    def write_dict(self, values: dict[str, Any], filename: str = "predictions.pt") -> None:
        for name, value in values.items():
            self.write(name, value, filename)


def _refuse_torchmetrics(result_class: str, name: str, value: Any) -> None:
    """0.9 Results reduce stacked per-batch values, which a ``torchmetrics.Metric`` (an object
    with its own state) is not: name the 2.x API that supports it."""
    from ray_lit.core.metric_store import _is_collection, as_torchmetric

    if as_torchmetric(value) is not None or _is_collection(value):
        raise MisconfigurationException(
            f"{result_class}.log({name!r}, ...) got a torchmetrics {type(value).__name__}; 0.9 "
            "Results log numbers and tensors only. Log the metric with self.log(name, metric) "
            "(or self.log_dict(collection)), or log metric(preds, target)'s tensor here."
        )


def _rebuild(cls: type, items: dict) -> Result:
    obj = dict.__new__(cls)
    dict.update(obj, items)
    if _META not in obj:
        dict.__setitem__(obj, _META, {"_internal": {"_reduce_on_epoch": False, "batch_sizes": []}})
    return obj


# --- epoch-end helpers --------------------------------------------------------------------------
def _stack(values: list[Any], for_training: bool) -> Any:
    if all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in values):
        stacked = torch.stack([v.float() for v in values])
        return stacked.unsqueeze(-1) if for_training else stacked
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        stacked = torch.tensor(values, dtype=torch.float)
        return stacked.unsqueeze(-1) if for_training else stacked
    if all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in values) and len(
        {tuple(v.shape[1:]) for v in values}
    ) == 1:
        return torch.cat(values, dim=0)
    return list(values)


def gather(outputs: list[Result], for_training: bool = False) -> Result:
    """Gather per-batch Results into one Result of the same class (spec §1.6).

    Scalars are stacked (``[N, 1]`` for training, ``[N]`` for evaluation), tensors with equal
    trailing shape are concatenated on dim 0, anything else becomes a list. Evaluation's
    ``checkpoint_on`` / ``early_stop_on`` are already reduced to their plain mean.
    """
    first = outputs[0]
    result = _rebuild(type(first), {})
    result.meta.update(copy.deepcopy({k: v for k, v in first.meta.items() if k != "_internal"}))
    sizes = [s for o in outputs for s in o.meta["_internal"]["batch_sizes"]]
    result.meta["_internal"] = {"_reduce_on_epoch": first.should_reduce_on_epoch_end,
                                "batch_sizes": sizes}
    # training_epoch_end sees ``outputs.minimize``: the batch losses, stacked and detached
    # (0.9's gather kept every key but ``hiddens``; the graph is not kept alive past its step)
    keys = [k for k in first if k not in (_META, "hiddens")]
    for key in keys:
        values = [dict.__getitem__(o, key) for o in outputs if key in o]
        if key == "minimize":
            values = [v.detach() if isinstance(v, torch.Tensor) else v for v in values]
        if not for_training and key in ("checkpoint_on", "early_stop_on"):
            dict.__setitem__(result, key, torch.stack([torch.as_tensor(v).float().mean()
                                                       for v in values]).mean())
        else:
            dict.__setitem__(result, key, _stack(values, for_training))
    return result


def weighted_mean(values: torch.Tensor, batch_sizes: list[int]) -> torch.Tensor:
    """Σ value·bs / Σ bs in float; a plain mean when the sizes do not line up."""
    values = values.float().reshape(-1)
    if len(batch_sizes) != values.numel() or not batch_sizes:
        return values.mean()
    weights = torch.tensor(batch_sizes, dtype=torch.float, device=values.device)
    return (values * weights).sum() / weights.sum()


def reduce_on_epoch(outputs: list[Result]) -> Result:
    """Auto-reduce the on_epoch keys of per-batch Results (no ``*_epoch_end`` override).

    ``reduce_fx is torch.mean`` gives the batch-size weighted mean; any other callable gets the
    stacked vector. ``checkpoint_on`` / ``early_stop_on`` are plain means.
    """
    first = outputs[0]
    result = _rebuild(type(first), {})
    sizes = [o.meta["_internal"]["batch_sizes"][-1] if o.meta["_internal"]["batch_sizes"] else 1
             for o in outputs]
    for key, opts in first.meta.items():
        if key == "_internal" or not opts.get("on_epoch"):
            continue
        values = [dict.__getitem__(o, key) for o in outputs if key in o]
        if not values:
            continue
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float).reshape(()) for v in values])
        fx = opts["reduce_fx"]
        value = weighted_mean(stacked, sizes[: len(values)]) if fx is torch.mean else fx(stacked)
        dict.__setitem__(result, key, value)
        result.meta[key] = {**opts, "value": value}
    for key in ("checkpoint_on", "early_stop_on"):
        values = [dict.__getitem__(o, key) for o in outputs if o.get(key) is not None]
        if values:
            means = torch.stack([torch.as_tensor(v).float().mean() for v in values])
            dict.__setitem__(result, key, means.mean())
    return result
