"""Reductions across ranks used by ``sync_dist`` (``Result.log`` and ``self.log``).

Plain torch.distributed: a no-op when no process group is initialised (``num_workers=0``). Every
rank must call these for the same keys in the same order (each one is a collective).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "mean": "SUM", "avg": "SUM", "prod": "PRODUCT"}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _op_name(op: Any) -> str:
    if isinstance(op, str):
        name = op.lower()
    elif op in (torch.mean, "mean"):
        name = "mean"
    elif op is torch.sum:
        name = "sum"
    elif op is torch.max:
        name = "max"
    elif op is torch.min:
        name = "min"
    else:
        return str(op)
    if name not in _OPS:
        raise ValueError(f"sync_dist_op={op!r} is not supported; use one of {sorted(_OPS)}.")
    return name


def sync_value(value: Any, op: Any = "mean", group: Any = None) -> Any:
    """All-reduce a clone of ``value`` (the caller's tensor is never changed).

    Args:
        value: a tensor or a Python number.
        op: "mean" / "avg" (sum then divide by world size), "sum", "max", "min", a
            ``torch.distributed.ReduceOp``, or torch.mean / torch.sum / torch.max / torch.min.
        group: the process group (default: the world).
    """
    if not is_distributed():
        return value
    tensor = torch.as_tensor(value).detach().clone()
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if isinstance(op, dist.ReduceOp) or type(op).__name__ == "RedOpType":
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    name = _op_name(op)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[name]), group=group)
    if name in ("mean", "avg"):
        tensor = tensor / dist.get_world_size(group)
    return tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
