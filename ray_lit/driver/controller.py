"""The controller: runs attempts of a worker group until the stage finishes or a policy says
stop. It is the only code that acts on actors; the policies decide.

It is a state machine (``driver/states.py``, drawn in ``docs/architecture.md``):
``Controller.step(state)`` makes one transition, and ``run`` steps until a terminal state.

- ``Starting``: the latest committed checkpoint (or a survivor's in-memory snapshot) is where
  the attempt continues; the group is formed around surviving workers where there are any.
- ``Running``: one round of news per step: every rank has one long poll in flight, answered
  when the rank has news or its heartbeat is due (``driver.news``); only the ranks that answered
  are polled again, so a round costs the driver nothing per quiet rank. Rank 0's events are
  replayed into the driver's loggers and progress bar, checkpoints whose parts every rank
  confirmed are committed, and a dead actor (Ray's own error on the poll), a failed rank or a
  rank without progress ends the attempt. Announced departures (a Ray node drain notice, a
  SIGTERM to a worker or to the driver) and elastic growth are planned: ``Stopping`` has every
  rank checkpoint at the same step, and the next attempt starts from that checkpoint.
- ``Salvaging``: the live workers are kept for the next attempt (after a lost worker, before a
  resize) or the group is released; then ``Finished``, ``Errored``, ``Restarting`` (a failure
  the policy restarts) or ``Starting`` (a planned resize or departure).
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Iterable
from typing import Any

import cloudpickle

from ray_lit.driver.cluster_view import ClusterView
from ray_lit.driver.hang_report import describe_hang, write_stacks
from ray_lit.driver.policies import (
    DepartureDecision,
    ElasticScaling,
    FailureDecision,
    FailurePolicy,
    ResizeDecision,
    WorkerError,
    decide_accumulation,
    decide_departure,
    decide_regroup,
    decide_restore,
    is_peer_loss,
    root_cause,
    scaling_policy,
)
from ray_lit.driver.predictions import receive_predictions
from ray_lit.driver.rank_board import RankBoard
from ray_lit.driver.reporting import replay
from ray_lit.driver.signals import SignalHandlers
from ray_lit.driver.snapshot_ledger import SnapshotLedger
from ray_lit.driver.states import (
    AttemptOutcome,
    Errored,
    Finished,
    Restarting,
    Running,
    Salvaging,
    Starting,
    State,
    StopCause,
    Stopping,
    kind,
)
from ray_lit.driver.supervision import SupervisionConfig
from ray_lit.driver.worker_group import Survivors, WorkerGone, WorkerGroup
from ray_lit.errors import MisconfigurationException, PreemptionStop, TrainingFailedError
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

__all__ = ["AttemptOutcome", "Controller"]


class Controller:
    """Driver-side owner of the worker groups of one stage (fit, validate or test)."""

    keep_survivors = True  # reuse the live workers after a loss (benchmarks turn it off)

    def __init__(self, *, trainer: Any, payload_ref: Any, job: Job,
                 group_options: dict[str, Any], sink: Any, manager: Any = None,
                 hang_timeout_s: float | None = None,
                 supervision: SupervisionConfig | None = None,
                 create_group: Any = None, cluster: Any = None, reuse: Any = None,
                 keep_group: bool = False, warm: Survivors | None = None) -> None:
        """``create_group`` (``WorkerGroup.create``) and ``cluster`` (``ClusterView()``) are
        where the controller meets Ray; ``ray_lit.testing`` passes fakes.

        ``supervision`` holds every timeout and interval (``SupervisionConfig``);
        ``hang_timeout_s`` is the user's ``worker_hang_timeout_s``. ``reuse`` is a worker
        group an earlier call of the same Trainer kept: the first attempt runs on it when it
        still fits and is alive. With ``keep_group`` a group whose run finished is not released
        but left in ``kept_group`` for the Trainer's next call. ``warm``: idle workers of an
        earlier Trainer (``driver.pool``), placed alike; the first attempt forms its process
        group on them as on the survivors of a lost worker.
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
        self.supervision = supervision or SupervisionConfig()
        self.failures = 0
        self.recovery_times: list[float] = []
        self.states: list[str] = []  # the kinds of state the run went through, in order
        self._preempt = threading.Event()
        self._interrupted = threading.Event()  # a Ctrl-C arrived: raised again if swallowed
        self._failed_at: float | None = None
        self.scaling = scaling_policy(trainer.config.num_workers)
        self.elastic = isinstance(self.scaling, ElasticScaling)
        self._next_size: int | None = None
        self._attempts = 0
        self._run_token = secrets.token_hex(4)  # tells this driver's attempts from a killed one's
        self._survivors: Survivors | None = warm
        self._warm = warm is not None  # the first group forms on pooled workers
        self._answered: set[str] = set()  # nodes a probe just reached (after a failure)
        self._unreachable: set[str] = set()  # nodes a probe did not reach (a lost node)
        # every node found lost: Ray lists one as alive (and its bundles as placed there) for
        # a while after it went
        self._lost_nodes: set[str] = set()
        self._last_lost_check = 0.0
        self._last_grow_check = self._last_drain_check = self._last_hang_check = 0.0
        self._board = RankBoard()  # what the driver last heard from each rank of the attempt
        cfg = self.supervision
        hang_after = cfg.hang_floor_s if hang_timeout_s == "auto" else hang_timeout_s
        # a silent rank answers well before the hang timeout: never taken for a hung one
        self._heartbeat_s = min(cfg.heartbeat_s, float(hang_after) / 2) \
            if isinstance(hang_after, (int, float)) else cfg.heartbeat_s
        self.ledger = SnapshotLedger()  # every rank's own part of the in-memory snapshots
        # where each later attempt started: ("storage" | "memory" | "start", global step)
        self.restored_from: list[tuple[str, int]] = []
        self._reuse = reuse
        self.keep_group = keep_group
        self.kept_group: Any = None  # the finished group, kept for the Trainer's next call
        self.prediction_collector: Any = None  # predict: where streamed outputs go

    # --- the state machine ----------------------------------------------------------------------
    def run(self) -> Any:
        """Step from ``Starting`` to a terminal state; returns rank 0's result (bytes) or
        raises the run's error."""
        state: State = Starting()
        self._record(state)
        try:
            with SignalHandlers(self._preempt, self._interrupted):
                while not state.terminal:
                    state = self._step_or_release(state)
                    self._record(state)
        finally:
            if self._survivors is not None:  # a raise after a failure: nobody needs them
                self._survivors.release()
                self._survivors = None
            if self._reuse is not None:  # never started on
                self._reuse.shutdown()
                self._reuse = None
        if isinstance(state, Errored):
            raise state.error
        return state.result

    def _step_or_release(self, state: State) -> State:
        """``step``; a Ctrl-C or an error of the controller itself while a group runs still
        releases it (gracefully: no failure is known)."""
        try:
            return self.step(state)
        except BaseException as err:
            group = getattr(state, "group", None)
            if group is not None:
                # Tune ending a trial (SystemExit in its report) waits 2 s for the trial's
                # thread before it may reuse the trial's actor: no goodbye then
                group.shutdown(graceful=not isinstance(err, SystemExit))
            raise

    def _record(self, state: State) -> None:
        name = kind(state)
        if not self.states or self.states[-1] != name:  # Running -> Running is one entry
            self.states.append(name)

    def step(self, state: State) -> State:
        """One transition."""
        if isinstance(state, Starting):
            return self._start()
        if isinstance(state, (Running, Stopping)):
            return self._supervise(state)
        if isinstance(state, Salvaging):
            return self._salvage(state)
        if isinstance(state, Restarting):
            return self._restart(state)
        raise ValueError(f"no transition from {kind(state)}")

    # --- Starting -------------------------------------------------------------------------------
    def _start(self) -> Running:
        """Choose where the attempt continues from, form the group and start the stage."""
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
        # the fence: this driver's run and the attempt, in every part file the attempt writes
        job = dataclasses.replace(job, attempt=self._attempts,
                                  fence=f"{self._run_token}a{self._attempts}")
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
        group, accumulate = self._form_group(survivors)
        job = dataclasses.replace(job, accumulate=accumulate)
        self.trainer.world_size_history.append(group.world_size)
        try:
            # the ranks hold the peer snapshot's ref from here on; freed once they loaded it
            group.run(self.payload_ref, job)
        except BaseException:
            group.shutdown(graceful=False)
            raise
        self._last_grow_check = self._last_drain_check = time.monotonic()
        self._board = RankBoard()
        return Running(group)

    def _form_group(self, survivors: Survivors | None) -> tuple[Any, int | None]:
        """The attempt's worker group (the Trainer's kept one when it fits, around the
        survivors where the placement group has room for them, else a new one) and the
        accumulation planned for its size."""
        reuse, self._reuse = self._reuse, None
        if reuse is not None:
            if survivors is None and not self.elastic and \
                    reuse.world_size == self.group_options["num_workers"] and reuse.alive():
                return reuse, self._plan_accumulation(reuse.world_size)
            reuse.shutdown(graceful=False)  # a worker of it is gone: form a new group
        regroup = self._regroup(survivors) if survivors is not None else None
        if survivors is not None and regroup is None:
            survivors.release()  # not enough places around them: start a new group
            survivors = None
        size = regroup.num_workers if regroup is not None else self._world_size()
        accumulate = self._plan_accumulation(size)
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
            accumulate = self._plan_accumulation(size)
            group = self.create_group(**dict(self.group_options, num_workers=size),
                                      survivors=None)
        if kept and self._warm:
            self.sink.print(f"ray_lit: {kept} warm worker(s) of an earlier Trainer, "
                            f"{size - kept} new; a new process group formed")
        elif kept:
            self.sink.print(f"ray_lit: kept {kept} worker(s), started {size - kept} new; "
                            f"process group re-formed ({regroup.reason})")
        self._warm = False
        return group, accumulate


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
                    entry.name, entry.rank, entry.world_size, entry.meta, entry.fence):
                committed.append(entry.name)
        return committed

    def _restore_from_peers(self, survivors: Survivors) -> tuple[int, FromPeers] | None:
        """Continue from the surviving workers' in-memory snapshot instead of storage when it
        is newer than the latest commit (``Trainer(snapshot_every_n_steps=N)``): fewer steps
        redone, and still exact. A replicated snapshot is exported by one survivor; an FSDP
        one by the survivors that together hold every rank's shards (``shard_ring``). Returns
        the snapshot's step and the restore, or None (storage; why is printed when survivors
        held snapshots)."""
        latest = self.manager.latest() if self.manager is not None else None
        complete = self.ledger.complete()
        decision = decide_restore(latest.global_step if latest is not None else None,
                                  complete, survivors.snapshots, survivors.shards,
                                  {k: self.ledger.world_size(k) for k in complete})
        if decision.key is None:
            self._say_storage(survivors, decision.reason)
            return None
        ref: Any = None
        if decision.sharded:  # the chosen survivors hold every rank only together: all export
            refs = [survivors.export_snapshot(holder, decision.key)
                    for holder in decision.holders]
            if any(r is None for r in refs):
                self._say_storage(survivors, f"a survivor holding FSDP shards of step "
                                             f"{decision.key[1]} failed to export them")
                return None
            ref = refs
        else:
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

    def _say_storage(self, survivors: Survivors, reason: str) -> None:
        """Print why survivors' in-memory snapshots are not restored (only when they held
        any: without ``snapshot_every_n_steps`` storage is simply the plan)."""
        if any(survivors.snapshots.values()):
            self.sink.print(f"ray_lit: not restoring from the survivors' memory: {reason}")

    # --- supervision ----------------------------------------------------------------------------

    # --- Running and Stopping: one round of news from the group --------------------------------
    def _supervise(self, state: Running | Stopping) -> State:
        """One round of news; the attempt goes on (the same kind of state), a stop is asked
        for (``Stopping``), or the attempt is over (``Salvaging``)."""
        if self._interrupted.is_set():
            raise KeyboardInterrupt  # the first one was swallowed on its way up
        group, cfg, board = state.group, self.supervision, self._board
        polled_at = time.monotonic()
        failures: list[AttemptOutcome] = []
        done = dict(state.done)
        news = group.news(wait_s=cfg.poll_wait_s, heartbeat_s=self._heartbeat_s,
                          timeout_s=cfg.poll_timeout_s)
        for rank in sorted(news):  # only the ranks that had something to say
            status = self._take(group, rank, news[rank])
            if isinstance(status, AttemptOutcome):
                failures.append(status)
                continue
            board.note(rank, status)
            if status.state is WorkerState.FAILED:
                failures.append(self._failed(group, rank, status))
            elif status.state in (WorkerState.DONE, WorkerState.PREEMPTED):
                done[rank] = (status.state, status.result)
            if rank == 0:
                self._note_recovery(status)
        if not failures and (board.refreshing or
                             self._due("_last_hang_check", "hang_check_interval_s")):
            hung = board.hung(self._is_hung, set(news), group.wake)
            if hung:
                failures.append(self._diagnose_hang(group, hung))
        if failures:
            return Salvaging(group, self._root_cause(group, failures,
                                                     getattr(state, "departure", None)))
        if len(done) == group.world_size:
            return Salvaging(group, self._finished(state, done))
        state = dataclasses.replace(state, done=done)
        state = self._plan_stop(state, sorted(board.sigterm))
        # a poll that returned early with news is followed by the next one at once, but never
        # more often than every poll_interval_s
        time.sleep(max(0.0, self.supervision.poll_interval_s - (time.monotonic() - polled_at)))
        return state

    def _is_hung(self, status: WorkerStatus, idle_s: float | None = None) -> bool:
        """No progress (no batch started, in any stage) for longer than the hang timeout:
        ``worker_hang_timeout_s`` seconds, or with ``"auto"`` max(60 s, 20x the slowest step
        seen), armed only after the attempt's first steps (a long first step, compilation or
        sanity check is not a hang). A phase marked with ``ray_lit.long_phase`` never is.
        ``idle_s``: the idle time to judge, where not the status's own (``RankBoard``)."""
        timeout = self.hang_timeout_s
        if timeout is None or status.long_phase:
            return False
        if timeout == "auto":
            # fit: armed after the attempt's first optimizer steps; validate / test / predict
            # count no training steps, so there it is armed once polls saw batches go by
            # (a slowest step was measured)
            started = status.steps > 0 if self.job.stage == "fit" else \
                status.slowest_step_s > 0
            if not started:
                return False
            cfg = self.supervision
            timeout = max(cfg.hang_floor_s, cfg.hang_step_factor * status.slowest_step_s)
        return (status.idle_s if idle_s is None else idle_s) > float(timeout)

    def _diagnose_hang(self, group: WorkerGroup, hung: dict[int, float]) -> AttemptOutcome:
        """Collect every rank's stacks, write them to the run directory, and name the culprit:
        the rank whose loop is not waiting in a collective (the ranks that wait are its
        victims)."""
        stacks = group.stacks(timeout_s=self.supervision.stacks_timeout_s)
        rank, text = describe_hang(stacks, hung, self.hang_timeout_s)
        name = f"hang-attempt{self._attempts - 1}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        try:
            path = write_stacks(stacks, name, self.manager, self.trainer)
            text += f"\nthe stacks of every rank: {path}"
        except Exception as err:  # the diagnosis must not be lost with the file
            self.sink.print(f"ray_lit: could not write the hang's stacks: {err}")
        self.sink.print(f"ray_lit: hang diagnosed: {text}")
        return AttemptOutcome(error=self._error(group, rank, "hang", text))

    def _note_recovery(self, status: WorkerStatus) -> None:
        """Recovery time: from the failure to the new group's first training steps."""
        cfg = self.supervision
        if self._failed_at is not None and status.state is WorkerState.RUNNING and \
                status.idle_s < max(cfg.poll_wait_s, cfg.poll_interval_s * 5) and \
                status.steps > 0:
            self.recovery_times.append(time.monotonic() - self._failed_at)
            self._failed_at = None

    @staticmethod
    def _finished(state: Running | Stopping, done: dict[int, tuple]) -> AttemptOutcome:
        """Every rank's loop ended: a planned stop (all stopped as asked) or the run's end."""
        planned = all(s is WorkerState.PREEMPTED for s, _ in done.values())
        if isinstance(state, Stopping) and planned:
            if state.departure is not None and not state.departure.stop_run:
                return AttemptOutcome(departed=state.departure)
            if state.resize_to is not None:
                return AttemptOutcome(resize_to=state.resize_to)
            if state.preempt:
                return AttemptOutcome(preempted=True)
        # a stop asked for after the last step: the run simply finished
        return AttemptOutcome(result=done.get(0, (None, None))[1])

    def _plan_stop(self, state: Running | Stopping, sigterm_ranks: list[int]) -> State:
        """Departures announced (drain notices, SIGTERMs), a SIGTERM to the driver and room to
        grow turn into a stop at a step every rank reaches."""
        group = state.group
        departure = getattr(state, "departure", None)
        if departure is None and (sigterm_ranks or self._due("_last_drain_check",
                                                           "drain_check_interval_s")):
            departure = decide_departure(
                [w.node_id for w in group.workers], self.cluster.driver_node(),
                self.cluster.draining_nodes(), sigterm_ranks, int(time.time() * 1000))
            if departure is not None:
                if departure.stop_run:
                    self._preempt.set()  # stop like a SIGTERM to the driver
                elif isinstance(state, Running):
                    step = self._stop_at_next_step(group)
                    self.sink.print(f"ray_lit: checkpointing at step {step}: "
                                    f"{departure.reason}")
                    return Stopping(group, step, StopCause.DEPARTURE, departure=departure,
                                    done=state.done)
                else:
                    state = dataclasses.replace(state, departure=departure)
        preempting = isinstance(state, Stopping) and (state.preempt or
                                                      state.cause is StopCause.DEPARTURE)
        if self._preempt.is_set() and not preempting:
            step = self._stop_at_next_step(group)
            self.sink.print(f"ray_lit: SIGTERM: checkpointing at step {step}, then stopping")
            if isinstance(state, Stopping):  # during a resize's stop: stop the run after it
                return dataclasses.replace(state, at_step=step, preempt=True)
            return Stopping(group, step, StopCause.PREEMPTION, departure=departure,
                            preempt=True, done=state.done)
        if isinstance(state, Running) and self._grow_due(group):
            decision = self.scaling.decide_grow(group.world_size, self._placeable_extra(group))
            if isinstance(decision, ResizeDecision):
                step = self._stop_at_next_step(group)
                self.sink.print(f"ray_lit: resize {group.world_size} -> "
                                f"{decision.num_workers} at the checkpoint of step {step}: "
                                f"{decision.reason}")
                return Stopping(group, step, StopCause.RESIZE,
                                resize_to=decision.num_workers, done=state.done)
        return state

    def _due(self, last: str, interval: str) -> bool:
        """True (and the clock reset) when ``interval`` of the supervision config passed
        since the time kept in attribute ``last``."""
        now = time.monotonic()
        if now - getattr(self, last) < getattr(self.supervision, interval):
            return False
        setattr(self, last, now)
        return True

    # --- Salvaging ------------------------------------------------------------------------------
    def _salvage(self, state: Salvaging) -> State:
        """Keep the live workers for the next attempt, or release the group; then decide."""
        outcome, group = state.outcome, state.group
        for rank, status in sorted(group.end_news().items()):  # the attempt's last answers
            self._take(group, rank, status)
        if self._worth_salvaging(outcome, group):
            # a survivor stuck in a collective with a lost node's worker is not waited for
            # long: a fresh worker starts in less time
            cfg = self.supervision
            error = outcome.error
            self._survivors = group.salvage(
                abort_timeout_s=cfg.abort_timeout_lost_node_s if self._unreachable
                else cfg.abort_timeout_s, lost_nodes=set(self._unreachable),
                hung_rank=error.world_rank if error is not None and error.kind == "hang"
                else None)
            self._confirm_leftovers(self._survivors)
        elif self.keep_group and outcome.error is None and not outcome.preempted and \
                outcome.resize_to is None and outcome.departed is None:
            self.kept_group = group  # finished: the Trainer's next call runs on it
        else:
            # after a failure nobody needs a clean goodbye (a peer may hang in it)
            group.shutdown(graceful=outcome.error is None)
        if outcome.resize_to is not None or outcome.departed is not None:
            self._next_size = outcome.resize_to  # planned: not a failure
            return Starting()
        if outcome.preempted:
            return Errored(PreemptionStop(
                "ray_lit: stopped after a preemption checkpoint; run the same script again "
                "(same storage_path and run_name) to continue."))
        if outcome.error is None:
            return Finished(outcome.result)
        decision = self.policy.decide(self.failures, outcome.error)
        if decision.decision is FailureDecision.RAISE:
            return Errored(self._run_error(outcome, decision.reason))
        return Restarting(outcome, decision.reason, decision.counts_as_failure)

    # --- Restarting -----------------------------------------------------------------------------
    def _restart(self, state: Restarting) -> Starting:
        if state.counts_as_failure:
            self.failures += 1
        self.trainer.num_restarts += 1
        self._failed_at = time.monotonic()
        error = state.outcome.error
        self.sink.print(f"ray_lit: rank {error.world_rank} failed ({error.kind}); starting "
                        f"attempt {self.failures + 1}: {state.reason}")
        return Starting()

    def _poll_all(self, group: WorkerGroup, wait_s: float = 0.0) -> list[Any]:
        """Every worker's status, or an AttemptOutcome for a worker that is gone (a poll of
        the whole group, waiting up to ``wait_s`` for news, see ``WorkerGroup.statuses``)."""
        statuses = group.statuses(timeout_s=self.supervision.poll_timeout_s, wait_s=wait_s)
        return [self._take(group, rank, status) for rank, status in enumerate(statuses)]

    def _take(self, group: WorkerGroup, rank: int, status: Any) -> Any:
        """A rank's answer: its events replayed, its parts and outputs received; a gone
        worker as an AttemptOutcome."""
        if isinstance(status, WorkerGone):
            return AttemptOutcome(error=self._error(group, rank, status.kind, status.text))
        if status.events:
            replay(status.events, self.sink)
        self._receive(status.handed_over)
        receive_predictions(self, status)  # predict: the batch outputs of this answer
        return status

    def _error(self, group: WorkerGroup, rank: int, kind: str, text: str) -> WorkerError:
        worker = group.workers[rank]
        return WorkerError(world_rank=rank, node_id=worker.node_id, node_ip=worker.node_ip,
                           traceback=text, kind=kind)

    def _failed(self, group: WorkerGroup, rank: int, status: WorkerStatus) -> AttemptOutcome:
        failure = status.failure or WorkerFailure("")
        exception = _unpickle(failure.exception)
        text = failure.traceback
        # a collective that lost its peer is a symptom of another rank's death, not a bug
        peer_loss = is_peer_loss(type(exception).__name__ if exception is not None else None,
                                 text)
        kind = "actor_died" if peer_loss else "user_error"
        return AttemptOutcome(error=self._error(group, rank, kind, text), exception=exception,
                              peer_symptom=peer_loss)

    def _root_cause(self, group: WorkerGroup, failures: list[AttemptOutcome],
                    departure: DepartureDecision | None = None) -> AttemptOutcome:
        """A dead peer makes the others fail in their collectives: report the dead one. Ray
        may need a moment to report the death, so poll again briefly before deciding. A death
        announced by a departure notice (the node went before the checkpoint) is a
        preemption, which does not use up ``max_failures``."""
        deadline = time.monotonic() + self.supervision.root_cause_grace_s
        while not any(f.error.kind in ("actor_died", "node_died") and not f.peer_symptom
                      for f in failures) and time.monotonic() < deadline:
            if all(f.error.kind == "user_error" for f in failures):
                break
            time.sleep(0.2)
            failures = failures + [s for s in self._poll_all(group)
                                   if isinstance(s, AttemptOutcome)]
        cause = failures[root_cause([(f.error.kind, f.peer_symptom, f.exception is not None)
                                     for f in failures])]
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
        return self._due("_last_grow_check", "grow_check_interval_s")

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
        if not suspects or now - self._last_lost_check < self.supervision.lost_recheck_s:
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
    @staticmethod
    def _run_error(outcome: AttemptOutcome, reason: str) -> BaseException:
        """The error the run raises: the user's own exception (as it would surface in process,
        with a note saying where it happened), or ``TrainingFailedError``."""
        error = outcome.error
        exception = outcome.exception
        if error.kind == "user_error" and exception is not None:
            note = (f"raised on ray_lit worker rank {error.world_rank} (node {error.node_ip})"
                    f"\n--- worker traceback ---\n{error.traceback}")
            if hasattr(exception, "add_note"):
                exception.add_note(note)
            return exception
        return TrainingFailedError(
            f"Training failed: {reason}", rank=error.world_rank,
            node=f"{error.node_ip} ({error.node_id})", original_traceback=error.traceback)


def _unpickle(blob: bytes | None) -> BaseException | None:
    if blob is None:
        return None
    try:
        return cloudpickle.loads(blob)
    except Exception:
        return None
