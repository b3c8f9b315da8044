"""``NewsFeed``: the driver's long polls of one attempt's worker group, one outstanding per rank.

Polling every rank every round cost the driver about 0.75 ms of CPU per worker per round on
real Ray (a ``poll`` and a ``wake`` call each), so 1,000 workers would have taken ~7.5 cores at
10 rounds a second. Here each rank always has one long poll in flight; it answers when the rank
has news (a state change, a checkpoint or snapshot part, a SIGTERM, rank 0's metrics, prediction
outputs) or when its heartbeat is due, and only the ranks that answered are polled again. A
round costs one ``ray.wait`` over the outstanding refs (a fraction of a microsecond per
worker, in Ray's C++) plus one call per rank that had something to say; a quiet rank costs
one call per heartbeat.

Liveness is as before: a dead actor's ref fails at once (Ray reports the death on it), and a
poll not answered within the heartbeat plus ``poll_timeout_s`` is a worker that hangs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from ray_lit.messages import WorkerState, WorkerStatus

__all__ = ["NewsFeed", "WorkerGone"]

# answers that come this soon after the first one are taken in the same round: the parts of one
# checkpoint, written by every rank at the same step, confirm together (the commit is not
# delayed by a round); the wait blocks, it costs no CPU
_GRACE_S = 0.02
# a rank in one of these states has said its last word in the attempt: no poll follows
_FINAL = (WorkerState.DONE, WorkerState.FAILED, WorkerState.PREEMPTED, WorkerState.ABORTED)


@dataclass
class WorkerGone:
    """A worker that did not answer a poll: ``actor_died`` (Ray reported its death) or
    ``hang`` (no answer in time)."""

    kind: str
    text: str


class NewsFeed:
    """The outstanding long polls of one attempt (driver side; ``WorkerGroup.news``).

    Args:
        actors: the ranks' worker actors, in world-rank order.
    """

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors
        self._due: list[int] = list(range(len(actors)))  # ranks to poll in the next round
        # rank -> (ref, sent at); insertion order is send order, so the oldest poll is first
        self._out: dict[int, tuple[Any, float]] = {}
        self._rank_of: dict[Any, int] = {}
        self.calls = 0  # polls sent (benchmarks, tests)

    def collect(self, *, wait_s: float, heartbeat_s: float, timeout_s: float
                ) -> dict[int, WorkerStatus | WorkerGone]:
        """One round: poll the ranks that answered last round, wait up to ``wait_s`` for any
        answer, and return every answer there is now, by rank (a ``WorkerGone`` for a dead
        actor, or for a poll unanswered ``heartbeat_s + timeout_s`` after it was sent)."""
        now = time.monotonic()
        for rank in self._due:
            ref = self.actors[rank].poll.remote(heartbeat_s)
            self._out[rank] = (ref, now)
            self._rank_of[ref] = rank
        self.calls += len(self._due)
        self._due = []
        out: dict[int, WorkerStatus | WorkerGone] = {}
        refs = list(self._rank_of)
        if refs:
            ready, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
            if ready and len(refs) > 1:  # and every other answer there within the grace
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=_GRACE_S)
            for ref in ready:
                rank = self._rank_of.pop(ref)
                del self._out[rank]
                out[rank] = self._answer(rank, ref)
        late = time.monotonic() - heartbeat_s - timeout_s
        for rank, (ref, sent) in list(self._out.items()):
            if sent >= late:
                break  # the rest were sent later
            del self._out[rank], self._rank_of[ref]
            out[rank] = WorkerGone("hang", f"the worker did not answer a poll within "
                                           f"{heartbeat_s + timeout_s:.0f} s")
        return out

    def _answer(self, rank: int, ref: Any) -> WorkerStatus | WorkerGone:
        try:
            status = ray.get(ref, timeout=0)
        except RayActorError as err:
            return WorkerGone("actor_died", str(err))
        if status.state not in _FINAL:
            self._due.append(rank)
        return status

    def close(self, timeout_s: float = 2.0) -> dict[int, WorkerStatus | WorkerGone]:
        """End the attempt's polls (driver, when the attempt ends): the ranks with one in
        flight are woken, and what they answer within ``timeout_s`` is returned (a part a rank
        handed over then is not lost; a poll of the ended attempt must not take the news of
        the group's next run). Polls that do not answer in time are dropped."""
        for rank in self._out:
            self.actors[rank].wake.remote()
        refs = list(self._rank_of)
        out: dict[int, WorkerStatus | WorkerGone] = {}
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            for ref in ready:
                out[self._rank_of[ref]] = self._answer(self._rank_of[ref], ref)
        self._out, self._rank_of, self._due = {}, {}, []
        return out
