"""What a step or epoch-end hook returned, turned into a loss and metrics (spec §1.4-1.9).

Three kinds of return value meet here: 0.9 Results, 0.9 dicts (``loss``, ``log``,
``progress_bar``) and plain tensors. Each is turned into a ``StepOutput``: the loss to
backpropagate (training), the metrics for the logger and the progress bar, the callback
candidates, and the detached copy kept for ``*_epoch_end``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_lit.core.results import EvalResult, Result, TrainResult
from ray_lit.errors import MisconfigurationException

_SPECIAL = ("log", "progress_bar", "hiddens")


@dataclass
class StepOutput:
    """A step's return value, normalised."""

    raw: Any
    loss: torch.Tensor | None = None
    log: dict[str, Any] = field(default_factory=dict)
    pbar: dict[str, Any] = field(default_factory=dict)
    callback: dict[str, Any] = field(default_factory=dict)
    kept: Any = None
    is_result: bool = False


def detach_all(value: Any) -> Any:
    """A detached copy of tensors inside dicts, lists and tuples (Results keep their class)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, Result):
        copy = value.copy()
        copy.drop_hiddens()
        return copy.detach()
    if isinstance(value, Mapping):
        return {k: detach_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detach_all(v) for v in value) if not hasattr(value, "_fields") \
            else type(value)(*(detach_all(v) for v in value))
    return value


def flatten(d: Mapping[str, Any], out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nested dicts flattened; the parent key names are dropped, as 0.9 does (trap 7.6)."""
    out = {} if out is None else out
    for key, value in d.items():
        if isinstance(value, Mapping):
            flatten(value, out)
        else:
            out[key] = value
    return out


def _dict_output(out: Mapping[str, Any]) -> StepOutput:
    log = dict(out.get("log") or {})
    pbar = dict(out.get("progress_bar") or {})
    callback = {k: v for k, v in out.items() if k not in _SPECIAL}
    callback = flatten(detach_all(callback))
    callback.update(detach_all(log))
    callback.update(detach_all(pbar))
    return StepOutput(raw=out, log=detach_all(log), pbar=detach_all(pbar), callback=callback,
                      kept=detach_all({k: v for k, v in out.items() if k != "hiddens"}))


def training_output(out: Any, hook: str = "training_step") -> StepOutput:
    """Normalise a training step's (or ``training_step_end``'s) return value."""
    if out is None:
        return StepOutput(raw=None)
    if isinstance(out, EvalResult):
        raise MisconfigurationException(
            f"{hook} returned an EvalResult; training steps return a TrainResult, a loss "
            "tensor or a dict with 'loss'."
        )
    if isinstance(out, TrainResult):
        if out.get("minimize") is None:
            raise MisconfigurationException(
                f"{hook} returned a TrainResult without minimize: pass the loss as "
                "TrainResult(minimize=loss)."
            )
        return StepOutput(raw=out, loss=out["minimize"], log=out.batch_log_metrics(),
                          pbar=out.batch_pbar_metrics(), callback=out.callback_values(),
                          kept=detach_all(out), is_result=True)
    if isinstance(out, torch.Tensor):
        return StepOutput(raw=out, loss=out, kept=out.detach())
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise MisconfigurationException(
                f"{hook} returned a dict without 'loss' (keys: {sorted(out)}). Put the loss "
                "to backpropagate under 'loss'."
            )
        step = _dict_output(out)
        step.loss = out["loss"]
        return step
    raise MisconfigurationException(
        f"{hook} returned {type(out).__name__}; return a loss tensor, a dict with 'loss', a "
        "TrainResult, or None to skip the batch."
    )


def eval_output(out: Any, hook: str) -> StepOutput | None:
    """Normalise a validation/test step's return value (None: nothing collected)."""
    if out is None:
        return None
    if isinstance(out, Result) and not isinstance(out, EvalResult):
        raise MisconfigurationException(
            f"{hook} returned a {type(out).__name__}; evaluation steps return an EvalResult, a "
            "tensor, a dict or nothing."
        )
    if isinstance(out, EvalResult):
        return StepOutput(raw=out, log=out.batch_log_metrics(), pbar=out.batch_pbar_metrics(),
                          callback=out.callback_values(), kept=out, is_result=True)
    if isinstance(out, torch.Tensor):
        return StepOutput(raw=out, callback={"val_loss": out.detach()}, kept=out.detach())
    if isinstance(out, Mapping):
        return _dict_output(out)
    return StepOutput(raw=out, kept=out)


def epoch_end_output(out: Any) -> StepOutput | None:
    """What a ``*_epoch_end`` hook returned: a Result, a dict, or None."""
    if out is None:
        return None
    if isinstance(out, Result):
        return StepOutput(raw=out, log=out.epoch_log_metrics(), pbar=out.epoch_pbar_metrics(),
                          callback={}, is_result=True)
    if isinstance(out, torch.Tensor):
        return StepOutput(raw=out, callback={"val_loss": out.detach()})
    if isinstance(out, Mapping):
        return _dict_output(out)
    raise MisconfigurationException(
        f"An *_epoch_end hook returned {type(out).__name__}; return a Result, a dict or None."
    )


def to_float(value: Any) -> Any:
    """Python number for a logged value (one host sync per call for a tensor)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.detach().float().mean().item()
    return value


def floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Every value that is a number or a one-element tensor, as a float."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                out[key] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out
