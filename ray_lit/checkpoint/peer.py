"""Peer snapshots: in-memory checkpoints, more frequent than storage ones, that the workers
surviving a loss hand to the next attempt (``Trainer(snapshot_every_n_steps=N)``).

A rank's checkpoint has two parts. Parameters and optimizer state are the same on every DDP
rank at a step boundary (the same initial weights, the same averaged gradients), so every rank
keeps its own host copy of them (``PeerSnapshot``), made during the next forward and backward as
for storage checkpoints (``HostSnapshot``). Everything else is what only that rank knows: its
RNG, its loop and sampler position and, on rank 0, buffers, schedulers, callbacks and the
rest of the checkpoint. That part is small; it travels to the driver with the rank's next poll
(``SnapshotLedger``). After a lost worker any one survivor's copy plus the driver's parts make
the exact checkpoint of that step, as if all ranks had written it to storage. A worker keeps
its two latest snapshots: a rank that dies right after a snapshot may not have handed its part
of it to the driver yet, and then the one before is used. The cost: two host copies of the
parameters and optimizer state per worker, and a copy every N steps (overlapped with the next
step's forward and backward).

Who calls what: every rank's ``CheckpointWriter`` takes the snapshots (``PeerSnapshot``, kept
on the ``Worker`` across attempts); the controller keeps the ledger, picks the restore
(``decide_restore``) and asks a survivor to export; every rank of the next attempt loads it
(``restore_checkpoint``).

Under ``FSDPStrategy`` over several ranks no tensor is replicated: each rank keeps its own
shards and its neighbour's instead (``checkpoint.shard_ring``), and the snapshot is exported
and restored as the set of shards it holds.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from ray_lit.checkpoint.host_copy import HostSnapshot
from ray_lit.messages import FromPeers

__all__ = ["PeerSnapshot", "PeerSnapshotLost", "restore_checkpoint", "split_rank_state"]

log = logging.getLogger(__name__)

SHARDS = "fsdp_shards"  # the key of a sharded snapshot (``shard_ring``), by rank


class PeerSnapshotLost(RuntimeError):
    """A rank of the new attempt could not fetch the peer snapshot it was to restore from
    (its holder's node went meanwhile). The controller treats it as a lost peer: the next
    attempt decides again, from storage if no survivor holds a snapshot any more."""


# --- worker side -------------------------------------------------------------------------------
def split_rank_state(state: dict[str, Any], module: Any, optimizers: list[Any]
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(replicated, own)`` parts of one rank's checkpoint state (``state`` is rank 0's full
    dump or another rank's loop part; it is not modified).

    ``replicated``: ``{"params": {state_dict key: parameter}, "optimizer_states": [...]}``,
    equal on every rank. ``own``: the rest (rank 0's buffers stay in its ``state_dict``).
    Under FSDP over several ranks ``replicated`` is ``{SHARDS: LocalShards}``: this rank's
    own shards, copied when the snapshot is taken (``shard_ring``).
    """
    from ray_lit.checkpoint.shard_ring import LocalShards, is_sharded

    names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    own = dict(state)
    if is_sharded(module):
        # FSDP: the rank's own shards are copied at ``take`` (not here: ``_prepare`` asks too).
        # Rank 0's dump holds the gathered tensors; they are dropped, the shards replace them
        if "state_dict" in state:
            own["state_dict"] = {k: v for k, v in state["state_dict"].items() if k not in names}
        own.pop("optimizer_states", None)
        return {SHARDS: LocalShards(module, optimizers)}, own
    if "state_dict" in state:
        params = {k: v for k, v in state["state_dict"].items() if k in names}
        own["state_dict"] = {k: v for k, v in state["state_dict"].items() if k not in names}
    else:
        params = {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()
                  if k in names}
    optimizer_states = own.pop("optimizer_states", None)
    if optimizer_states is None:
        optimizer_states = [opt.state_dict() for opt in optimizers]
    return {"params": params, "optimizer_states": optimizer_states}, own


class PeerSnapshot:
    """One worker's host copies of the replicated part of its two latest snapshots. It lives
    on the ``Worker`` (not the trainer) so it outlasts the failed attempt that took them."""

    def __init__(self) -> None:
        self._slots = [HostSnapshot(), HostSnapshot()]
        self._states: list[dict[str, Any] | None] = [None, None]
        self._keys: list[tuple[int, int] | None] = [None, None]  # (attempt, global step)
        self._next = 0
        self._thread: threading.Thread | None = None
        self.torn = False  # a copy was torn by a change outside optimizer.step

    @property
    def fence_wait_s(self) -> list[float]:
        """Time optimizer steps waited for a snapshot's overlapped copy."""
        return [w for slot in self._slots for w in slot.fence_wait_s]

    @property
    def keys(self) -> list[tuple[int, int]]:
        """The snapshots held complete, ``(attempt, global step)``."""
        return [k for k in self._keys if k is not None]

    @property
    def restorable(self) -> list[tuple[int, int]]:
        """The snapshots this worker can export, what it advertises to the driver
        (``Worker.abort``): every complete one. One of a replicated strategy rebuilds the
        whole state alone; a sharded one (``shard_ring``) holds only the ranks in
        ``held_ranks``, and the driver combines survivors that together hold every rank."""
        return self.keys

    @property
    def held_ranks(self) -> dict[tuple[int, int], tuple[int, ...]]:
        """Per sharded snapshot (``shard_ring``) held here, the world ranks whose shards it
        holds (this rank's and its ring source's); empty under a replicated strategy, whose
        snapshots each hold the whole state."""
        return {k: tuple(sorted(state[SHARDS])) for k, state in zip(self._keys, self._states)
                if k is not None and SHARDS in state}

    def prepare(self, replicated: dict[str, Any]) -> None:
        """Allocate and touch both slots' host buffers in the background (after the first
        step): a snapshot's copy then does not page-fault them into existence while an
        optimizer step waits for it."""
        self.wait()
        if SHARDS in replicated:
            return  # a sharded snapshot is serialised at each boundary: no buffers to keep

        def touch() -> None:
            for slot in self._slots:
                slot.prepare(replicated)

        self._thread = threading.Thread(target=touch, daemon=True,
                                        name="ray_lit-peer-snapshot-prepare")
        self._thread.start()

    def take(self, replicated: dict[str, Any], optimizers: list[Any], key: tuple[int, int],
             deferred: bool = True) -> None:
        """At a step boundary (loop thread): replace the older snapshot with ``replicated``;
        the tensors are copied while the next step runs (its ``optimizer.step`` waits), or
        now when not ``deferred``. A sharded snapshot (``shard_ring``) is COLLECTIVE: every
        rank copies its shards now and swaps them with its ring neighbours."""
        self.wait()
        if SHARDS in replicated:
            self._take_shards(replicated[SHARDS], key)
            return
        slot, self._next = self._next, 1 - self._next
        self._keys[slot] = None  # its buffers are being overwritten
        host = self._slots[slot].capture(replicated, optimizers, deferred=deferred)
        self._thread = threading.Thread(target=self._finish, args=(slot, host, key),
                                        daemon=True, name="ray_lit-peer-snapshot")
        self._thread.start()

    def _take_shards(self, shards: Any, key: tuple[int, int]) -> None:
        from ray_lit.checkpoint.shard_ring import exchange, source
        from ray_lit.storage.checkpoint_io import checkpoint_to_bytes

        captured = shards.capture()
        rank, world_size = captured["rank"], captured["world_size"]
        blob = checkpoint_to_bytes(captured)  # the host copy, taken at the step boundary
        received = exchange(blob, rank, world_size)
        # over more than two ranks this holds two ranks' shards; the driver combines the
        # survivors' holdings (``decide_restore``), so nothing is refused here
        held = {rank: blob, source(rank, world_size): received}
        slot, self._next = self._next, 1 - self._next
        self._states[slot] = {SHARDS: held, "world_size": world_size}
        self._keys[slot] = key

    def _finish(self, slot: int, host: dict[str, Any], key: tuple[int, int]) -> None:
        if self._slots[slot].copy_deferred():
            self._states[slot], self._keys[slot] = host, key
        else:  # torn (a tensor changed outside optimizer.step): not a snapshot
            self.torn = True

    def wait(self) -> None:
        """Until the copy in flight is done (before taking another or exporting)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def export(self, key: tuple[int, int]) -> bytes:
        """The replicated part of snapshot ``key`` as checkpoint bytes (for the next attempt's
        ranks); raises when this worker no longer holds it."""
        self.wait()
        if key not in self.keys:
            raise RuntimeError(f"peer snapshot {key} is not held here (holding {self.keys})")
        from ray_lit.storage.checkpoint_io import checkpoint_to_bytes

        state = self._states[self._keys.index(key)]
        if SHARDS in state:  # each rank's shards as the bytes they were kept as
            state = {SHARDS: {rank: torch.frombuffer(bytearray(blob), dtype=torch.uint8)
                              for rank, blob in state[SHARDS].items()},
                     "world_size": state["world_size"]}
        return checkpoint_to_bytes(state)

    def release(self) -> None:
        """Drop the copies and their buffers (the end of fit)."""
        self.wait()
        for slot in self._slots:
            slot.release()
        self._states, self._keys = [None, None], [None, None]


def own_part_bytes(own: dict[str, Any]) -> bytes:
    """A rank's own part for the driver, as checkpoint bytes, serialised at the boundary
    (``torch.save`` copies device tensors to the host; the ranks load it onto the CPU)."""
    from ray_lit.storage.checkpoint_io import checkpoint_to_bytes

    return checkpoint_to_bytes(own)


def restore_checkpoint(memory: FromPeers, world_rank: int) -> dict[str, Any]:
    """The checkpoint of snapshot ``memory`` for ``world_rank`` of the
    next attempt: rank 0's own part with the replicated tensors put back, and this rank's own
    RNG where it had one (as ``load_restore`` does for storage checkpoints). A sharded
    snapshot's shards, from one export or a list of them, are put back together into the full
    state (every rank then loads its own shard of it).

    Raises:
        PeerSnapshotLost: an export could not be fetched, or a rank's shards are missing.
    """
    import ray

    from ray_lit.storage.checkpoint_io import checkpoint_from_bytes

    parts = memory.parts
    checkpoint = checkpoint_from_bytes(parts[0], map_location="cpu")
    # an ObjectRef to the exported bytes (or the bytes themselves); a list of them for a
    # sharded snapshot exported by several survivors, each holding some ranks' shards
    exports = []
    for data in memory.ref if isinstance(memory.ref, list | tuple) else [memory.ref]:
        if not isinstance(data, bytes | bytearray):
            try:
                data = ray.get(data, timeout=300)
            except Exception as err:  # every rank fails alike: none continues from elsewhere
                raise PeerSnapshotLost(f"fetching the peer snapshot failed: {err}") from err
        exports.append(checkpoint_from_bytes(data, map_location="cpu"))
    replicated = exports[0]
    if SHARDS in replicated:  # FSDP: every rank's shards, put back together (``shard_ring``)
        held = {rank: shard for export in exports for rank, shard in export[SHARDS].items()}
        replicated = _from_shards({SHARDS: held, "world_size": replicated["world_size"]})
    checkpoint["state_dict"] = {**checkpoint.get("state_dict", {}), **replicated["params"]}
    checkpoint["optimizer_states"] = replicated["optimizer_states"]
    own = parts.get(world_rank)
    if world_rank != 0 and own is not None:
        checkpoint["loops"]["rng"] = checkpoint_from_bytes(own, map_location="cpu")["loops"][
            "rng"]
    return checkpoint


def _from_shards(exported: dict[str, Any]) -> dict[str, Any]:
    """The full ``params`` and ``optimizer_states`` of a sharded snapshot's exported shards;
    every rank of the next attempt then loads its own shard of them, as from a full-state
    checkpoint. A world size other than the snapshot's reshards (not bit-identical)."""
    import torch.distributed as dist

    from ray_lit.checkpoint.shard_ring import assemble
    from ray_lit.storage.checkpoint_io import checkpoint_from_bytes

    shards = {int(rank): checkpoint_from_bytes(data.numpy().tobytes(), map_location="cpu")
              for rank, data in exported[SHARDS].items()}
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size != exported["world_size"] and (not dist.is_initialized()
                                                  or dist.get_rank() == 0):
        log.warning("ray_lit: the FSDP peer snapshot of %d workers is restored on %d: its "
                    "full state is resharded, as a storage restore would be (equal values, not "
                    "bit-identical to a run at the old size)", exported["world_size"],
                    world_size)
    try:
        params, optimizer_states = assemble(shards)
    except ValueError as err:  # the exports chosen miss a rank's shards
        raise PeerSnapshotLost(f"the FSDP peer snapshot is incomplete: {err}") from err
    return {"params": params, "optimizer_states": optimizer_states}
