"""Batches: moving a nested batch to a device (used by the module, the data module and the loop)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor in a nested batch (lists, tuples, namedtuples, dicts) to ``device``.

    Objects with a ``.to(device)`` method (custom batch classes) are moved through it. CPU to
    CUDA copies are non-blocking (pinned memory makes them asynchronous).
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()}) \
            if type(batch) is not dict else {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    to = getattr(batch, "to", None)
    if callable(to):
        moved = to(device)
        return batch if moved is None else moved
    return batch
