"""Failure and scaling policies, and accumulation across world sizes: every branch."""

from __future__ import annotations

import dataclasses

import pytest

from ray_lit.driver.policies import (
    Decision,
    ElasticScaling,
    FailureDecision,
    FailurePolicy,
    FixedScaling,
    NoopDecision,
    ResizeDecision,
    WaitDecision,
    WorkerError,
    decide_accumulation,
    decide_departure,
    scaling_policy,
)
from ray_lit.errors import MisconfigurationException


def error(kind="actor_died", rank=1):
    return WorkerError(world_rank=rank, node_id="n1", node_ip="10.0.0.2", traceback="tb",
                       kind=kind)


# --- failures ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["actor_died", "node_died", "hang"])
def test_infrastructure_failures_restart_while_failures_remain(kind):
    policy = FailurePolicy(max_failures=2)
    first = policy.decide(0, error(kind))
    assert first.decision is FailureDecision.RESTART and first.counts_as_failure
    assert "restart 1 of 2" in first.reason and kind in first.reason
    assert policy.decide(1, error(kind)).decision is FailureDecision.RESTART
    last = policy.decide(2, error(kind))
    assert last.decision is FailureDecision.RAISE and "max_failures=2" in last.reason


def test_zero_failures_raises_at_once_and_minus_one_never_gives_up():
    assert FailurePolicy(0).decide(0, error()).decision is FailureDecision.RAISE
    unlimited = FailurePolicy(-1).decide(10_000, error("node_died"))
    assert unlimited.decision is FailureDecision.RESTART and "unlimited" in unlimited.reason


def test_user_errors_raise_immediately_unless_retried():
    decision = FailurePolicy(5).decide(0, error("user_error"))
    assert decision.decision is FailureDecision.RAISE and "user code" in decision.reason
    assert decision.name == "RAISE"
    retried = FailurePolicy(5, retry_user_errors=True).decide(0, error("user_error"))
    assert retried.decision is FailureDecision.RESTART
    assert FailurePolicy(-1).decide(0, error("user_error")).decision is FailureDecision.RAISE


def test_preemption_restarts_without_counting():
    decision = FailurePolicy(0).decide(3, error("preempted"))
    assert decision.decision is FailureDecision.RESTART and not decision.counts_as_failure
    assert "rank 1 on 10.0.0.2" in decision.reason


def test_values_are_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Decision(FailureDecision.RAISE, "r").reason = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        error().kind = "hang"  # type: ignore[misc]
    with pytest.raises(ValueError, match="kind"):
        error("exploded")
    with pytest.raises(MisconfigurationException, match="max_failures"):
        FailurePolicy(-2)


# --- scaling -----------------------------------------------------------------------------
def test_fixed_scaling():
    policy = FixedScaling(4)
    assert policy.decide_start(8) == ResizeDecision(4, policy.decide_start(8).reason)
    assert isinstance(policy.decide_start(3), WaitDecision)
    assert isinstance(policy.decide_grow(4, 10), NoopDecision)
    with pytest.raises(MisconfigurationException, match="num_workers=0"):
        FixedScaling(0)


def test_elastic_start_after_loss_and_grow():
    policy = ElasticScaling(2, 4)
    assert policy.decide_start(8).num_workers == 4
    assert policy.decide_start(3).num_workers == 3
    wait = policy.decide_start(1)
    assert isinstance(wait, WaitDecision) and "at least 2" in wait.reason
    grow = policy.decide_grow(2, 5)
    assert isinstance(grow, ResizeDecision) and grow.num_workers == 4 and "2 -> 4" in grow.reason
    assert policy.decide_grow(2, 1).num_workers == 3
    assert isinstance(policy.decide_grow(2, 0), NoopDecision)
    assert isinstance(policy.decide_grow(4, 3), NoopDecision)


@pytest.mark.parametrize("bounds", [(0, 2), (3, 2)])
def test_elastic_bounds_validated(bounds):
    with pytest.raises(MisconfigurationException, match="min <= max"):
        ElasticScaling(*bounds)


def test_scaling_policy_from_the_option():
    assert scaling_policy(3) == FixedScaling(3)
    assert scaling_policy((1, 4)) == ElasticScaling(1, 4)
    with pytest.raises(MisconfigurationException, match="min, max"):
        scaling_policy((1, 2, 3))  # type: ignore[arg-type]


# --- accumulation --------------------------------------------------------------------------
def test_keep_global_batch_when_it_divides():
    assert decide_accumulation(4, 2, 2).accumulate == 4
    assert decide_accumulation(4, 2, 8).accumulate == 1
    assert decide_accumulation(4, 3, 6).exact


def test_nearest_value_with_a_reason_when_it_does_not_divide():
    inexact = decide_accumulation(4, 1, 3)
    assert inexact.accumulate == 1 and not inexact.exact
    assert "do not divide over 3 workers" in inexact.reason
    assert decide_accumulation(8, 1, 3).accumulate == 3  # 2.67 -> 3
    assert decide_accumulation(2, 1, 8).accumulate == 1  # never below 1
    assert not decide_accumulation(8, 1, 3).exact


def test_keep_per_worker_and_bad_modes():
    assert decide_accumulation(4, 2, 3, mode="keep_per_worker").accumulate == 2
    with pytest.raises(MisconfigurationException, match="keep_global_batch"):
        decide_accumulation(4, 2, 3, mode="linear")
    with pytest.raises(MisconfigurationException, match=">= 1"):
        decide_accumulation(0, 1, 2)


# --- departures (node drain notices, worker SIGTERM) ------------------------------------------
def test_no_notice_no_departure() -> None:
    assert decide_departure(["a", "a", "b"], "a", {}, [], now_ms=0) is None
    # a node that hosts none of our workers is not our business
    assert decide_departure(["a", "b"], "a", {"c": 0}, [], now_ms=0) is None


def test_a_draining_worker_node_continues_without_its_ranks() -> None:
    decision = decide_departure(["a", "b", "b", "c"], "a", {"b": 65_000}, [], now_ms=5_000)
    assert decision.ranks == (1, 2) and decision.nodes == ("b",)
    assert not decision.stop_run
    assert "deadline in 60 s" in decision.reason and "continue without" in decision.reason


def test_a_draining_driver_node_stops_the_run() -> None:
    decision = decide_departure(["a", "b"], "a", {"a": 0}, [], now_ms=0)
    assert decision.stop_run and decision.ranks == (0,)
    assert "deadline" not in decision.reason  # 0: Ray gave none


def test_sigterm_to_a_worker_on_the_driver_node_does_not_stop_the_run() -> None:
    decision = decide_departure(["a", "a"], "a", {}, [1, 7], now_ms=0)
    assert decision.ranks == (1,) and not decision.stop_run  # rank 7 does not exist
    assert "SIGTERM" in decision.reason


# --- restore from peers' memory (policies.decide_restore) --------------------------------
def test_restore_picks_the_newest_complete_held_snapshot_newer_than_the_commit():
    from ray_lit.driver.policies import decide_restore

    decision = decide_restore(4, [(0, 6), (0, 8)], {0: [(0, 6), (0, 8)], 2: [(0, 8)]})
    assert (decision.key, decision.holders[0]) == ((0, 8), 0)
    assert "4 step(s) newer" in decision.reason


def test_restore_uses_storage_when_the_snapshot_is_not_newer_or_not_held():
    from ray_lit.driver.policies import decide_restore

    assert decide_restore(8, [(0, 8)], {0: [(0, 8)]}).key is None  # the commit is as new
    assert decide_restore(2, [(0, 8)], {0: [(0, 6)]}).key is None  # complete != held
    assert decide_restore(2, [], {0: [(0, 8)]}).key is None  # a lost rank's part is missing
    assert decide_restore(None, [(1, 3)], {1: [(1, 3)], 0: []}).holders == (1,)
    # the lost rank's part of the latest snapshot never arrived: the one before is used
    assert decide_restore(2, [(0, 7)], {0: [(0, 7), (0, 8)]}).key == (0, 7)


def test_the_ledger_keeps_parts_until_a_newer_snapshot_is_complete():
    from ray_lit.driver.snapshot_ledger import SnapshotLedger

    ledger = SnapshotLedger()
    ledger.add((0, 4), 0, 2, b"a")
    ledger.add((0, 4), 1, 2, b"b")
    ledger.add((0, 8), 0, 2, b"c")
    assert ledger.complete() == [(0, 4)]  # 8 waits for rank 1's part
    ledger.add((0, 8), 1, 2, b"d")
    assert ledger.complete() == [(0, 8)] and ledger.parts((0, 8)) == {0: b"c", 1: b"d"}


# --- regrouping around kept workers ------------------------------------------------------------
def test_regroup_refills_lost_places_that_are_available():
    from ray_lit.driver.policies import decide_regroup

    decision = decide_regroup(kept=3, free_slots=[1], want=4, min_workers=4)
    assert decision.fill == (1,) and decision.num_workers == 4


def test_regroup_shrinks_to_the_kept_workers_when_allowed():
    from ray_lit.driver.policies import decide_regroup

    decision = decide_regroup(kept=2, free_slots=[], want=4, min_workers=2)
    assert decision.fill == () and decision.num_workers == 2
    assert "2 place(s) not available now" in decision.reason
    assert decide_regroup(kept=1, free_slots=[], want=4, min_workers=2) is None  # below min
    assert decide_regroup(kept=3, free_slots=[], want=4, min_workers=4) is None  # fixed size
    assert decide_regroup(kept=0, free_slots=[0, 1], want=2, min_workers=1) is None


def test_regroup_takes_no_more_places_than_wanted():
    from ray_lit.driver.policies import decide_regroup

    decision = decide_regroup(kept=1, free_slots=[1, 2, 3], want=3, min_workers=1)
    assert decision.fill == (1, 2) and decision.num_workers == 3
