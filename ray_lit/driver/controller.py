"""The controller: runs attempts of a worker group until the stage finishes or a policy says
stop. It is the only code that acts on actors; the failure policy decides.

One attempt: create the worker group (from the latest committed checkpoint when there is one),
start the stage, then supervise: long-poll every worker (a poll returns at once when a rank
has news, else after ``poll_wait_s``; never per step), replay rank 0's events into the
driver's loggers and progress bar, commit checkpoints whose parts every rank confirmed, and
notice a dead actor (Ray's own error on the poll), a failed rank, or a rank that stopped making
progress. On failure the group is torn down and the policy decides between a new attempt and
raising. Announced departures (a Ray node drain notice, a SIGTERM to a worker or to the driver)
and elastic growth are planned: every rank checkpoints at the same step, then the next attempt
starts from that checkpoint.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ray_lit.driver.cluster_view import ClusterView
from ray_lit.driver.policies import (
    DepartureDecision,
    ElasticScaling,
    FailurePolicy,
    ResizeDecision,
    WorkerError,
    decide_accumulation,
    decide_departure,
    decide_regroup,
    decide_restore,
    scaling_policy,
)
from ray_lit.driver.reporting import replay
from ray_lit.driver.snapshot_ledger import SnapshotLedger
from ray_lit.driver.worker_group import Survivors, WorkerGone, WorkerGroup
from ray_lit.errors import MisconfigurationException, TrainingFailedError
from ray_lit.messages import (
    FromPeers,
    FromStorage,
    HandedOver,
    Job,
    SnapshotPart,
    WorkerFailure,
    WorkerState,
    WorkerStatus,
)


@dataclass
class AttemptOutcome:
    result: Any = None
    error: WorkerError | None = None
    exception: BaseException | None = None
    preempted: bool = False
    resize_to: int | None = None
    departed: DepartureDecision | None = None
    peer_symptom: bool = False  # failed in a collective because a peer went away


class Controller:
    """Driver-side owner of the worker groups of one stage (fit, validate or test)."""

    keep_survivors = True  # reuse the live workers after a loss (benchmarks turn it off)
    root_cause_grace_s = 5.0  # how long Ray may take to report the death behind a failure

    def __init__(self, *, trainer: Any, payload_ref: Any, job: Job,
                 group_options: dict[str, Any], sink: Any, manager: Any = None,
                 hang_timeout_s: float | None = None, poll_interval_s: float = 0.1,
                 poll_wait_s: float = 0.5,
                 create_group: Any = None, cluster: Any = None) -> None:
        """``create_group`` (``WorkerGroup.create``) and ``cluster`` (``ClusterView()``) are
        where the controller meets Ray; ``ray_lit.testing`` passes fakes.

        ``poll_wait_s`` is the longest a supervision poll waits for news from the workers (a
        finished or failed loop, a written checkpoint part, a SIGTERM end it at once; a dead
        actor's error too); ``poll_interval_s`` the least time between two polls (news as
        often as every step, snapshot parts say, still makes no more than 10 polls a second).
        """
        self.create_group = create_group or WorkerGroup.create
        self.cluster = cluster or ClusterView()
        self.trainer = trainer
        self.payload_ref = payload_ref
        self.job = job
        self.group_options = group_options
        self.sink = sink
        self.manager = manager
        self.policy = FailurePolicy(trainer.config.max_failures)
        self.hang_timeout_s = hang_timeout_s
        self.poll_interval_s = poll_interval_s
        self.poll_wait_s = poll_wait_s
        self.failures = 0
        self.recovery_times: list[float] = []
        self._preempt = threading.Event()
        self._interrupted = threading.Event()  # a Ctrl-C arrived: raised again if swallowed
        self._failed_at: float | None = None
        self.scaling = scaling_policy(trainer.config.num_workers)
        self.elastic = isinstance(self.scaling, ElasticScaling)
        self.grow_check_interval_s = 2.0
        self.drain_check_interval_s = 1.0
        self._next_size: int | None = None
        self._attempts = 0
        self._survivors: Survivors | None = None
        self._answered: set[str] = set()  # nodes a probe just reached (after a failure)
        self._unreachable: set[str] = set()  # nodes a probe did not reach (a lost node)
        # every node found lost: Ray lists one as alive (and its bundles as placed there) for
        # a while after it went
        self._lost_nodes: set[str] = set()
        self.lost_recheck_s = 10.0
        self._last_lost_check = 0.0
        self.ledger = SnapshotLedger()  # every rank's own part of the in-memory snapshots
        # where each later attempt started: ("storage" | "memory" | "start", global step)
        self.restored_from: list[tuple[str, int]] = []

    # --- attempts -------------------------------------------------------------------------------
    def run(self) -> Any:
        """Run attempts until one finishes; returns rank 0's result (bytes)."""
        try:
            return self._run_attempts()
        finally:
            if self._survivors is not None:  # a raise after a failure: nobody needs them
                self._survivors.release()
                self._survivors = None

    def _run_attempts(self) -> Any:
        with self._sigterm_requests_checkpoint():
            while True:
                outcome = self._attempt()
                if outcome.resize_to is not None or outcome.departed is not None:
                    # a planned resize or departure, not a failure
                    self._next_size = outcome.resize_to
                    continue
                if outcome.preempted:
                    raise SystemExit(
                        "ray_lit: stopped after a preemption checkpoint; run the same script "
                        "again (same storage_path and run_name) to continue.")
                if outcome.error is None:
                    return outcome.result
                decision = self.policy.decide(self.failures, outcome.error)
                if _is_raise(decision):
                    self._raise(outcome, decision)
                if getattr(decision, "counts_as_failure", True):
                    self.failures += 1
                self.trainer.num_restarts += 1
                self._failed_at = time.monotonic()
                message = (f"ray_lit: rank {outcome.error.world_rank} failed "
                           f"({outcome.error.kind}); starting attempt {self.failures + 1}: "
                           f"{decision.reason}")
                self.sink.print(message)

    def _attempt(self) -> AttemptOutcome:
        job = self.job
        note, origin = None, ("start", 0)
        if self.manager is not None:
            self.manager.abandon_pending()
            self.manager.clean_uncommitted()
            latest = self.manager.latest()
            # a later attempt (after a failure or a resize) always continues from the latest
            # commit; the first one only with resume="auto"
            if latest is not None and job.stage == "fit" and (
                    self._attempts > 0 or job.resume_latest):
                job = dataclasses.replace(job, checkpoint=None, restore=FromStorage(
                    latest.part_uri(0), {r: latest.part_uri(r)
                                         for r in range(latest.world_size)}))
                note = (f"ray_lit: restoring from {latest.name} (step {latest.global_step}, "
                        f"epoch {latest.epoch})")
                origin = ("storage", latest.global_step)
        job = dataclasses.replace(job, attempt=self._attempts)
        self._attempts += 1
        survivors, self._survivors = self._survivors, None
        if survivors is not None and job.stage == "fit":
            memory = self._restore_from_peers(survivors)
            if memory is not None:
                step, restore = memory
                job = dataclasses.replace(job, checkpoint=None, restore=restore)
                note = f"ray_lit: restoring from {restore.reason}"
                origin = ("memory", step)
        if survivors is not None:
            survivors.drop_stuck()  # kept only for the snapshot they held
        if note is not None:
            self.sink.print(note)
        if self._attempts > 1:
            self.restored_from.append(origin)
        regroup = self._regroup(survivors) if survivors is not None else None
        if survivors is not None and regroup is None:
            survivors.release()  # not enough places around them: start a new group
            survivors = None
        size = regroup.num_workers if regroup is not None else self._world_size()
        job = dataclasses.replace(job, accumulate=self._plan_accumulation(size))
        kept = len(survivors.actors) if survivors is not None else 0
        try:
            group = self.create_group(**dict(self.group_options, num_workers=size),
                                      survivors=survivors)
        except Exception as err:
            if survivors is None:
                raise
            # e.g. a replacement placed on a node that Ray had not yet seen die: the kept
            # workers were released with it; start a whole new group instead
            self.sink.print(f"ray_lit: re-forming the group around the surviving workers "
                            f"failed ({type(err).__name__}); starting a new group")
            kept, size = 0, self._world_size()
            job = dataclasses.replace(job, accumulate=self._plan_accumulation(size))
            group = self.create_group(**dict(self.group_options, num_workers=size),
                                      survivors=None)
        if kept:
            self.sink.print(f"ray_lit: kept {kept} worker(s), started {size - kept} new; "
                            f"process group re-formed ({regroup.reason})")
        self.trainer.world_size_history.append(group.world_size)
        outcome = AttemptOutcome(error=None)
        try:
            group.run(self.payload_ref, job)
            # the ranks hold the peer snapshot's ref now; it is freed once they loaded it
            del job
            outcome = self._supervise(group)
            return outcome
        finally:
            if self._worth_salvaging(outcome, group):
                # a survivor stuck in a collective with a lost node's worker is not waited for
                # long: a fresh worker starts in less time
                self._survivors = group.salvage(
                    abort_timeout_s=3.0 if self._unreachable else 10.0,
                    lost_nodes=set(self._unreachable))
                self._confirm_leftovers(self._survivors)
            else:
                # after a failure nobody needs a clean goodbye (a peer may hang in it)
                group.shutdown(graceful=outcome.error is None)

    def _worth_salvaging(self, outcome: AttemptOutcome, group: WorkerGroup) -> bool:
        """After a lost worker (not a bug in user code) and before an elastic resize, the
        live workers are kept for the next attempt instead of being torn down with the group."""
        if not self.keep_survivors or self.job.stage != "fit":
            return False
        if outcome.resize_to is not None:  # growing inside the placement group: they stay
            self._answered, self._unreachable = set(), set()
            return self.elastic and outcome.resize_to <= group.capacity
        error = outcome.error
        if not (error is not None and self.policy.max_failures != 0
                and error.kind in ("actor_died", "node_died", "hang", "preempted")):
            return False
        nodes = [error.node_id] if error.node_id else []
        if self.cluster.reachable(nodes):
            self._answered, self._unreachable = set(nodes), set()
            return True
        # a lost node: nothing can be placed on it. An elastic group continues with the
        # workers elsewhere. A fixed-size one starts afresh (its places are refilled only once
        # Ray has noticed the death, which takes longer than a fresh start), after the
        # survivors handed over a peer snapshot, when there are any
        self._answered, self._unreachable = set(), set(nodes)
        self._lost_nodes |= self._unreachable
        return self.elastic or bool(self.trainer.config.snapshot_every_n_steps)

    def _regroup(self, survivors: Survivors) -> Any:
        """Which free places of the kept workers' placement group get a new worker (slots on
        live nodes; the ended group's own empty places first), as ``decide_regroup`` rules.
        None: the kept workers are let go and a new group is sized afresh."""
        nodes = self.cluster.bundle_nodes(survivors.placement_group)
        unasked = {n for n in survivors.dead_nodes
                   if n not in self._answered and n not in self._unreachable}
        gone = self.cluster.unreachable(sorted(unasked)) if unasked else set()
        self._lost_nodes |= gone  # Ray's node table lags behind a lost node
        lost = set(self._lost_nodes)
        free = [i for i in range(survivors.capacity) if i not in survivors.actors
                and nodes.get(i + survivors.offset) not in (None, *lost)]
        free.sort(key=lambda i: (i not in survivors.slots, i))
        if self._next_size is not None:  # growing: all of it, or a new group of that size
            want = minimum = self._next_size
        elif self.elastic:
            want = min(self.scaling.max_workers, survivors.capacity)
            minimum = self.scaling.min_workers
        else:
            want = minimum = self.group_options["num_workers"]
        decision = decide_regroup(len(survivors.actors), free, want, minimum)
        if decision is not None:
            survivors.fill = list(decision.fill)
            self._next_size = None
        return decision

    def _confirm_leftovers(self, survivors: Survivors | None) -> None:
        """Parts the survivors wrote from memory while leaving can complete a checkpoint newer
        than the last commit (the dead rank had written its part before it died): confirm them,
        so the next attempt continues from there instead of redoing those steps."""
        if survivors is None:
            return
        for name in self._receive(survivors.confirmations):
            self.sink.print(f"ray_lit: committed {name} from the surviving workers' "
                            "memory (written while they left the failed group)")
        survivors.confirmations = []

    def _receive(self, entries: Iterable[HandedOver]) -> list[str]:
        """Take what the ranks handed over: checkpoint part confirmations (to the manager)
        and in-memory snapshot parts (to the ledger). Returns the checkpoints committed."""
        committed = []
        for entry in entries:
            if isinstance(entry, SnapshotPart):
                self.ledger.add(entry.key, entry.rank, entry.world_size, entry.data)
            elif self.manager is not None and self.manager.confirm(
                    entry.name, entry.rank, entry.world_size, entry.meta):
                committed.append(entry.name)
        return committed

    def _restore_from_peers(self, survivors: Survivors) -> tuple[int, FromPeers] | None:
        """Continue from a surviving worker's in-memory snapshot instead of storage when it is
        newer than the latest commit (``Trainer(snapshot_every_n_steps=N)``): fewer steps
        redone, and still exact. Returns the snapshot's step and the restore, or None."""
        latest = self.manager.latest() if self.manager is not None else None
        decision = decide_restore(latest.global_step if latest is not None else None,
                                  self.ledger.complete(), survivors.snapshots)
        if decision.key is None:
            return None
        ref = None
        for holder in decision.holders:  # the first export that works
            ref = survivors.export_snapshot(holder, decision.key)
            if ref is not None:
                break
        if ref is None:
            return None  # the holders went too: the storage checkpoint stands
        # a rank that cannot fetch the snapshot fails the attempt as a lost peer
        # (``PeerSnapshotLost``), and the next attempt decides again
        return decision.key[1], FromPeers(ref, self.ledger.parts(decision.key),
                                          decision.reason)

    # --- supervision ----------------------------------------------------------------------------
    def _supervise(self, group: WorkerGroup) -> AttemptOutcome:
        done: dict[int, Any] = {}
        states: dict[int, str] = {}
        stop_requested = False
        resize_to: int | None = None
        departure: DepartureDecision | None = None
        self._last_grow_check = self._last_drain_check = time.monotonic()
        while True:
            failures: list[AttemptOutcome] = []
            sigterm_ranks: list[int] = []
            if self._interrupted.is_set():
                raise KeyboardInterrupt  # the first one was swallowed on its way up
            polled_at = time.monotonic()
            for rank, status in enumerate(self._poll_all(group, wait_s=self.poll_wait_s)):
                if isinstance(status, AttemptOutcome):
                    failures.append(status)
                    continue
                if status.sigterm:
                    sigterm_ranks.append(rank)
                state = status.state
                if state is WorkerState.FAILED:
                    failures.append(self._failed(group, rank, status))
                elif state in (WorkerState.DONE, WorkerState.PREEMPTED):
                    done[rank] = status.result
                    states[rank] = state
                elif self.hang_timeout_s and status.idle_s > self.hang_timeout_s:
                    failures.append(AttemptOutcome(error=self._error(
                        group, rank, "hang", f"no training progress for {status.idle_s:.0f}"
                        f" s (worker_hang_timeout_s={self.hang_timeout_s})")))
                if rank == 0 and self._failed_at is not None and \
                        state is WorkerState.RUNNING and \
                        status.idle_s < max(self.poll_wait_s, self.poll_interval_s * 5) and \
                        status.steps > 0:
                    # recovery: from the failure to the new group's first training steps
                    self.recovery_times.append(time.monotonic() - self._failed_at)
                    self._failed_at = None
            if failures:
                return self._root_cause(group, failures, departure)
            if len(done) == group.world_size:
                planned = all(s is WorkerState.PREEMPTED for s in states.values())
                if departure is not None and planned and not departure.stop_run:
                    return AttemptOutcome(departed=departure)  # before a resize planned then
                if resize_to is not None and planned:
                    return AttemptOutcome(resize_to=resize_to)
                # a stop asked for after the last step: the run simply finished
                return AttemptOutcome(result=done.get(0), preempted=stop_requested and planned)
            if departure is None and (sigterm_ranks or self._drain_check_due()):
                departure = decide_departure(
                    [w.node_id for w in group.workers], self.cluster.driver_node(),
                    self.cluster.draining_nodes(), sigterm_ranks, int(time.time() * 1000))
                if departure is not None:
                    if departure.stop_run:
                        self._preempt.set()  # stop like a SIGTERM to the driver
                    elif not stop_requested and resize_to is None:
                        step = self._stop_at_next_step(group)
                        stop_requested = True
                        self.sink.print(f"ray_lit: checkpointing at step {step}: "
                                        f"{departure.reason}")
            if self._preempt.is_set() and not stop_requested:
                step = self._stop_at_next_step(group)
                stop_requested = True
                self.sink.print(f"ray_lit: SIGTERM: checkpointing at step {step}, then "
                                "stopping")
            if resize_to is None and not stop_requested and self._grow_due(group):
                decision = self.scaling.decide_grow(group.world_size,
                                                    self._placeable_extra(group))
                if isinstance(decision, ResizeDecision):
                    resize_to = decision.num_workers
                    step = self._stop_at_next_step(group)
                    self.sink.print(f"ray_lit: resize {group.world_size} -> {resize_to} at "
                                    f"the checkpoint of step {step}: {decision.reason}")
            # a poll that returned early with news is followed by the next one at once, but
            # never more often than every poll_interval_s
            time.sleep(max(0.0, self.poll_interval_s - (time.monotonic() - polled_at)))

    def _poll_all(self, group: WorkerGroup, wait_s: float = 0.0) -> list[Any]:
        """Every worker's status, or an AttemptOutcome for a worker that is gone (waiting up to
        ``wait_s`` for news, see ``WorkerGroup.statuses``)."""
        out: list[Any] = []
        for rank, status in enumerate(group.statuses(wait_s=wait_s)):
            if isinstance(status, WorkerGone):
                out.append(AttemptOutcome(error=self._error(group, rank, status.kind,
                                                            status.text)))
                continue
            if status.events:
                replay(status.events, self.sink)
            self._receive(status.handed_over)
            out.append(status)
        return out

    def _error(self, group: WorkerGroup, rank: int, kind: str, text: str) -> WorkerError:
        worker = group.workers[rank]
        return WorkerError(world_rank=rank, node_id=worker.node_id, node_ip=worker.node_ip,
                           traceback=text, kind=kind)

    def _failed(self, group: WorkerGroup, rank: int, status: WorkerStatus) -> AttemptOutcome:
        failure = status.failure or WorkerFailure("")
        exception = _unpickle(failure.exception)
        text = failure.traceback
        # a collective that lost its peer is a symptom of another rank's death, not a bug
        peer_loss = _is_peer_loss(exception, text)
        kind = "actor_died" if peer_loss else "user_error"
        return AttemptOutcome(error=self._error(group, rank, kind, text), exception=exception,
                              peer_symptom=peer_loss)

    def _root_cause(self, group: WorkerGroup, failures: list[AttemptOutcome],
                    departure: DepartureDecision | None = None) -> AttemptOutcome:
        """A dead peer makes the others fail in their collectives: report the dead one. Ray
        may need a moment to report the death, so poll again briefly before deciding. A death
        announced by a departure notice (the node went before the checkpoint) is a
        preemption, which does not use up ``max_failures``."""
        deadline = time.monotonic() + self.root_cause_grace_s
        while not any(f.error.kind in ("actor_died", "node_died") and not f.peer_symptom
                      for f in failures) and time.monotonic() < deadline:
            if all(f.error.kind == "user_error" for f in failures):
                break
            time.sleep(0.2)
            failures = failures + [s for s in self._poll_all(group)
                                   if isinstance(s, AttemptOutcome)]
        order = {"node_died": 0, "actor_died": 1, "hang": 2, "user_error": 3, "preempted": 4}
        cause = min(failures, key=lambda f: (order.get(f.error.kind, 5), f.peer_symptom,
                                             f.exception is not None))
        if departure is not None and cause.error.kind in ("node_died", "actor_died"):
            cause = dataclasses.replace(cause, error=dataclasses.replace(
                cause.error, kind="preempted"))
        return cause

    def _stop_at_next_step(self, group: WorkerGroup) -> int:
        """Every rank checkpoints at the same optimizer step a little ahead, then stops (ranks
        move in lockstep through DDP, so two steps ahead is reached by all)."""
        step = max(self._steps(group), default=0) + 2
        group.request_stop_at(step)
        return step

    # --- departures -----------------------------------------------------------------------------
    def _drain_check_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_drain_check < self.drain_check_interval_s:
            return False
        self._last_drain_check = now
        return True

    # --- elasticity -----------------------------------------------------------------------------
    def _per_worker(self) -> dict[str, float]:
        return self.group_options["per_worker"]

    def _placeable(self, available: list[dict[str, float]]) -> int:
        """How many worker bundles fit in the given per-node free resources."""
        per = self._per_worker()
        count = 0
        for node in available:
            fits = [int(node.get(k, 0.0) // v) for k, v in per.items() if v > 0]
            count += min(fits) if fits else 0
        return count

    def _free_per_node(self) -> list[dict[str, float]]:
        return self.cluster.free_per_node()

    def _world_size(self) -> int:
        """Fixed: ``num_workers``. Elastic: as many as can be placed now (at least ``min``,
        waiting up to ``placement_timeout_s`` for them)."""
        if not self.elastic:
            return self.group_options["num_workers"]
        if self._next_size is not None:
            size, self._next_size = self._next_size, None
            return size
        deadline = time.monotonic() + self.group_options["placement_timeout_s"]
        while True:
            placeable = self._placeable(self._free_per_node())
            decision = self.scaling.decide_start(placeable)
            if isinstance(decision, ResizeDecision):
                self.sink.print(f"ray_lit: world size {decision.num_workers}: {decision.reason}")
                return decision.num_workers
            if time.monotonic() > deadline:
                raise MisconfigurationException(
                    f"num_workers={self.trainer.config.num_workers}: {decision.reason} after "
                    f"{self.group_options['placement_timeout_s']:.0f} s of waiting. Free "
                    f"resources per node: {self._free_per_node()}; each worker needs "
                    f"{self._per_worker()}. Lower the minimum or add nodes.")
            time.sleep(0.5)

    def _grow_due(self, group: WorkerGroup) -> bool:
        if not self.elastic or group.world_size >= self.scaling.max_workers or \
                self.job.stage != "fit" or self.manager is None:
            return False
        now = time.monotonic()
        if now - self._last_grow_check < self.grow_check_interval_s:
            return False
        self._last_grow_check = now
        return True

    def _placeable_extra(self, group: WorkerGroup) -> int:
        """Workers that could join: free resources, plus the group's own placement-group
        places that are empty and on a live node (a lost node's bundle that Ray re-placed
        when the node, or another, came back)."""
        nodes = self.cluster.bundle_nodes(group.placement_group)
        self._recheck_lost_nodes(set(nodes.values()))
        empty = [i for i in range(group.capacity) if i not in set(group.slots)]
        spare = sum(1 for i in empty
                    if nodes.get(i + group.offset) not in (None, *self._lost_nodes))
        if spare < len(empty):
            # Ray places the group's own lost places first when resources appear: grow into
            # those once they are placed, not into resources they are about to take
            return spare
        return self._placeable(self._free_per_node()) + spare

    def _recheck_lost_nodes(self, listed: set[str]) -> None:
        """A node a probe once missed but that Ray still lists (and places bundles on) is
        probed again every ``lost_recheck_s``: a probe can also miss a node that was only
        slow, and a node counted lost for good would keep the group from growing back."""
        suspects = sorted(self._lost_nodes & listed)
        now = time.monotonic()
        if not suspects or now - self._last_lost_check < self.lost_recheck_s:
            return
        self._last_lost_check = now
        self._lost_nodes -= set(suspects) - self.cluster.unreachable(suspects)

    def _plan_accumulation(self, size: int) -> int | None:
        """Keep the global batch per optimizer step through accumulation (the documented
        default, ``elastic_batch``) when the world size is not the configured maximum.
        Returns the accumulation for the job, or None (the config's own)."""
        config = self.trainer.config
        if not self.elastic or not isinstance(config.accumulate_grad_batches, int):
            return None
        decision = decide_accumulation(self.scaling.max_workers, config.accumulate_grad_batches,
                                       size, config.elastic_batch)
        if size != self.scaling.max_workers:
            self.sink.print(f"ray_lit: {size} worker(s): accumulate_grad_batches="
                            f"{decision.accumulate} ({decision.reason})")
        return decision.accumulate

    def _steps(self, group: WorkerGroup) -> list[int]:
        statuses = [s for s in group.statuses() if not isinstance(s, WorkerGone)]
        for status in statuses:
            if status.events:
                replay(status.events, self.sink)
            self._receive(status.handed_over)  # a part handed over now is not lost
        return [s.global_step for s in statuses]

    # --- outcome --------------------------------------------------------------------------------
    def _raise(self, outcome: AttemptOutcome, decision: Any) -> None:
        error = outcome.error
        exception = outcome.exception
        if error.kind == "user_error" and exception is not None:
            # the user's own exception, as it would surface in process, with where it happened
            note = (f"raised on ray_lit worker rank {error.world_rank} (node {error.node_ip})"
                    f"\n--- worker traceback ---\n{error.traceback}")
            if hasattr(exception, "add_note"):
                exception.add_note(note)
            raise exception
        raise TrainingFailedError(
            f"Training failed: {decision.reason}", rank=error.world_rank,
            node=f"{error.node_ip} ({error.node_id})", original_traceback=error.traceback)

    # --- signals --------------------------------------------------------------------------------
    def _sigterm_requests_checkpoint(self) -> Any:
        """While attempts run on the main thread: a SIGTERM asks for a checkpoint-and-stop,
        and a Ctrl-C (SIGINT with Python's default handler) is remembered as well as raised,
        so the supervision loop raises it again should the first ``KeyboardInterrupt`` land
        in code that swallows it (a Ctrl-C never leaves the group training)."""
        controller = self

        def on_sigint(signum: int, frame: Any) -> None:
            controller._interrupted.set()
            raise KeyboardInterrupt

        class _Handlers:
            def __enter__(self) -> None:
                self.previous: dict[int, Any] = {}
                if threading.current_thread() is not threading.main_thread():
                    return
                self.previous[signal.SIGTERM] = signal.signal(
                    signal.SIGTERM, lambda *_: controller._preempt.set())
                if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                    self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)

            def __exit__(self, *exc: Any) -> None:
                for signum, previous in self.previous.items():
                    signal.signal(signum, previous)

        return _Handlers()


def _is_raise(decision: Any) -> bool:
    action = getattr(decision, "action", decision)
    return getattr(action, "name", str(action)).upper() == "RAISE"


def _is_peer_loss(exception: BaseException | None, text: str) -> bool:
    markers = ("Connection closed by peer", "Connection reset by peer", "DistBackendError",
               "NCCL communicator was aborted", "Broken pipe", "Socket Timeout",
               "PeerSnapshotLost")
    if exception is not None and type(exception).__name__ in ("DistBackendError",
                                                              "PeerSnapshotLost"):
        return True
    return any(m in text for m in markers)


def _unpickle(blob: bytes | None) -> BaseException | None:
    if blob is None:
        return None
    try:
        return cloudpickle.loads(blob)
    except Exception:
        return None
