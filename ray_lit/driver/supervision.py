"""``SupervisionConfig``: every timeout and interval of the driver's supervision, in one place.

The controller, the worker group and the worker's SIGTERM handler used to carry about fourteen
literals of their own; they read them from here now. Tests pass ``SupervisionConfig.fast()``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SupervisionConfig:
    """How the driver watches a worker group (seconds).

    Attributes:
        poll_wait_s: the longest the driver waits for any rank's news in one round of its
            supervision loop (a finished or failed loop, a checkpoint part, a SIGTERM, rank 0's
            metrics end it at once); the driver's own checks (drain notices, growth, a
            SIGTERM to the driver) run between rounds.
        poll_interval_s: the least time between two rounds (news every step still makes no
            more than ``1 / poll_interval_s`` rounds a second).
        poll_timeout_s: a worker that does not answer a poll within this (beyond its wait) is
            treated as hung.
        heartbeat_s: the longest a rank without news stays silent: its long poll answers
            after this at the latest (the driver's cost per worker is one call per
            heartbeat, not one per round). Shortened to half the hang timeout where that is
            shorter, so a silent rank is never taken for a hung one.
        hang_check_interval_s: how often the driver looks over every rank for one without
            progress (the only per-rank sweep of the loop; a suspect's status is refreshed
            before it is called hung).
        root_cause_grace_s: how long Ray may take to report the death behind a failure.
        grow_check_interval_s: how often an elastic group below its maximum looks for room.
        drain_check_interval_s: how often Ray's node drain notices are read.
        lost_recheck_s: how often a node a probe once missed is probed again.
        abort_timeout_s: how long a survivor's loop may take to leave a failed attempt.
        abort_timeout_lost_node_s: the same when a node was lost (a survivor stuck in a
            collective with the lost node's worker is replaced sooner).
        stop_request_timeout_s: how long asking every rank to stop at a step may take.
        snapshot_export_timeout_s: how long a survivor may take to export a peer snapshot.
        hang_floor_s: with ``worker_hang_timeout_s="auto"``, a rank is hung after no progress
            for max(``hang_floor_s``, ``hang_step_factor`` x its slowest step).
        hang_step_factor: see ``hang_floor_s``.
        stacks_timeout_s: how long collecting every rank's stacks after a hang may take.
    """

    poll_wait_s: float = 0.5
    poll_interval_s: float = 0.1
    poll_timeout_s: float = 30.0
    heartbeat_s: float = 5.0
    hang_check_interval_s: float = 0.5
    root_cause_grace_s: float = 5.0
    grow_check_interval_s: float = 2.0
    drain_check_interval_s: float = 1.0
    lost_recheck_s: float = 10.0
    abort_timeout_s: float = 10.0
    abort_timeout_lost_node_s: float = 3.0
    stop_request_timeout_s: float = 30.0
    snapshot_export_timeout_s: float = 120.0
    hang_floor_s: float = 60.0
    hang_step_factor: float = 20.0
    stacks_timeout_s: float = 10.0

    @classmethod
    def fast(cls, **overrides: float) -> SupervisionConfig:
        """Polls without waiting and checks at every poll: a controller on fakes runs in
        milliseconds."""
        base = cls(poll_wait_s=0.0, poll_interval_s=0.0, root_cause_grace_s=0.2,
                   grow_check_interval_s=0.0, drain_check_interval_s=0.0,
                   hang_check_interval_s=0.0)
        return replace(base, **overrides)
