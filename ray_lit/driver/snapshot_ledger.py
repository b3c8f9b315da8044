"""The driver's record of the peer snapshots' own parts (``checkpoint.peer``), by snapshot."""

from __future__ import annotations


class SnapshotLedger:
    """The driver's record of every rank's own part, by snapshot (one attempt's)."""

    def __init__(self) -> None:
        self._parts: dict[tuple[int, int], dict[int, bytes]] = {}
        self._world: dict[tuple[int, int], int] = {}

    def add(self, key: tuple[int, int], rank: int, world_size: int, blob: bytes) -> None:
        self._parts.setdefault(key, {})[rank] = blob
        self._world[key] = world_size
        complete = self.complete()
        if complete:  # older snapshots are never needed again
            newest = max(complete)
            for old in [k for k in self._parts if k < newest]:
                del self._parts[old], self._world[old]

    def complete(self) -> list[tuple[int, int]]:
        """Snapshots whose every rank's part arrived."""
        return sorted(k for k, parts in self._parts.items() if len(parts) == self._world[k])

    def world_size(self, key: tuple[int, int]) -> int:
        """The world size of the attempt that took snapshot ``key``."""
        return self._world[key]

    def parts(self, key: tuple[int, int]) -> dict[int, bytes]:
        return dict(self._parts[key])

    def clear(self) -> None:
        self._parts, self._world = {}, {}
