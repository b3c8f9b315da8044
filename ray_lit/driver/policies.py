"""Failure and scaling policies: observed state in, a frozen decision out (pure, no Ray).

The controller observes (a worker failed, N workers can be placed), asks a policy, and acts on
the returned decision, logging its ``reason``. Keeping the policies free of actors makes every
branch a one-line unit test (Ray Train v2's ``failure_policy.py`` / ``scaling_policy.py``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Literal

from ray_lit.errors import MisconfigurationException

__all__ = [
    "AccumulationDecision",
    "Decision",
    "DepartureDecision",
    "ElasticScaling",
    "FailureDecision",
    "FailurePolicy",
    "FixedScaling",
    "NoopDecision",
    "RegroupDecision",
    "ResizeDecision",
    "ScalingPolicy",
    "WaitDecision",
    "WorkerError",
    "decide_accumulation",
    "decide_departure",
    "decide_regroup",
    "is_peer_loss",
    "root_cause",
    "scaling_policy",
]

ErrorKind = Literal["actor_died", "node_died", "user_error", "hang", "preempted"]
_KINDS = ("actor_died", "node_died", "user_error", "hang", "preempted")


# --- failures --------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerError:
    """What the controller observed about one failed worker.

    Attributes:
        world_rank: the failed worker's rank.
        node_id: its Ray node id.
        node_ip: its node's IP.
        traceback: the formatted traceback or Ray's error text.
        kind: ``actor_died`` (process gone), ``node_died``, ``user_error`` (an exception from
            the user's code), ``hang`` (no progress within the hang timeout) or ``preempted``
            (the node is being drained).
    """

    world_rank: int | None
    node_id: str | None
    node_ip: str | None
    traceback: str
    kind: ErrorKind

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"WorkerError.kind={self.kind!r}; expected one of {_KINDS}")


class FailureDecision(enum.Enum):
    RESTART = "restart"
    RAISE = "raise"


@dataclass(frozen=True)
class Decision:
    """A failure policy's verdict.

    Attributes:
        decision: RESTART (a new worker group from the latest checkpoint) or RAISE.
        reason: why, in words, for the controller's log and the final error.
        counts_as_failure: whether the restart uses up one of ``max_failures`` (preemption
            does not: it is the cluster's doing, not the run's).
    """

    decision: FailureDecision
    reason: str
    counts_as_failure: bool = True

    @property
    def name(self) -> str:
        """``"RESTART"`` or ``"RAISE"``."""
        return self.decision.name


@dataclass(frozen=True)
class FailurePolicy:
    """Restart after infrastructure failures while ``max_failures`` allows; raise user errors.

    An exception raised by the user's code (a ``ValueError`` in ``training_step``) is raised at
    once: the restarted group would replay the same batches from the same checkpoint and fail
    the same way, so restarting only delays the error (set ``retry_user_errors`` for code that
    fails transiently, e.g. flaky remote reads). Actor deaths, node deaths and hangs restart.

    Attributes:
        max_failures: restarts allowed; ``-1`` means unlimited, ``0`` none.
        retry_user_errors: treat user exceptions like infrastructure failures.
    """

    max_failures: int
    retry_user_errors: bool = False

    def __post_init__(self) -> None:
        if self.max_failures < -1:
            raise MisconfigurationException(
                f"max_failures={self.max_failures}; use -1 (unlimited), 0 (no restarts) or a "
                "positive number of restarts.")

    def decide(self, failures_so_far: int, error: WorkerError) -> Decision:
        """Restart or raise after ``error``, given ``failures_so_far`` earlier restarts."""
        where = f"rank {error.world_rank} on {error.node_ip or error.node_id}"
        if error.kind == "preempted":
            return Decision(FailureDecision.RESTART,
                            f"{where} was preempted; restarting does not count as a failure",
                            counts_as_failure=False)
        if error.kind == "user_error" and not self.retry_user_errors:
            return Decision(FailureDecision.RAISE,
                            f"{where} raised an exception in user code; a restart would replay "
                            "the same steps and fail again")
        if self.max_failures == -1:
            return Decision(FailureDecision.RESTART,
                            f"{where}: {error.kind}; restart {failures_so_far + 1} "
                            "(max_failures=-1, unlimited)")
        if failures_so_far < self.max_failures:
            return Decision(FailureDecision.RESTART,
                            f"{where}: {error.kind}; restart {failures_so_far + 1} of "
                            f"{self.max_failures}")
        return Decision(FailureDecision.RAISE,
                        f"{where}: {error.kind}; {failures_so_far} restart(s) already used "
                        f"(max_failures={self.max_failures})")


# the text of an error a collective raises when a peer went away: a symptom of another rank's
# death, not a bug in the failing rank's code
PEER_LOSS_MARKERS = ("Connection closed by peer", "Connection reset by peer", "DistBackendError",
                     "NCCL communicator was aborted", "Broken pipe", "Socket Timeout",
                     "PeerSnapshotLost")
_PEER_LOSS_TYPES = ("DistBackendError", "PeerSnapshotLost")


def is_peer_loss(exception_type: str | None, text: str) -> bool:
    """True when a rank's failure (its exception's type name, its traceback) says a peer went
    away rather than that its own code failed."""
    return exception_type in _PEER_LOSS_TYPES or any(m in text for m in PEER_LOSS_MARKERS)


_CAUSE_ORDER = {"node_died": 0, "actor_died": 1, "hang": 2, "user_error": 3, "preempted": 4}


def root_cause(failures: list[tuple[str, bool, bool]]) -> int:
    """Which of an attempt's failures, given as ``(kind, peer_symptom, has_exception)``, is
    the cause the run reports: a dead worker before a hang before a user error, and within a
    kind a failure that is not a peer's symptom. Returns its index."""
    return min(range(len(failures)), key=lambda i: (
        _CAUSE_ORDER.get(failures[i][0], 5), failures[i][1], failures[i][2]))


# --- scaling ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResizeDecision:
    """Start (or restart) a worker group of ``num_workers``."""

    num_workers: int
    reason: str


@dataclass(frozen=True)
class WaitDecision:
    """Too few workers can be placed now; wait for resources and ask again."""

    reason: str


@dataclass(frozen=True)
class NoopDecision:
    """Keep the current worker group."""

    reason: str


class ScalingPolicy:
    """How many workers to run. Subclasses are frozen dataclasses."""

    min_workers: int
    max_workers: int

    def decide_start(self, available_workers: int) -> ResizeDecision | WaitDecision:
        """At the start of a run, with ``available_workers`` bundles placeable now."""
        if available_workers < self.min_workers:
            return WaitDecision(f"{available_workers} worker(s) placeable, need at least "
                                f"{self.min_workers}")
        size = min(available_workers, self.max_workers)
        return ResizeDecision(size, f"{available_workers} worker(s) placeable; starting {size}"
                                    f" (min {self.min_workers}, max {self.max_workers})")

    def decide_grow(self, current: int, placeable_extra: int) -> NoopDecision | ResizeDecision:
        """At a checkpoint boundary: grow by up to ``placeable_extra`` workers?"""
        if current >= self.max_workers:
            return NoopDecision(f"{current} worker(s) is already the maximum")
        if placeable_extra <= 0:
            return NoopDecision(f"no extra worker placeable (running {current} of "
                                f"{self.max_workers})")
        size = min(self.max_workers, current + placeable_extra)
        return ResizeDecision(size, f"{placeable_extra} extra worker(s) placeable; growing "
                                    f"{current} -> {size}")


@dataclass(frozen=True)
class FixedScaling(ScalingPolicy):
    """Exactly ``num_workers`` workers; after a loss, a full group of the same size."""

    num_workers: int

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise MisconfigurationException(
                f"num_workers={self.num_workers}: a Ray worker group needs at least 1 worker "
                "(num_workers=0 trains in this process without Ray).")

    @property
    def min_workers(self) -> int:  # type: ignore[override]
        return self.num_workers

    @property
    def max_workers(self) -> int:  # type: ignore[override]
        return self.num_workers

    def decide_grow(self, current: int, placeable_extra: int) -> NoopDecision | ResizeDecision:
        return NoopDecision(f"fixed scaling: num_workers={self.num_workers}")


@dataclass(frozen=True)
class ElasticScaling(ScalingPolicy):
    """Between ``min_workers`` and ``max_workers``: as many as can be placed."""

    min_workers: int
    max_workers: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise MisconfigurationException(
                f"num_workers=({self.min_workers}, {self.max_workers}): elastic bounds need "
                "1 <= min <= max, e.g. num_workers=(2, 4).")


def scaling_policy(num_workers: int | tuple[int, int]) -> FixedScaling | ElasticScaling:
    """The policy for the Trainer's ``num_workers`` option (``N`` or ``(min, max)``)."""
    if isinstance(num_workers, tuple | list):
        if len(num_workers) != 2:
            raise MisconfigurationException(
                f"num_workers={num_workers!r}: an elastic range is (min, max), e.g. (2, 4).")
        return ElasticScaling(int(num_workers[0]), int(num_workers[1]))
    return FixedScaling(int(num_workers))


# --- batch size across world sizes ----------------------------------------------------------
_MODES = ("keep_global_batch", "keep_per_worker")


@dataclass(frozen=True)
class AccumulationDecision:
    """Gradient accumulation for a new world size.

    Attributes:
        accumulate: ``accumulate_grad_batches`` to use.
        exact: the global batch per optimizer step equals the original one.
        reason: how it was chosen.
    """

    accumulate: int
    exact: bool
    reason: str


def decide_accumulation(base_world_size: int, base_accumulate: int, new_world_size: int,
                        mode: str = "keep_global_batch") -> AccumulationDecision:
    """Accumulation that keeps samples per optimizer step constant across a resize.

    ``keep_global_batch``: ``base_world_size * base_accumulate / new_world_size`` when that
    divides, else the nearest integer (at least 1) with ``exact=False``.
    ``keep_per_worker``: ``base_accumulate`` (the global batch scales with the world size).
    """
    if mode not in _MODES:
        raise MisconfigurationException(
            f"elastic batch mode {mode!r} is unknown; use one of {list(_MODES)}.")
    if min(base_world_size, base_accumulate, new_world_size) < 1:
        raise MisconfigurationException(
            f"world sizes and accumulation must be >= 1, got base_world_size={base_world_size}, "
            f"base_accumulate={base_accumulate}, new_world_size={new_world_size}.")
    if mode == "keep_per_worker":
        return AccumulationDecision(base_accumulate, base_world_size == new_world_size,
                                    "keep_per_worker: the global batch scales with the world")
    total = base_world_size * base_accumulate
    if total % new_world_size == 0:
        acc = total // new_world_size
        return AccumulationDecision(acc, True, f"{total} micro-batches per step = "
                                               f"{new_world_size} workers x {acc}")
    acc = max(1, math.floor(total / new_world_size + 0.5))
    return AccumulationDecision(
        acc, False,
        f"{total} micro-batches per step do not divide over {new_world_size} workers; using "
        f"accumulate_grad_batches={acc} ({acc * new_world_size} per step)")


# --- planned departures ----------------------------------------------------------------------
@dataclass(frozen=True)
class DepartureDecision:
    """Workers are about to go (a Ray node drain notice, a SIGTERM to a worker process): every
    rank checkpoints at the same step a little ahead, then the group stops.

    Attributes:
        stop_run: True when the driver's own node is going: the run stops after the checkpoint
            (like a SIGTERM to the driver) and a rerun of the script continues it. False: a new
            worker group continues from that checkpoint without the departing nodes.
        ranks: the world ranks that are leaving.
        nodes: their node ids.
        reason: in words, for the log.
    """

    stop_run: bool
    ranks: tuple[int, ...]
    nodes: tuple[str, ...]
    reason: str


def decide_departure(worker_nodes: list[str], driver_node: str | None,
                     draining: dict[str, int], sigterm_ranks: list[int],
                     now_ms: int) -> DepartureDecision | None:
    """What to do about announced departures (pure).

    Args:
        worker_nodes: the node id of each world rank.
        driver_node: the driver's node id.
        draining: Ray's draining nodes, ``{node_id: deadline_ms}`` (0: no deadline).
        sigterm_ranks: ranks whose worker process received SIGTERM.
        now_ms: the current time (ms since the epoch), for the deadline in the reason.
    """
    drained = {n for n in draining if n in worker_nodes or n == driver_node}
    signalled = {r for r in sigterm_ranks if 0 <= r < len(worker_nodes)}
    ranks = tuple(sorted({r for r, n in enumerate(worker_nodes) if n in drained} | signalled))
    stop_run = driver_node in drained
    if not ranks and not stop_run:
        return None
    nodes = drained | {worker_nodes[r] for r in signalled}
    causes = []
    for node in sorted(drained):
        deadline = draining[node]
        left = f", deadline in {max(0, deadline - now_ms) / 1000:.0f} s" if deadline else ""
        causes.append(f"node {node[:8]} is draining{left}")
    if signalled:
        # a SIGTERM says this process goes, not its node: the next group may use the node
        causes.append(f"SIGTERM to the worker(s) of rank(s) {sorted(signalled)}")
    then = ("the driver's node is going: stop after the checkpoint" if stop_run else
            f"continue without rank(s) {list(ranks)} from that checkpoint")
    return DepartureDecision(stop_run=stop_run, ranks=ranks, nodes=tuple(sorted(nodes)),
                             reason=f"{'; '.join(causes)}; {then}")


# --- regrouping around kept workers ----------------------------------------------------------
@dataclass(frozen=True)
class RegroupDecision:
    """Re-form the group around the kept workers, starting new ones in ``fill`` (placement
    group bundle slots that sit on live nodes).

    Attributes:
        fill: the slots that get a new worker.
        num_workers: the new world size (kept workers plus ``fill``).
        reason: in words, for the log.
    """

    fill: tuple[int, ...]
    num_workers: int
    reason: str


def decide_regroup(kept: int, free_slots: list[int], want: int, min_workers: int
                   ) -> RegroupDecision | None:
    """Whether the next group can be the ``kept`` workers plus new ones in some of the
    ``free_slots`` (pure). ``want``: the size to aim for (the lost group's size after a failure,
    the new size when growing); a fixed-size group has ``min_workers == want``. None: not
    enough places; the kept workers are let go and a new group is sized afresh.
    """
    if kept < 1:
        return None
    size = min(want, kept + len(free_slots))
    if size < max(min_workers, 1):
        return None
    fill = tuple(free_slots[:size - kept])
    if size == kept:
        why = f"continuing with the {kept} kept worker(s)"
    else:
        why = f"{kept} kept worker(s) and {len(fill)} new"
    if size < want:
        why += f" ({want - size} place(s) not available now)"
    return RegroupDecision(fill, size, why)


# --- restore from peers' memory ----------------------------------------------------------------
@dataclass(frozen=True)
class RestoreDecision:
    """Where the next attempt starts: snapshot ``key`` or, with ``key`` None, the latest
    committed storage checkpoint (``reason`` says why, either way).

    ``holders`` are survivors' bundle slots. For a replicated snapshot they are alternatives:
    the first that exports is used. For a sharded (FSDP) one (``sharded``) each is needed:
    together they hold every rank's shards, and the next attempt merges their exports.
    """

    key: tuple[int, int] | None
    holders: tuple[int, ...]
    reason: str
    sharded: bool = False


def _shard_cover(key: tuple[int, int], bundles: list[int],
                 shards: dict[int, dict[tuple[int, int], tuple[int, ...]]], world_size: int
                 ) -> tuple[tuple[int, ...], list[int]]:
    """Survivors (from ``bundles``) that together hold every rank's shards of snapshot
    ``key``, few of them (greedy: each next one adds the most ranks still missing), and the
    ranks none holds (empty when covered)."""
    missing = set(range(world_size))
    chosen: list[int] = []
    while missing:
        gains = {b: missing & set(shards.get(b, {}).get(key, ())) for b in bundles
                 if b not in chosen}
        best = max(gains, key=lambda b: (len(gains[b]), -b), default=None)
        if best is None or not gains[best]:
            break
        chosen.append(best)
        missing -= gains[best]
    return tuple(sorted(chosen)), sorted(missing)


def decide_restore(committed_step: int | None, complete: list[tuple[int, int]],
                   held: dict[int, list[tuple[int, int]]],
                   shards: dict[int, dict[tuple[int, int], tuple[int, ...]]] | None = None,
                   world_sizes: dict[tuple[int, int], int] | None = None) -> RestoreDecision:
    """The newest peer snapshot that is complete on the driver, held by survivors, and newer
    than the latest committed checkpoint; else storage (pure).

    Args:
        committed_step: the global step of the latest committed checkpoint (None: none).
        complete: the ledger's complete snapshots, ``(attempt, step)``.
        held: the snapshots each surviving worker holds, by bundle index.
        shards: per survivor (bundle index), per sharded (FSDP) snapshot it holds, the ranks
            whose shards it holds (``LeftBehind.shards``). A snapshot any survivor reports
            here is usable only when the survivors together hold every rank's shards.
        world_sizes: the world size of each complete snapshot (the ledger's), for ``shards``.
    """
    shards, world_sizes = shards or {}, world_sizes or {}
    floor = -1 if committed_step is None else committed_step
    holders: dict[tuple[int, int], list[int]] = {}
    for bundle, keys in sorted(held.items()):
        for key in keys or []:
            holders.setdefault(tuple(key), []).append(bundle)
    usable = [k for k in complete if k in holders and k[1] > floor]
    if not usable:
        why = "no survivor holds a complete snapshot" if not any(
            k in holders for k in complete) else "the latest checkpoint is as new"
        return RestoreDecision(None, (), why)

    def than(key: tuple[int, int]) -> str:
        if committed_step is None:
            return "no checkpoint committed yet"
        return f"{key[1] - floor} step(s) newer than the latest checkpoint"

    uncovered = ""
    for key in sorted(usable, key=lambda k: k[1], reverse=True):  # the newest that works
        if not any(key in shards.get(b, {}) for b in holders[key]):  # replicated: any one
            return RestoreDecision(key, tuple(holders[key]),
                                   f"step {key[1]} from a surviving worker's memory, "
                                   f"{than(key)}")
        world_size = world_sizes.get(key, 0)
        cover, missing = _shard_cover(key, holders[key], shards, world_size)
        if world_size and not missing:
            who = ("a surviving worker's" if len(cover) == 1
                   else f"{len(cover)} surviving workers'")
            return RestoreDecision(key, cover,
                                   f"step {key[1]} from {who} memory, {than(key)} (FSDP "
                                   f"shards of all {world_size} ranks)", sharded=True)
        uncovered = uncovered or (
            f"no survivor holds the FSDP shards of rank(s) {missing} of {world_size} for "
            f"step {key[1]} (a lost rank's shards are kept only by the next rank in the ring, "
            f"lost too)")
    return RestoreDecision(None, (), uncovered)
