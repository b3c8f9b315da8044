"""Fault-tolerance checkpoints of a run: the commit protocol, "latest", retention.

A checkpoint exists only once its manifest does (names in ``checkpoint.layout``): the driver
writes the manifest after every rank confirmed its part, so "latest" means latest committed,
and a directory without a manifest is an interrupted write that is never read and is removed by
``clean``.

Storage faults: every list, read and the manifest write are retried with backoff
(``storage/retry.py``) until storage has been failing for ``retry_timeout_s``; past that the
commit raises ``StorageUnavailableError`` and the checkpoint stays uncommitted. A rank confirms
its part only after the part's write (retries included) succeeded, and parts and manifest are
written atomically, so a half checkpoint is never committed nor read. Retention is best effort:
a prune that fails is tried again after the next commit.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from ray_lit.checkpoint import layout
from ray_lit.checkpoint.layout import MANIFEST, checkpoint_name, part_name, part_rank
from ray_lit.storage.filesystem import Storage
from ray_lit.storage.retry import DEFAULT_TIMEOUT_S, StorageRetry

log = logging.getLogger("ray_lit")

__all__ = ["MANIFEST", "CheckpointManager", "CommittedCheckpoint", "checkpoint_name",
           "part_name"]


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A checkpoint whose manifest exists."""

    name: str
    uri: str
    global_step: int
    epoch: int
    world_size: int
    parts: tuple[str, ...]

    def part_uri(self, world_rank: int) -> str:
        """This rank's part, or rank 0's when the checkpoint has fewer ranks (elastic)."""
        by_rank = {part_rank(p): p for p in self.parts}
        name = by_rank.get(world_rank) or by_rank[0]
        return f"{self.uri.rstrip('/')}/{name}"


class CheckpointManager:
    """Driver-side: commits checkpoints whose parts are confirmed, finds the latest, prunes.

    Args:
        run_uri: ``storage_path/run_name`` (local path or pyarrow.fs URI).
        keep: committed fault-tolerance checkpoints kept (ModelCheckpoint files are separate).
        retry_timeout_s: how long storage may keep failing before a commit or a listing raises
            ``StorageUnavailableError`` (the ``storage_retry_timeout_s`` option).
    """

    def __init__(self, run_uri: str, keep: int = 2,
                 retry_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.run_uri = run_uri.rstrip("/")
        self.storage = Storage(self.run_uri, retry=StorageRetry(retry_timeout_s))
        self.keep = max(1, keep)
        self._pending: dict[str, dict[str, Any]] = {}
        self.commits = 0

    def checkpoints_uri(self) -> str:
        return layout.checkpoints_uri(self.run_uri)

    def part_uri(self, name: str, world_rank: int) -> str:
        return layout.part_uri(self.run_uri, name, world_rank)

    # --- commit ---------------------------------------------------------------------------------
    def confirm(self, name: str, world_rank: int, world_size: int, meta: dict[str, Any],
                fence: str = "") -> bool:
        """Record that ``world_rank`` of attempt ``fence`` wrote its part of ``name``; commits
        when every rank of that same attempt did (parts of two attempts never combine).

        Returns True when this confirmation committed the checkpoint.
        """
        entry = self._pending.setdefault((name, fence), {"ranks": set(), "fence": fence,
                                                         "world_size": world_size, "meta": {}})
        entry["ranks"].add(world_rank)
        if world_rank == 0:
            entry["meta"] = meta
        if len(entry["ranks"]) < entry["world_size"]:
            return False
        committed = self._commit(name, entry)
        del self._pending[(name, fence)]
        return committed

    def _commit(self, name: str, entry: dict[str, Any]) -> bool:
        """Write the manifest of ``name``, whose parts every rank confirmed written.

        Raises:
            StorageUnavailableError: storage failed for longer than the retry timeout (the
                checkpoint stays uncommitted).
        """
        # a rank confirms its part only after its write succeeded (retries included), so a
        # part whose write failed is never listed here
        parts = [part_name(r, entry["fence"]) for r in sorted(entry["ranks"])]
        manifest = {
            "name": name,
            "world_size": entry["world_size"],
            "parts": parts,
            "global_step": entry["meta"].get("global_step", 0),
            "epoch": entry["meta"].get("epoch", 0),
            "committed_at": time.time(),
            "format": 1,
        }
        # the one atomic write that makes the checkpoint exist
        self.storage.write_bytes(f"checkpoints/{name}/{MANIFEST}",
                                 json.dumps(manifest, indent=1).encode())
        self.commits += 1
        try:
            self.prune()
        except (OSError, RuntimeError) as err:  # storage failed again: the next commit prunes
            log.warning("ray_lit: pruning old checkpoints of %s failed (%s); tried again after "
                        "the next commit", self.run_uri, err)
        return True

    def abandon_pending(self) -> None:
        """An attempt ended: its unconfirmed checkpoints will never commit."""
        self._pending.clear()

    # --- read -----------------------------------------------------------------------------------
    def committed(self, storage: Storage | None = None) -> list[CommittedCheckpoint]:
        """Every committed checkpoint, oldest first; unreadable manifests are skipped."""
        storage = storage or self.storage
        out = []
        for name in storage.listdir("checkpoints"):
            if not name.startswith(layout.PREFIX):
                continue
            rel = f"checkpoints/{name}/{MANIFEST}"
            if not storage.exists(rel):
                continue
            try:
                manifest = json.loads(storage.read_bytes(rel))
            except (ValueError, FileNotFoundError):
                # corrupt or pruned meanwhile; an I/O error is retried (skipping the manifest
                # during an outage would silently pick an older checkpoint as "latest")
                continue
            out.append(CommittedCheckpoint(
                name=name, uri=f"{self.checkpoints_uri()}/{name}",
                global_step=int(manifest["global_step"]), epoch=int(manifest["epoch"]),
                world_size=int(manifest["world_size"]), parts=tuple(manifest["parts"])))
        out.sort(key=lambda c: (c.global_step, c.epoch, c.name))
        return out

    def latest(self) -> CommittedCheckpoint | None:
        found = self.committed()
        return found[-1] if found else None

    # --- retention ------------------------------------------------------------------------------
    def prune(self) -> None:
        """Keep the newest ``keep`` committed checkpoints; drop uncommitted directories older
        than the newest commit (interrupted writes). One try per operation (a failure raises
        and the next commit prunes again): retention must not hold the driver up."""
        storage = Storage(self.run_uri)
        committed = self.committed(storage)
        if not committed:
            return
        for old in committed[: -self.keep]:
            storage.delete(f"checkpoints/{old.name}")
        newest = committed[-1].name
        committed_names = {c.name for c in committed}
        for name in storage.listdir("checkpoints"):
            pending = {n for n, _ in self._pending}
            if name.startswith(layout.PREFIX) and name not in committed_names and name < newest \
                    and name not in pending:
                storage.delete(f"checkpoints/{name}")

    def clean_uncommitted(self) -> None:
        """Remove every directory without a manifest (before a new attempt starts)."""
        committed_names = {c.name for c in self.committed()}
        for name in self.storage.listdir("checkpoints"):
            if name.startswith(layout.PREFIX) and name not in committed_names:
                self.storage.delete(f"checkpoints/{name}")
