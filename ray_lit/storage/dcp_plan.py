"""A ``torch.distributed.checkpoint`` (DCP) directory written without collectives in the write.

``dcp.save`` is COLLECTIVE from start to end: it gathers the ranks' plans, writes, then
gathers every rank's write results so that rank 0 can write ``.metadata``. A fault-tolerance
checkpoint is written by a background thread on each rank while training goes on, and that
thread cannot share the training process group with the loop. So the save is cut in three:

1. ``plan_shards`` (loop thread, every rank, at the checkpoint's step boundary, COLLECTIVE: one
   small ``all_gather_object`` of the plans): DCP's own planner plans every rank's part from
   the live DTensors (only shapes and placements are read), the global plan and the
   checkpoint's ``Metadata`` are computed from all plans, the same on every rank.
   ``ShardPlanner`` (what the fault-tolerance writer uses) makes the same plan, but returns
   at the boundary at once (``DeferredShardPlan``): its gathers run in a background thread
   through the process group's key-value store instead of the process group, so the loop does
   not wait for the slowest rank to arrive, and the writer thread waits for the plan before it
   writes. It keeps the plan: later checkpoints gather one number per rank (its layout's
   signature) and reuse it while no rank's layout changed.
2. ``write_shards`` (any thread, each rank alone): this rank's chunks, from its host copies,
   into its ``__<rank>_0.distcp`` file; returns DCP's write results (file, offset, length).
3. ``metadata_bytes`` (whoever holds every rank's write results: the driver, at commit): the
   ``.metadata`` file, exactly as ``FileSystemWriter.finish`` writes it.

The directory is DCP's standard layout, so ``dcp.load``, ``format_utils.dcp_to_torch_save`` and
``storage.sharded_io`` read it like one written by ``dcp.save``.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DeferredShardPlan", "ShardPlan", "ShardPlanner", "flat_local_tensors",
           "local_tensors", "metadata_bytes", "plan_shards", "write_shards"]


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


def _distributed(world_size: int) -> bool:
    import torch.distributed as dist

    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _gather(obj: Any, world_size: int) -> list[Any]:
    import torch.distributed as dist

    if not _distributed(world_size):
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class _StoreExchange:
    """An all-gather of small picklable objects through the default process group's key-value
    store. Any thread may run it: it never uses the process group's collectives, which belong
    to the loop thread. Every rank runs the same rounds in the same order (``ShardPlanner``).

    Args:
        rank: this rank.
        world_size: the number of ranks.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        # the k-th exchange of this rank on this store: every rank builds its exchanges at the
        # same checkpoints, so the k agree and each exchange's keys are its own
        number = store.add(f"ray_lit/dcp_plan/exchanges/{rank}", 1)
        self.store = dist.PrefixStore(f"ray_lit/dcp_plan/{number}/", store)
        self.rank, self.world_size, self.round = rank, world_size, 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` of this round, in rank order (waits for the slowest rank)."""
        n = self.round
        self.round += 1
        self.store.set(f"{n}/{self.rank}", pickle.dumps(obj))
        out = [pickle.loads(self.store.get(f"{n}/{r}")) for r in range(self.world_size)]
        if n:  # every rank read round n - 1 before it wrote round n
            self.store.delete_key(f"{n - 1}/{self.rank}")
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


class DeferredShardPlan(ShardPlan):
    """A ``ShardPlan`` whose ``plan`` and ``metadata`` are settled by a background thread
    (``ShardPlanner``): ``tensors`` is ready at once; reading ``plan`` or ``metadata`` waits
    for the thread (the writer thread reads them, never the loop) and raises its error."""

    def __init__(self, tensors: dict[str, torch.Tensor], thread: threading.Thread,
                 result: dict[str, Any]) -> None:
        self.tensors = tensors
        self._thread = thread
        self._result = result

    def _settled(self) -> ShardPlan:
        self._thread.join()
        if "error" in self._result:
            raise self._result["error"]
        return self._result["plan"]

    @property  # type: ignore[override]
    def plan(self) -> Any:
        return self._settled().plan

    @property  # type: ignore[override]
    def metadata(self) -> Any:
        return self._settled().metadata


class ShardPlanner:
    """``plan_shards`` with the plan kept between checkpoints of one attempt: the layout of
    the shards does not change from one checkpoint to the next, so after the first one every
    rank only gathers one number (its layout's signature) and reuses the plan when every
    rank's signature is the one planned for (else it plans again).

    Every rank calls ``plan`` at the same checkpoints of the attempt. Over several ranks it
    returns a ``DeferredShardPlan`` at once: the gathers run in a background thread through
    the process group's key-value store (``_StoreExchange``), so the loop does not wait at
    the step boundary for the other ranks to arrive (on 4 ranks sharing 2 cores that wait was
    most of the stall). Each call first waits for the previous call's thread (long finished:
    the writer read its plan), so the rounds stay in the same order on every rank whatever
    the writer does with a plan."""

    def __init__(self) -> None:
        self._key: list[int] | None = None
        self._plan: ShardPlan | None = None
        self._exchange: _StoreExchange | None = None
        self._thread: threading.Thread | None = None

    def plan(self, tensors: dict[str, Any], rank: int, world_size: int) -> ShardPlan:
        """This rank's ``ShardPlan`` of ``tensors`` (see ``plan_shards``)."""
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        planner = DefaultSavePlanner()
        planner.set_up_planner(state_dict=tensors, storage_meta=None, is_coordinator=rank == 0)
        local = local_tensors(planner.state_dict)
        signature = _signature(planner.state_dict)
        if not _distributed(world_size):  # a world of one: nothing to wait for
            if [signature] != self._key or self._plan is None:
                self._plan = _plan(planner, rank, world_size, lambda obj: [obj])
                self._key = [signature]
            return ShardPlan(local, self._plan.plan, self._plan.metadata)
        if self._thread is not None:
            self._thread.join()
        if self._exchange is None:
            self._exchange = _StoreExchange(rank, world_size)
        result: dict[str, Any] = {}
        self._thread = threading.Thread(
            target=self._settle, args=(planner, signature, rank, world_size, result),
            daemon=True, name="ray_lit-ckpt-plan")
        self._thread.start()
        return DeferredShardPlan(local, self._thread, result)

    def _settle(self, planner: Any, signature: int, rank: int, world_size: int,
                result: dict[str, Any]) -> None:
        """The background thread: gather the signatures; plan (again) when there is no plan
        yet or any rank's layout changed. Reads only shapes and placements of the tensors."""
        try:
            exchange = self._exchange
            assert exchange is not None
            key = exchange.all_gather(signature)
            if key != self._key or self._plan is None:
                self._plan = _plan(planner, rank, world_size, exchange.all_gather)
                self._key = key
            result["plan"] = self._plan
        except BaseException as err:  # raised where the plan is read (the writer thread)
            result["error"] = err


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


def _plan(planner: Any, rank: int, world_size: int,
          gather: Callable[[Any], list[Any]] | None = None) -> ShardPlan:
    """The plan of a planner already set up with this rank's state (COLLECTIVE: ``gather``,
    by default an ``all_gather_object`` on the default process group)."""
    from torch.distributed.checkpoint import FileSystemWriter

    local = planner.create_local_plan()
    gathered = gather(local) if gather is not None else _gather(local, world_size)
    plans, metadata = planner.create_global_plan(gathered)
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
