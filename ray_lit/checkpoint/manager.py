"""Fault-tolerance checkpoints of a run: the commit protocol, "latest", retention.

A checkpoint exists only once its manifest does (names in ``checkpoint.layout``): the driver
writes the manifest after every rank confirmed its part, so "latest" means latest committed,
and a directory without a manifest is an interrupted write that is never read and is removed by
``clean``.

Sharded checkpoints (``FSDPStrategy`` over several ranks): each rank also writes its own shard
file of a DCP directory beside its part and confirms with DCP's write results; the commit
writes that directory's ``.metadata`` from them first, then the manifest, so a committed
checkpoint always has every shard and its index.

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
        self._skipped: set[str] = set()  # checkpoints whose manifest was refused (logged once)
        self._committed_here: set[str] = set()  # manifests this manager wrote

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
        if isinstance(meta, dict) and "dcp" in meta:  # a sharded checkpoint's DCP part
            entry.setdefault("dcp", {})[world_rank] = meta["dcp"]
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
        if entry.get("dcp"):
            # a sharded checkpoint: its DCP index goes in before the manifest that commits it
            manifest["model"] = self._write_dcp_metadata(name, entry["dcp"])
        # the one atomic write that makes the checkpoint exist
        self.storage.write_bytes(f"checkpoints/{name}/{MANIFEST}",
                                 json.dumps(manifest, indent=1).encode())
        self._committed_here.add(name)
        self.commits += 1
        try:
            self.prune()
        except (OSError, RuntimeError) as err:  # storage failed again: the next commit prunes
            log.warning("ray_lit: pruning old checkpoints of %s failed (%s); tried again after "
                        "the next commit", self.run_uri, err)
        return True

    def _write_dcp_metadata(self, name: str, parts: dict[int, dict[str, Any]]) -> str:
        """Write the ``.metadata`` of a sharded checkpoint's DCP directory from the plan rank 0
        made and every rank's write results (each rank wrote only its shard file, without
        collectives: ``storage.dcp_plan``). Returns the directory's name."""
        from ray_lit.storage.dcp_plan import metadata_bytes
        from ray_lit.storage.sharded_io import DCP_METADATA

        first = parts[0]
        data = metadata_bytes(first["metadata"], [parts[r]["results"] for r in sorted(parts)])
        self.storage.write_bytes(f"checkpoints/{name}/{first['dir']}/{DCP_METADATA}", data)
        return first["dir"]

    def abandon_pending(self) -> None:
        """An attempt ended: its unconfirmed checkpoints will never commit."""
        self._pending.clear()

    # --- read -----------------------------------------------------------------------------------
    def committed(self, storage: Storage | None = None) -> list[CommittedCheckpoint]:
        """Every committed checkpoint, oldest first. A manifest that is unreadable (truncated)
        or does not match its directory (a part missing, parts of several attempts) is
        skipped with a warning, so "latest" falls back to the previous commit."""
        storage = storage or self.storage
        out = []
        for name in storage.listdir("checkpoints"):
            if not name.startswith(layout.PREFIX):
                continue
            rel = f"checkpoints/{name}/{MANIFEST}"
            if not storage.exists(rel):
                continue
            try:
                raw = storage.read_bytes(rel)
            except FileNotFoundError:
                continue  # pruned meanwhile (an I/O error is retried: skipping a manifest
                # during an outage would silently pick an older checkpoint as "latest")
            try:
                entry = self._entry(name, json.loads(raw), storage)
            except (ValueError, KeyError, TypeError) as err:
                # a truncated manifest, or one naming parts that are not there (another
                # run's, another attempt's): never read; the previous commit stands
                self._skip(name, err)
                continue
            out.append(entry)
        out.sort(key=lambda c: (c.global_step, c.epoch, c.name))
        return out

    def _entry(self, name: str, manifest: Any, storage: Storage) -> CommittedCheckpoint:
        """The committed checkpoint a manifest describes, once its parts check out.

        Raises:
            ValueError, KeyError, TypeError: the manifest is not one the driver wrote for the
                parts in its directory (fields missing, ranks not 0..world_size-1, parts of
                several attempts, or a part file absent).
        """
        parts = tuple(manifest["parts"])
        entry = CommittedCheckpoint(
            name=name, uri=f"{self.checkpoints_uri()}/{name}",
            global_step=int(manifest["global_step"]), epoch=int(manifest["epoch"]),
            world_size=int(manifest["world_size"]), parts=parts)
        if sorted(part_rank(p) if isinstance(p, str) else -1 for p in parts) != \
                list(range(entry.world_size)):
            raise ValueError(f"parts {list(parts)} are not one per rank of {entry.world_size}")
        if len({p.partition("-")[2] for p in parts}) > 1:
            raise ValueError(f"parts {list(parts)} were written by different attempts")
        if name not in self._committed_here:
            # found, not committed by this driver (a resumed run): the parts must be there.
            # One listing per checkpoint; what this driver committed was confirmed written.
            present = set(storage.listdir(f"checkpoints/{name}"))
            absent = [p for p in parts if p not in present]
            if absent:
                raise ValueError(f"part(s) {absent} named by the manifest are not there")
        return entry

    def _skip(self, name: str, err: BaseException) -> None:
        """Say once per checkpoint why it is not used."""
        if name in self._skipped:
            return
        self._skipped.add(name)
        log.warning("ray_lit: checkpoint %s of %s is not used: its manifest is unreadable or "
                    "does not match its parts (%s: %s); the previous committed checkpoint is "
                    "the latest", name, self.run_uri, type(err).__name__, err)

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
            # a checkpoint whose manifest was refused stays for inspection (it is never read;
            # retention removes it once newer ones are committed)
            if name.startswith(layout.PREFIX) and name not in committed_names and \
                    name not in self._skipped:
                self.storage.delete(f"checkpoints/{name}")
