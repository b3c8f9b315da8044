"""``RankBoard``: the latest status the driver heard from every rank of one attempt.

The driver hears from a rank only when it has news or its heartbeat is due (``driver.news``),
so between two answers the board stands in for the rank: its last status, and when it came.
The idle time a rank reported then plus the time since is an upper bound of its idle time now;
a rank whose bound passes the hang timeout is only a suspect, and is asked (woken) for a fresh
status before anyone is called hung, so a quiet rank is never mistaken for a hung one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ray_lit.messages import WorkerState, WorkerStatus

__all__ = ["RankBoard"]

_POLLED = (WorkerState.IDLE, WorkerState.RUNNING)  # a rank in another state is polled no more


class RankBoard:
    """What the driver last heard from each rank (driver side, one per attempt)."""

    def __init__(self) -> None:
        self.latest: dict[int, WorkerStatus] = {}
        self.heard_at: dict[int, float] = {}
        self.sigterm: set[int] = set()  # ranks that reported a SIGTERM in this attempt
        # ranks woken for a fresh status and not yet heard from; None: no refresh under way
        self._asked: set[int] | None = None

    def note(self, rank: int, status: WorkerStatus, now: float | None = None) -> None:
        """A rank answered (driver, in each round)."""
        self.latest[rank] = status
        self.heard_at[rank] = time.monotonic() if now is None else now
        if self._asked is not None:
            self._asked.discard(rank)
        if status.sigterm:
            self.sigterm.add(rank)

    @property
    def refreshing(self) -> bool:
        """Suspects' fresh statuses were asked for: look again at the next round."""
        return self._asked is not None

    def hung(self, is_hung: Callable[[WorkerStatus, float], bool], heard_now: set[int],
             wake: Callable[[list[int]], None]) -> dict[int, float]:
        """The ranks without progress past the hang timeout, by their idle seconds, decided on
        a fresh view of the group (driver, every ``hang_check_interval_s``).

        Args:
            is_hung: ``(status, idle_s) -> bool``, the controller's rule.
            heard_now: the ranks that answered in this round (fresh already).
            wake: asks ranks for a fresh status (``WorkerGroup.wake``).

        Returns:
            ``{rank: idle_s}``; empty while nobody is suspect, while the fresh statuses asked
            for are on their way, or when one rank is in a long phase (a big checkpoint write
            keeps its peers waiting in a collective: nobody is hung then).
        """
        now = time.monotonic()
        suspects = {rank: status.idle_s + now - self.heard_at[rank]
                    for rank, status in self.latest.items()
                    if status.state is WorkerState.RUNNING
                    and is_hung(status, status.idle_s + now - self.heard_at[rank])}
        if not suspects:
            self._asked = None
            return {}
        if self._asked is None:
            # every rank still polled that did not just answer: a peer's long phase clears
            # the suspects too
            stale = [rank for rank, status in self.latest.items()
                     if rank not in heard_now and status.state in _POLLED]
            if stale:
                self._asked = set(stale)
                wake(stale)
                return {}
        elif self._asked:
            return {}  # the fresh statuses are on their way
        self._asked = None  # decided on this view; a later suspicion asks again
        if any(status.long_phase for status in self.latest.values()):
            return {}
        return suspects
