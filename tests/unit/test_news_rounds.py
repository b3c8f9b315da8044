"""The driver's rounds hear only the ranks with news (``driver.news``, ``driver.rank_board``):
a quiet rank is never taken for a hung one, a hung quiet rank is still found (its peers are
asked for a fresh status first), and a run finishes with rounds that poll only rank 0."""

from __future__ import annotations

import time

from ray_lit import Trainer
from ray_lit.driver.rank_board import RankBoard
from ray_lit.messages import WorkerState, WorkerStatus
from ray_lit.testing import FakeWorkerGroup, FakeWorkerGroups, ScriptedAttempt, controller_for


def _running(idle_s: float = 0.0, long_phase: bool = False) -> WorkerStatus:
    return WorkerStatus(WorkerState.RUNNING, idle_s=idle_s, steps=5, long_phase=long_phase)


def _after(timeout_s: float):
    return lambda status, idle_s: idle_s > timeout_s


def test_a_quiet_rank_is_asked_before_it_is_called_hung() -> None:
    board, woken = RankBoard(), []
    now = time.monotonic()
    board.note(0, _running(), now)
    board.note(1, _running(), now - 10)  # heard 10 s ago, idle then: maybe idle 10 s now
    assert board.hung(_after(5), heard_now={0}, wake=woken.extend) == {}
    assert woken == [1]  # asked, not called hung
    assert board.hung(_after(5), heard_now=set(), wake=woken.extend) == {}  # still asked
    board.note(1, _running(idle_s=0.1))  # it was busy all along
    assert board.hung(_after(5), heard_now={1}, wake=woken.extend) == {}
    assert woken == [1]


def test_a_hung_quiet_rank_is_found_on_a_fresh_view() -> None:
    board, woken = RankBoard(), []
    now = time.monotonic()
    for rank in (0, 1, 2):
        board.note(rank, _running(), now - 1)
    board.note(2, _running(idle_s=30), now)  # its heartbeat: no progress for 30 s
    assert board.hung(_after(5), heard_now={2}, wake=woken.extend) == {}
    assert sorted(woken) == [0, 1]  # its peers first: one of them may be in a long phase
    board.note(0, _running())
    board.note(1, _running())
    hung = board.hung(_after(5), heard_now={0, 1}, wake=woken.extend)
    assert list(hung) == [2] and hung[2] >= 30


def test_a_peers_long_phase_clears_the_suspects() -> None:
    board, woken = RankBoard(), []
    now = time.monotonic()
    board.note(0, _running(idle_s=30), now)
    board.note(1, _running(idle_s=30, long_phase=True), now)
    assert board.hung(_after(5), heard_now={0, 1}, wake=woken.extend) == {}
    assert woken == []  # a fresh view already: nobody asked


def test_finished_ranks_are_not_waited_for() -> None:
    board, woken = RankBoard(), []
    now = time.monotonic()
    board.note(0, _running(idle_s=30), now)
    board.note(1, WorkerStatus(WorkerState.DONE), now - 10)  # polled no more
    assert list(board.hung(_after(5), heard_now={0}, wake=woken.extend)) == [0]
    assert woken == []


class SparseGroup(FakeWorkerGroup):
    """Rank 0 has news every round (its metrics); the other ranks answer only with news of
    their own (a state change, a part), every ``heartbeat`` rounds (each at its own round),
    or when woken."""

    heartbeat = 5

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[list[int]] = []
        self.woken: list[int] = []
        self._asked: set[int] = set()

    def news(self, *, wait_s=0.0, heartbeat_s=5.0, timeout_s=30.0):
        statuses = dict(enumerate(self.statuses(timeout_s, wait_s)))
        out = {rank: status for rank, status in statuses.items()
               if rank == 0 or (self.step + rank) % self.heartbeat == 0 or rank in self._asked
               or not isinstance(status, WorkerStatus)
               or status.state is not WorkerState.RUNNING or status.handed_over}
        self._asked -= set(out)
        self.rounds.append(sorted(out))
        return out

    def wake(self, ranks):
        self.woken.extend(ranks)
        self._asked |= set(ranks)


class SparseGroups(FakeWorkerGroups):
    def __call__(self, *, num_workers, survivors=None, **options):
        group = super().__call__(num_workers=num_workers, survivors=survivors, **options)
        sparse = SparseGroup(group.script, [w.node_id for w in group.workers], group.slots,
                             group.capacity)
        self.groups[-1] = sparse
        return sparse


def test_a_run_hears_mostly_rank_0_and_finishes() -> None:
    groups = SparseGroups([ScriptedAttempt(steps=12)])
    controller = controller_for(Trainer(num_workers=4), groups)
    assert controller.run() == b"rank0-result"
    rounds = groups.groups[0].rounds
    assert len(rounds) == 12 and all(len(r) <= 2 for r in rounds[:-1])  # rank 0 and a beat
    assert sum(r == [0] for r in rounds) >= 2  # a quiet round hears rank 0 only
    assert groups.groups[0].woken == []  # nobody suspected


def test_a_quiet_rank_that_hangs_is_diagnosed() -> None:
    groups = SparseGroups([ScriptedAttempt(steps=30, hang=(2, 3)), ScriptedAttempt()])
    controller = controller_for(Trainer(num_workers=4, max_failures=1), groups,
                                hang_timeout_s=60)
    assert controller.run() == b"rank0-result"
    first = groups.groups[0]
    assert first.woken and 2 not in first.woken  # its peers were asked, then it was named
    assert controller.trainer.num_restarts == 1


class EndedByTune(FakeWorkerGroup):
    """Tune ends the trial while it trains: ``SystemExit`` out of its report."""

    graceful: bool | None = None

    def news(self, **kwargs):
        raise SystemExit(0)

    def shutdown(self, graceful: bool = True) -> None:
        self.graceful = graceful
        super().shutdown(graceful)


def test_a_trial_ended_by_tune_releases_its_workers_at_once() -> None:
    import pytest

    class Groups(FakeWorkerGroups):
        def __call__(self, **options):
            group = super().__call__(**options)
            self.groups[-1] = EndedByTune(group.script, [w.node_id for w in group.workers])
            return self.groups[-1]

    groups = Groups([ScriptedAttempt()])
    with pytest.raises(SystemExit):
        controller_for(Trainer(num_workers=2), groups).run()
    # no goodbye: Tune reuses the trial's actor only if its thread ends within 2 s
    assert groups.groups[0].graceful is False
