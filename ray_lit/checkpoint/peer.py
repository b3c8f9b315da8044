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
"""

from __future__ import annotations

import threading
from typing import Any

from ray_lit.checkpoint.host_copy import HostSnapshot
from ray_lit.messages import FromPeers

__all__ = ["PeerSnapshot", "PeerSnapshotLost", "restore_checkpoint", "split_rank_state"]


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
    """
    names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    own = dict(state)
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

    def prepare(self, replicated: dict[str, Any]) -> None:
        """Allocate and touch both slots' host buffers in the background (after the first
        step): a snapshot's copy then does not page-fault them into existence while an
        optimizer step waits for it."""
        self.wait()

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
        now when not ``deferred``."""
        self.wait()
        slot, self._next = self._next, 1 - self._next
        self._keys[slot] = None  # its buffers are being overwritten
        host = self._slots[slot].capture(replicated, optimizers, deferred=deferred)
        self._thread = threading.Thread(target=self._finish, args=(slot, host, key),
                                        daemon=True, name="ray_lit-peer-snapshot")
        self._thread.start()

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

        return checkpoint_to_bytes(self._states[self._keys.index(key)])

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
    RNG where it had one (as ``load_restore`` does for storage checkpoints)."""
    import ray

    from ray_lit.storage.checkpoint_io import checkpoint_from_bytes

    parts = memory.parts
    checkpoint = checkpoint_from_bytes(parts[0], map_location="cpu")
    data = memory.ref  # an ObjectRef to the exported bytes (or the bytes themselves)
    if not isinstance(data, bytes | bytearray):
        try:
            data = ray.get(data, timeout=300)
        except Exception as err:  # every rank fails alike: no rank continues from elsewhere
            raise PeerSnapshotLost(f"fetching the peer snapshot failed: {err}") from err
    replicated = checkpoint_from_bytes(data, map_location="cpu")
    checkpoint["state_dict"] = {**checkpoint.get("state_dict", {}), **replicated["params"]}
    checkpoint["optimizer_states"] = replicated["optimizer_states"]
    own = parts.get(world_rank)
    if world_rank != 0 and own is not None:
        checkpoint["loops"]["rng"] = checkpoint_from_bytes(own, map_location="cpu")["loops"][
            "rng"]
    return checkpoint
