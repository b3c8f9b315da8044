"""A ``torch.distributed.checkpoint`` (DCP) directory written without collectives in the write.

``dcp.save`` is COLLECTIVE from start to end: it gathers the ranks' plans, writes, then
gathers every rank's write results so that rank 0 can write ``.metadata``. A fault-tolerance
checkpoint is written by a background thread on each rank while training goes on, and that
thread cannot share the training process group with the loop. So the save is cut in three:

1. ``plan_shards`` (loop thread, every rank, at the checkpoint's step boundary, COLLECTIVE: one
   small ``all_gather_object`` of the plans): DCP's own planner plans every rank's part from
   the live DTensors (only shapes and placements are read), the global plan and the
   checkpoint's ``Metadata`` are computed from all plans, the same on every rank.
   ``ShardPlanner`` keeps the plan: later checkpoints gather one number per rank (its
   layout's signature) and reuse it while no rank's layout changed.
2. ``write_shards`` (any thread, each rank alone): this rank's chunks, from its host copies,
   into its ``__<rank>_0.distcp`` file; returns DCP's write results (file, offset, length).
3. ``metadata_bytes`` (whoever holds every rank's write results: the driver, at commit): the
   ``.metadata`` file, exactly as ``FileSystemWriter.finish`` writes it.

The directory is DCP's standard layout, so ``dcp.load``, ``format_utils.dcp_to_torch_save`` and
``storage.sharded_io`` read it like one written by ``dcp.save``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ShardPlan", "ShardPlanner", "flat_local_tensors", "local_tensors", "metadata_bytes",
           "plan_shards", "write_shards"]


@dataclass
class ShardPlan:
    """One rank's part of a DCP save, planned at the step boundary.

    Attributes:
        tensors: flat DCP key -> the tensor this rank writes from (a DTensor's local shard,
            or a plain tensor), on its device; the caller copies them to host memory.
        plan: this rank's final DCP ``SavePlan`` (its chunks, its file prefix).
        metadata: the checkpoint's ``Metadata`` without storage data (rank 0 keeps it; it is
            the same on every rank).
    """

    tensors: dict[str, torch.Tensor]
    plan: Any
    metadata: Any


def _gather(obj: Any, world_size: int) -> list[Any]:
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def local_tensors(flat: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Each DTensor of a flat state as its local shard (same storage); other tensors as is."""
    from torch.distributed.tensor import DTensor

    return {k: (v.to_local() if isinstance(v, DTensor) else v).detach()
            for k, v in flat.items() if isinstance(v, torch.Tensor)}


def flat_local_tensors(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``tensors`` flattened to DCP's keys, each DTensor as its local shard (no I/O, no
    communication): what ``plan_shards`` would put in ``ShardPlan.tensors``."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    planner = DefaultSavePlanner()
    planner.set_up_planner(state_dict=tensors, storage_meta=None, is_coordinator=False)
    return local_tensors(planner.state_dict)


def _signature(flat: dict[str, Any]) -> int:
    """What a rank's DCP plan depends on (keys, shapes, dtypes, placements), as a number that
    is the same in every process for the same layout (``crc32``, not the salted ``hash``)."""
    import zlib

    parts = [f"{k}|{tuple(v.shape)}|{v.dtype}|{getattr(v, 'placements', '')}|"
             f"{tuple(getattr(v, '_local_tensor', v).shape)}" for k, v in flat.items()
             if isinstance(v, torch.Tensor)]
    return zlib.crc32("\n".join(parts).encode())


def _gather_signatures(signature: int, world_size: int) -> list[int]:
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [signature]
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    mine = torch.tensor([signature], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


class ShardPlanner:
    """``plan_shards`` with the plan kept between checkpoints of one attempt: the layout of
    the shards does not change from one checkpoint to the next, so after the first one every
    rank only gathers one number (its layout's signature) and reuses the plan when every
    rank's signature is the one planned for. COLLECTIVE like ``plan_shards``: every rank calls
    ``plan`` at the same point."""

    def __init__(self) -> None:
        self._key: list[int] | None = None
        self._plan: ShardPlan | None = None

    def plan(self, tensors: dict[str, Any], rank: int, world_size: int) -> ShardPlan:
        """This rank's ``ShardPlan`` of ``tensors`` (see ``plan_shards``)."""
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        planner = DefaultSavePlanner()
        planner.set_up_planner(state_dict=tensors, storage_meta=None, is_coordinator=rank == 0)
        key = _gather_signatures(_signature(planner.state_dict), world_size)
        if key == self._key and self._plan is not None:
            return ShardPlan(local_tensors(planner.state_dict), self._plan.plan,
                             self._plan.metadata)
        self._plan = _plan(planner, rank, world_size)
        self._key = key
        return self._plan


def plan_shards(tensors: dict[str, Any], rank: int, world_size: int) -> ShardPlan:
    """Plan this rank's part of a DCP save of ``tensors`` (nested dicts of tensors and
    DTensors, no other values).

    COLLECTIVE when ``world_size > 1``: every rank calls it at the same point (one
    ``all_gather_object`` of the plans over the default process group).

    Args:
        tensors: the state to save, this rank's DTensors (nothing is copied or gathered).
        rank: this rank.
        world_size: the number of ranks.

    Returns:
        The ``ShardPlan``.
    """
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    planner = DefaultSavePlanner()
    planner.set_up_planner(state_dict=tensors, storage_meta=None, is_coordinator=rank == 0)
    return _plan(planner, rank, world_size)


def _plan(planner: Any, rank: int, world_size: int) -> ShardPlan:
    """The plan of a planner already set up with this rank's state (COLLECTIVE)."""
    from torch.distributed.checkpoint import FileSystemWriter

    local = planner.create_local_plan()
    plans, metadata = planner.create_global_plan(_gather(local, world_size))
    # FileSystemWriter names each rank's file "__<rank>_0.distcp" here (no I/O: the path is
    # never used)
    plans = FileSystemWriter(tempfile.gettempdir()).prepare_global_plan(plans)
    final = planner.finish_plan(plans[rank])
    return ShardPlan(local_tensors(planner.state_dict), final, metadata)


class _HostPlanner:
    """What ``FileSystemWriter.write_data`` needs of a planner: each write item's data,
    here the host copy of this rank's local tensor (a DTensor's shard is one chunk)."""

    def __init__(self, host: dict[str, torch.Tensor]) -> None:
        self.host = host

    def resolve_data(self, write_item: Any) -> Any:
        return self.host[write_item.index.fqn]


def write_shards(plan: ShardPlan, host: dict[str, torch.Tensor], directory: str) -> list[Any]:
    """Write this rank's chunks (``host``: ``plan.tensors`` copied to host memory) into its
    shard file in the local ``directory`` (created if needed). Any thread; no process group.

    Returns:
        DCP's ``WriteResult`` list of this rank (what ``metadata_bytes`` needs).
    """
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(directory, sync_files=False)
    os.makedirs(directory, exist_ok=True)
    future = writer.write_data(plan.plan, _HostPlanner(host))  # type: ignore[arg-type]
    future.wait()
    return list(future.value())


def metadata_bytes(metadata: Any, results: list[list[Any]]) -> bytes:
    """The ``.metadata`` file of a DCP directory from its ``Metadata`` (``ShardPlan.metadata``)
    and every rank's write results, written by DCP's own ``FileSystemWriter.finish``."""
    import copy

    from torch.distributed.checkpoint import FileSystemWriter

    with tempfile.TemporaryDirectory(prefix="ray_lit_dcp_meta_") as tmp:
        writer = FileSystemWriter(tmp, sync_files=False)
        writer.set_up_storage_writer(True)
        writer.finish(copy.copy(metadata), results)
        with open(os.path.join(tmp, ".metadata"), "rb") as src:
            return src.read()
