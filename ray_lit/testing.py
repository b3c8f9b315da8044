"""Test doubles: a fake worker group with scripted failures and a fake cluster, so the
controller (attempts, failure handling, departures, elastic sizing) is unit-tested without Ray.

    from ray_lit.driver.controller import Controller
    from ray_lit.testing import FakeCluster, FakeWorkerGroups, ScriptedAttempt, controller_for

    groups = FakeWorkerGroups([ScriptedAttempt(die=(1, 2)), ScriptedAttempt()])
    controller = controller_for(Trainer(num_workers=2), groups)
    controller.run()                      # the second attempt's rank 0 result
    groups.created[1]["kept"]             # 1: rank 0 survived the first attempt

A fake group moves in lockstep: every poll of the controller is one optimizer step on every
running rank. Nothing here starts a process; ``SupervisionConfig.fast()`` makes a run take
milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import cloudpickle

from ray_lit.driver.worker_group import WorkerGone
from ray_lit.messages import (
    HandedOver,
    Job,
    RankStacks,
    WorkerFailure,
    WorkerState,
    WorkerStatus,
)

__all__ = ["FakeCluster", "FakeWorkerGroup", "FakeWorkerGroups", "PrintLog", "ScriptedAttempt",
           "controller_for"]


@dataclass
class ScriptedAttempt:
    """How one attempt of a fake worker group behaves, step by step.

    Attributes:
        steps: optimizer steps until every rank is done (the attempt's own count).
        die: ``(rank, step)``: the rank's actor is gone from that step on; its peers fail in
            their next collective (as gloo reports it).
        user_error: ``(rank, step, exception)``: the rank's loop raises the exception.
        hang: ``(rank, step)``: the rank makes no progress from that step on.
        sigterm: ``(rank, step)``: the rank's process got SIGTERM at that step.
        at_step: callbacks run when the group reaches a step (change a ``FakeCluster`` there).
        result: what rank 0 returns when done.
        nodes: the node of each rank in this attempt (default: ``FakeWorkerGroups.nodes``).
        confirmations: ``{step: [PartWritten(name, rank, world_size, meta), ...]}``: parts
            the ranks report written at that step (their polls carry them); also in-memory
            snapshot parts, ``SnapshotPart((attempt, step), rank, world_size, data)``.
        leftover_confirmations: parts the survivors finish writing while they leave a failed
            group (``salvage`` hands them over).
        held_snapshots: the in-memory snapshot keys ``(attempt, step)`` every survivor holds.
        stuck: ranks whose loop does not end when the group is salvaged (alive, replaced).
        die_too: more ranks whose actors are gone at ``die``'s step (several lost at once).
        shard_ring: the held snapshots are FSDP shards (``checkpoint.shard_ring``): the
            survivor of rank ``r`` holds the shards of ranks ``r`` and ``r - 1`` only.
        export_fails: bundle slots whose snapshot export fails (the holder went meanwhile).
        long_phase: ``(rank, step)``: the rank is in a ``ray_lit.long_phase`` from that step on.
    """

    steps: int = 4
    die: tuple[int, int] | None = None
    user_error: tuple[int, int, BaseException] | None = None
    hang: tuple[int, int] | None = None
    sigterm: tuple[int, int] | None = None
    at_step: dict[int, Callable[[], None]] = field(default_factory=dict)
    result: Any = b"rank0-result"
    nodes: list[str] | None = None
    confirmations: dict[int, list[HandedOver]] = field(default_factory=dict)
    leftover_confirmations: list[HandedOver] = field(default_factory=list)
    held_snapshots: list[tuple[int, int]] = field(default_factory=list)
    stuck: tuple[int, ...] = ()
    long_phase: tuple[int, int] | None = None
    die_too: tuple[int, ...] = ()
    shard_ring: bool = False
    export_fails: tuple[int, ...] = ()


@dataclass
class _FakeWorker:
    node_id: str
    node_ip: str
    actor: Any = None


@dataclass
class _FakeSurvivors:
    placement_group: Any
    owned: bool
    offset: int
    slots: list[int]
    actors: dict[int, Any]
    dead_nodes: list[str] = field(default_factory=list)
    confirmations: list[HandedOver] = field(default_factory=list)
    snapshots: dict[int, Any] = field(default_factory=dict)
    capacity: int = 0
    fill: list[int] = field(default_factory=list)
    stuck: dict[int, Any] = field(default_factory=dict)
    released: bool = False
    exported: list[tuple] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    shards: dict[int, dict[Any, tuple[int, ...]]] = field(default_factory=dict)
    export_fails: tuple[int, ...] = ()

    def drop_stuck(self) -> None:
        self.dropped.extend(self.stuck)
        self.stuck = {}

    @property
    def num_workers(self) -> int:
        return len(self.slots)

    def export_snapshot(self, bundle: int, key: Any) -> Any:
        assert bundle in self.actors or bundle in self.stuck, bundle
        self.exported.append((bundle, key))
        if bundle in self.export_fails:
            return None
        return f"snapshot-ref-{key}" + (f"-{bundle}" if self.shards else "")

    def release(self) -> None:
        self.drop_stuck()
        self.released = True
        self.actors = {}


class FakeWorkerGroup:
    """One attempt's workers, following a ``ScriptedAttempt``."""

    def __init__(self, script: ScriptedAttempt, nodes: list[str], slots: list[int] | None = None,
                 capacity: int | None = None) -> None:
        self.script = script
        self.workers = [_FakeWorker(node, f"10.0.0.{i}") for i, node in enumerate(nodes)]
        self.slots = slots if slots is not None else list(range(len(nodes)))
        self.capacity = capacity if capacity is not None else len(nodes)
        self.placement_group, self.offset = "fake-pg", 0
        self.step = 0
        self.stop_at: int | None = None
        self.job: Job | None = None
        self.shut_down = False
        self.salvaged = False
        self._reported: dict[int, int] = {}

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def run(self, payload_ref: Any, job: Job) -> None:
        self.job = job  # what the ranks received

    def request_stop_at(self, step: int) -> None:
        self.stop_at = step

    def statuses(self, timeout_s: float = 30.0,
                 wait_s: float = 0.0) -> list[WorkerStatus | WorkerGone]:
        script = self.script
        stopped = self.stop_at is not None and self.step >= self.stop_at
        if self.step < script.steps and not stopped:
            self.step += 1
            if self.step in script.at_step:
                script.at_step[self.step]()
        return [self._status(rank) for rank in range(self.world_size)]

    def news(self, *, wait_s: float = 0.0, heartbeat_s: float = 5.0,
             timeout_s: float = 30.0) -> dict[int, WorkerStatus | WorkerGone]:
        """One round of news: in lockstep every rank has news (its step) in every round."""
        return dict(enumerate(self.statuses(timeout_s, wait_s)))

    def wake(self, ranks: list[int]) -> None:
        """Nothing to wake: every rank answers every round."""

    def end_news(self, timeout_s: float = 2.0) -> dict[int, WorkerStatus | WorkerGone]:
        return {}

    def _status(self, rank: int) -> WorkerStatus | WorkerGone:
        script, step = self.script, self.step
        reported = [c for c in script.confirmations.get(step, []) if c.rank == rank] \
            if self._fresh_step(rank) else []
        status = WorkerStatus(WorkerState.RUNNING, handed_over=tuple(reported),
                              global_step=step, steps=step,
                              sigterm=bool(script.sigterm and script.sigterm[0] == rank
                                           and step >= script.sigterm[1]),
                              long_phase=bool(script.long_phase and script.long_phase[0] == rank
                                              and step >= script.long_phase[1]))
        if script.die and step >= script.die[1]:
            if rank == script.die[0] or rank in script.die_too:
                return WorkerGone("actor_died", f"The actor of rank {rank} died unexpectedly")
            return replace(status, state=WorkerState.FAILED, failure=WorkerFailure(
                "RuntimeError: [gloo] Connection closed by peer"))
        if script.user_error and rank == script.user_error[0] and step >= script.user_error[1]:
            return replace(status, state=WorkerState.FAILED, failure=WorkerFailure(
                f"Traceback: {script.user_error[2]!r}", cloudpickle.dumps(script.user_error[2])))
        if script.hang and rank == script.hang[0] and step >= script.hang[1]:
            return replace(status, idle_s=1e6)
        if self.stop_at is not None and step >= self.stop_at:
            return replace(status, state=WorkerState.PREEMPTED)
        if step >= script.steps:
            return replace(status, state=WorkerState.DONE,
                           result=script.result if rank == 0 else None)
        return status

    def _fresh_step(self, rank: int) -> bool:
        """True the first time ``rank`` is polled at the current step (report once)."""
        if self._reported.get(rank) == self.step:
            return False
        self._reported[rank] = self.step
        return True

    def stacks(self, timeout_s: float = 10.0) -> list[RankStacks | None]:
        """The scripted hung rank sits in user code; the others wait in a collective."""
        hung = self.script.hang[0] if self.script.hang else None
        return [RankStacks(rank, f"--- rank {rank} ---\n", in_collective=rank != hung,
                           where='File "train.py", line 7, in training_step'
                           if rank == hung else "torch/distributed/distributed_c10d.py")
                for rank in range(self.world_size)]

    def alive(self, timeout_s: float = 10.0) -> bool:
        """False once shut down, or when a test marked it dead (``dead = True``)."""
        return not self.shut_down and not getattr(self, "dead", False)

    def reset_for_reuse(self, script: ScriptedAttempt) -> None:
        """A kept group running the next call of its Trainer, following ``script``."""
        self.script, self.step, self.stop_at, self._reported = script, 0, None, {}

    def shutdown(self, graceful: bool = True) -> None:
        self.shut_down = True

    def salvage(self, abort_timeout_s: float = 10.0, lost_nodes: Any = (),
                hung_rank: int | None = None) -> _FakeSurvivors | None:
        """Keep every rank that the script did not kill (and that is not on a lost node)."""
        self.salvaged = True
        self.hung_rank = hung_rank  # the rank the controller named as hung, for the tests
        dead = {self.script.die[0], *self.script.die_too} \
            if self.script.die and self.step >= self.script.die[1] else set()
        live = {self.slots[r] for r in range(self.world_size)
                if r not in dead and self.workers[r].node_id not in lost_nodes}
        stuck = {self.slots[r]: object() for r in self.script.stuck if self.slots[r] in live}
        alive = {s: object() for s in live if s not in stuck}
        dead_nodes = [w.node_id for r, w in enumerate(self.workers)
                      if self.slots[r] not in live]
        if not live:
            return None
        shards = {}
        if self.script.shard_ring:  # rank r keeps its own shards and rank r - 1's
            n = self.world_size
            shards = {self.slots[r]: {k: tuple(sorted({r, (r - 1) % n}))
                                      for k in self.script.held_snapshots}
                      for r in range(n) if self.slots[r] in live}
        return _FakeSurvivors("fake-pg", True, 0, list(self.slots), alive, dead_nodes,
                              confirmations=list(self.script.leftover_confirmations),
                              snapshots={s: list(self.script.held_snapshots) for s in live},
                              capacity=self.capacity, stuck=stuck, shards=shards,
                              export_fails=self.script.export_fails)


class FakeWorkerGroups:
    """Stands in for ``WorkerGroup.create``: attempt ``i`` follows ``attempts[i]`` (the last
    one repeats). ``created`` records each call; ``groups`` the groups made."""

    def __init__(self, attempts: list[ScriptedAttempt], nodes: list[str] | None = None,
                 refuse_survivors: bool = False) -> None:
        self.attempts = attempts
        self.nodes = nodes
        self.refuse_survivors = refuse_survivors  # a replacement dies while re-forming
        self.created: list[dict[str, Any]] = []
        self.groups: list[FakeWorkerGroup] = []

    def __call__(self, *, num_workers: int, survivors: Any = None, **options: Any
                 ) -> FakeWorkerGroup:
        if survivors is not None and self.refuse_survivors:
            self.created.append({"num_workers": num_workers, "kept": len(survivors.actors),
                                 "failed": True})
            survivors.release()
            raise RuntimeError("the replacement actor died before it could start")
        index = min(len(self.groups), len(self.attempts) - 1)
        script = self.attempts[index]
        nodes = (script.nodes or self.nodes or ["node-a"] * num_workers)[:num_workers]
        nodes += [nodes[-1] if nodes else "node-a"] * (num_workers - len(nodes))
        if survivors is not None:
            slots = sorted(survivors.actors) + list(survivors.fill)
            group = FakeWorkerGroup(script, nodes, slots, survivors.capacity)
            self.created.append({"num_workers": num_workers, "kept": len(survivors.actors),
                                 "fill": list(survivors.fill)})
        else:
            group = FakeWorkerGroup(script, nodes)
            self.created.append({"num_workers": num_workers, "kept": 0})
        self.groups.append(group)
        return group


class FakeCluster:
    """Stands in for ``ClusterView``; tests set its attributes (also from ``at_step``)."""

    def __init__(self, driver: str = "node-a", free: list[dict[str, float]] | None = None
                 ) -> None:
        self.driver = driver
        self.draining: dict[str, int] = {}
        self.free = free if free is not None else [{"CPU": 8.0}]
        self.placed = True  # False: no bundle of a placement group sits on a live node
        self.unplaced: set[int] = set()  # bundle indices not on a live node
        self.lost: set[str] = set()  # nodes a probe does not reach
        self.placements: dict[int, str] = {}  # where bundles sit (default: the driver's node)

    def driver_node(self) -> str | None:
        return self.driver

    def draining_nodes(self) -> dict[str, int]:
        return dict(self.draining)

    def free_per_node(self) -> list[dict[str, float]]:
        return list(self.free)

    def bundle_nodes(self, placement_group: Any) -> dict[int, str]:
        if not self.placed:
            return {}
        return {i: self.placements.get(i, self.driver) for i in range(64)
                if i not in self.unplaced}

    def unreachable(self, node_ids: list[str], timeout_s: float = 3.0) -> set[str]:
        return set(node_ids) if not self.placed else {n for n in node_ids if n in self.lost}

    def reachable(self, node_ids: list[str], timeout_s: float = 3.0) -> bool:
        return not self.unreachable(node_ids, timeout_s)


class PrintLog:
    """A driver sink that keeps what the controller prints."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str) -> None:
        self.lines.append(text)

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None  # events a fake group never sends


def controller_for(trainer: Any, groups: FakeWorkerGroups, cluster: FakeCluster | None = None,
                   stage: str = "fit", hang_timeout_s: float | None = None,
                   manager: Any = None, reuse: Any = None, keep_group: bool = False,
                   **supervision: float) -> Any:
    """A ``Controller`` for ``trainer`` that runs on fakes, polling without sleeping
    (``SupervisionConfig.fast()``; ``supervision`` overrides its fields). ``reuse`` and
    ``keep_group`` as for ``Controller`` (a Trainer's kept group)."""
    from ray_lit.driver.controller import Controller
    from ray_lit.driver.placement import resolve_worker_resources
    from ray_lit.driver.supervision import SupervisionConfig

    config = trainer.config
    workers = config.num_workers
    options = {"num_workers": workers[1] if isinstance(workers, tuple) else workers,
               "per_worker": resolve_worker_resources(use_gpu=False, accelerator="cpu"),
               "strategy": "PACK", "device_type": "cpu", "placement_timeout_s": 0.0,
               "pg_timeout_s": 1.0, "env": {}}
    return Controller(trainer=trainer, payload_ref=None, job=Job(stage=stage),
                      group_options=options, sink=PrintLog(), manager=manager,
                      hang_timeout_s=hang_timeout_s,
                      supervision=SupervisionConfig.fast(**supervision),
                      create_group=groups, cluster=cluster or FakeCluster(),
                      reuse=reuse, keep_group=keep_group)
