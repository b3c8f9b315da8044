"""The worker actor: one process, one DDP rank, running the same loop as ``num_workers=0``.

The loop runs in a thread so the actor keeps answering the driver's ``poll`` (status, progress
and, on rank 0, the metric/progress events for the driver's loggers and progress bar). Nothing
here decides anything about failures: it reports, and the controller acts.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from typing import Any

import cloudpickle
import torch

from ray_lit.loop.liveness import in_long_phase
from ray_lit.messages import (
    HandedOver,
    Job,
    LeftBehind,
    RankStacks,
    WorkerFailure,
    WorkerState,
    WorkerStatus,
)
from ray_lit.worker import IMPORT_STARTED_AT
from ray_lit.worker._ray_compat import serialization_context_without_arrow, warm_imports
from ray_lit.worker.job import run_job

_IMPORTED_AT = time.time()  # this module's imports (torch among them) are done
# a long poll looks for rank 0's events and notes progress this often (the worker's own cheap
# check; the driver hears of events within this, as it makes at most 10 rounds a second)
_SLICE_S = 0.1


def _node_info() -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}


class Worker:
    """The actor class (made remote in ``worker_group``)."""

    def __init__(self) -> None:
        serialization_context_without_arrow()  # before anything else can build it
        # wall-clock start-up stamps (``startup_timings``): where a group's start-up time goes
        self.timings: dict[str, float] = {"import_start": IMPORT_STARTED_AT,
                                          "imported": _IMPORTED_AT, "init_start": time.time()}
        self._thread: threading.Thread | None = None
        self._state = WorkerState.IDLE
        self._failure: WorkerFailure | None = None
        self._result: Any = None
        self._sink: Any = None
        self._trainer: Any = None
        self._predictions: Any = None  # predict: the rank's ChunkOutbox (``worker.job``)
        self._lock = threading.Lock()
        self._last_progress = time.monotonic()
        self._beats = -1  # batches started in any stage, as last seen by a poll
        self._slowest_s = 0.0  # the longest a batch took, as polls see it
        self.outbox: list[HandedOver] = []
        # set when the driver should hear at once (a state change, a checkpoint part, a
        # SIGTERM): it ends a waiting ``poll`` early
        self._news = threading.Event()
        self.peer_snapshot: Any = None  # the latest in-memory snapshot; outlives an attempt
        self.stop_at_step: int | None = None
        self._first_steps: int | None = None
        self._sigterm = False
        self.aborting = False
        self._last_poll = time.monotonic()
        self._previous_sigterm: Any = None
        if threading.current_thread() is threading.main_thread():  # the actor's constructor
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        # DDP's constructor imports torch._dynamo (~1.5 s): import it while the group forms
        # and the payload ships, not on the way to the first step
        threading.Thread(target=self._warm_imports, daemon=True, name="ray_lit-warm").start()
        self.timings["init_done"] = time.time()

    def _warm_imports(self) -> None:
        warm_imports()
        self.timings["warm_imports_done"] = time.time()

    def startup_timings(self) -> dict[str, float]:
        """This worker's start-up as wall-clock stamps (``time.time()`` on its node), for
        benchmarks and diagnostics; nothing decides on them. Any rank, any time.

        Returns:
            A copy, by name: ``import_start`` / ``imported`` (the actor module's imports),
            ``init_start`` / ``init_done`` (the constructor), ``warm_imports_done`` (DDP's
            imports on the side thread), ``setup_start`` / ``process_group_joined`` (``setup``:
            the rendezvous), ``run_start`` (the latest ``run``: its payload had arrived) and
            ``payload_unpickled``. A stamp is absent until its step happened.
        """
        return dict(self.timings)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """A SIGTERM to a training worker (its node is being reclaimed) is a notice: the next
        poll tells the driver, which has every rank checkpoint at the same step and continues
        without this node. An idle worker, or one the driver no longer polls, exits as Ray's
        own handler would have it."""
        polled = time.monotonic() - self._last_poll < 2.0
        if self._state is WorkerState.RUNNING and polled and not self._sigterm:
            self._sigterm = True
            self._news.set()
            return
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    def node_info(self) -> dict[str, Any]:
        return _node_info()

    def free_port(self) -> int:
        from ray_lit.worker.process_group import find_free_port

        return find_free_port()

    def setup(self, *, ranks: Any, master_addr: str, master_port: int, backend: str,
              timeout_s: float, env: dict[str, str], num_threads: int | None) -> None:
        """Join the process group (COLLECTIVE across the group)."""
        self.timings["setup_start"] = time.time()
        os.environ.update(env)
        for hook in filter(None, env.get("RAY_LIT_WORKER_SETUP", "").split(",")):
            # "module:function" hooks run before anything of the run is unpickled here, e.g.
            # the Lightning import aliases of `python -m ray_lit` (ray_lit.compat)
            import importlib

            module_name, _, function = hook.partition(":")
            getattr(importlib.import_module(module_name), function)()
        if num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        from ray_lit.worker.process_group import init_process_group

        init_process_group(backend=backend, master_addr=master_addr, master_port=master_port,
                           world_rank=ranks.world_rank, world_size=ranks.world_size,
                           timeout_s=timeout_s, local_rank=ranks.local_rank)
        self._ranks = ranks
        self._backend = backend
        self.timings["process_group_joined"] = time.time()

    def run(self, payload_ref: Any, job: Job) -> None:
        """Start the loop in a thread; ``poll`` reports how it goes."""
        import ray

        self.timings["run_start"] = time.time()
        # Ray resolves a top-level reference argument itself: this is usually the pickled
        # payload already (a read-only view of the object store's shared memory)
        payload = ray.get(payload_ref) if isinstance(payload_ref, ray.ObjectRef) else payload_ref
        if self._state is not WorkerState.IDLE:
            # a kept group's next call (fit, then validate, ...): the process group stays, the
            # last run's state goes
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("ray_lit: a worker was asked to run while its loop runs")
            self._reset()
        self._state = WorkerState.RUNNING
        # handed over in a box the loop empties, so the pickled bytes are released once
        # unpickled, and the job's references (a peer snapshot) once the restore is loaded
        self._thread = threading.Thread(target=self._main, args=([payload, job],), daemon=True,
                                        name="ray_lit-loop")
        self._thread.start()

    def _main(self, box: list[Any]) -> None:
        try:
            self._run_loop(box)
        finally:
            self._news.set()  # the loop ended: the driver hears it now, not a poll later

    def _run_loop(self, box: list[Any]) -> None:
        try:
            unpacked = cloudpickle.loads(box.pop(0))
            self.timings["payload_unpickled"] = time.time()
            self._result = run_job(self, unpacked, box.pop())  # run_job holds the only ref
            self._state = WorkerState.DONE
        except BaseException as err:  # reported to the driver, which decides
            from ray_lit.checkpoint.writer import PreemptedExit

            if isinstance(err, PreemptedExit):
                self._state = WorkerState.PREEMPTED
                return
            if self.aborting:  # the driver gave this attempt up; nothing to report
                self._state = WorkerState.ABORTED
                return
            try:
                pickled = cloudpickle.dumps(err)
            except Exception:
                pickled = None
            self._failure = WorkerFailure(traceback.format_exc(), pickled)
            self._state = WorkerState.FAILED

    def post(self, item: HandedOver) -> None:
        """Hand ``item`` (a written checkpoint part, a snapshot part) to the driver with the
        next poll, and end a poll that is waiting (loop and writer threads call this)."""
        with self._lock:  # never onto a list a poll already handed over
            self.outbox.append(item)
        self._news.set()

    def wake(self) -> None:
        """End a waiting ``poll`` now (the driver heard news from another rank)."""
        self._news.set()

    def poll(self, wait_s: float = 0.0) -> WorkerStatus:
        """Status for the controller; rank 0 also hands over its recorded events.

        With ``wait_s`` the call is a long poll (the driver keeps one in flight per rank,
        ``driver.news``): it returns when there is news (see ``post``; rank 0's recorded
        metrics and prints count too) or after ``wait_s``, the rank's heartbeat. A quiet rank
        so costs the driver one call per heartbeat, and the driver still hears of a finished
        loop, a failure or a checkpoint at once.
        """
        self._last_poll = time.monotonic()
        deadline = self._last_poll + wait_s
        while wait_s > 0 and not self._has_events():
            left = deadline - time.monotonic()
            # in slices: rank 0's events are looked for, and progress is noted, between them
            # (the idle time a heartbeat reports is exact to a slice, not to a heartbeat)
            if left <= 0 or self._news.wait(min(left, _SLICE_S)):
                break
            self._last_poll = time.monotonic()  # waiting in a poll is being polled (SIGTERM)
            self._note_progress(self._trainer)
        self._news.clear()  # before reading: news from now on ends the next poll
        events = self._sink.drain() if self._sink is not None and hasattr(
            self._sink, "drain") else []
        trainer = self._trainer
        steps = trainer._progress.total_batch_idx if trainer is not None else -1
        self._note_progress(trainer)
        with self._lock:
            outbox, self.outbox = self.outbox, []
        # predict: a bounded share of the batch outputs per status; what is left makes the
        # next poll return at once
        chunks = self._predictions.take() if self._predictions is not None else ()
        if chunks and self._predictions.pending():
            self._news.set()
        state = self._state
        out = WorkerStatus(
            state=state, events=events, handed_over=tuple(outbox),
            idle_s=time.monotonic() - self._last_progress,
            global_step=trainer.global_step if trainer is not None else 0,
            steps=max(steps, 0) - self._first_steps if self._first_steps is not None else 0,
            sigterm=self._sigterm, slowest_step_s=self._slowest_s,
            long_phase=in_long_phase(),
            failure=self._failure if state is WorkerState.FAILED else None,
            result=self._result if state is WorkerState.DONE else None,
            predictions=chunks)
        if self._first_steps is None and steps >= 0:
            self._first_steps = steps
        return out

    def _has_events(self) -> bool:
        """Rank 0 recorded events the driver has not taken (metrics, prints, progress)."""
        return bool(getattr(self._sink, "events", None))

    def _note_progress(self, trainer: Any) -> None:
        """Liveness: the batches started in any stage (``trainer._beats``). When the count
        moved, the idle clock restarts, and the time per batch since the last move (after the
        attempt's first batches) updates the slowest step the hang timeout scales with."""
        beats = trainer._beats if trainer is not None else -1
        if beats == self._beats:
            return
        now = time.monotonic()
        if self._beats > 0 and beats > self._beats:
            self._slowest_s = max(self._slowest_s,
                                  (now - self._last_progress) / (beats - self._beats))
        self._beats, self._last_progress = beats, now

    def dump_stacks(self) -> RankStacks:
        """Every thread's stack, and whether the loop waits in a collective (the driver
        diagnosing a hang; answered while the loop thread is blocked)."""
        from ray_lit.worker.stacks import rank_stacks

        ranks = getattr(self, "_ranks", None)
        return rank_stacks(ranks.world_rank if ranks is not None else -1, self._thread)

    def request_stop_at(self, step: int) -> None:
        """Preemption: checkpoint at optimizer step ``step`` (the same on every rank), then
        leave the loop."""
        self.stop_at_step = step

    def shutdown(self) -> None:
        from ray_lit.worker.process_group import destroy_process_group

        destroy_process_group()

    def export_snapshot(self, key: tuple[int, int]) -> tuple[int, bytes]:
        """``(size, data)``: the replicated part of the in-memory snapshot ``key`` as
        checkpoint bytes (a survivor, for the next attempt's restore; called with
        ``num_returns=2`` so the driver learns it is done without fetching the data)."""
        if self.peer_snapshot is None:
            raise RuntimeError(f"peer snapshot {key} is not held here (none taken)")
        data = self.peer_snapshot.export(key)
        return len(data), data

    def abort(self, timeout_s: float) -> LeftBehind | None:
        """Leave the failed attempt but stay alive for the next one (a surviving worker).

        The loop thread ends at its next collective (the dead peer's sockets are closed) or,
        failing that, at the next step boundary (``aborting``). The checkpoint write in flight
        is finished: its state was copied from this worker's memory at a step boundary, and
        may complete a checkpoint newer than the last commit.

        Returns:
            What the driver was not yet handed (the confirmation of the part written just now
            among it, and snapshot parts), the keys of the in-memory snapshots this worker
            holds (``PeerSnapshot.restorable``) with, under FSDP, the ranks whose shards each
            holds (``PeerSnapshot.held_ranks``), and ``stuck`` when the loop did
            not end within ``timeout_s`` (stuck in a collective or in user code): the
            controller exports a snapshot from it if needed, then replaces it. None when
            stuck and holding none.
        """
        self.aborting = True
        thread = self._thread
        peer = self.peer_snapshot
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                # stuck (a collective waiting on a lost peer): this actor is replaced, but
                # its snapshots were copied at step boundaries and are still good to export
                if peer is None:
                    return None
                peer.wait()
                return LeftBehind(tuple(self.outbox), tuple(peer.restorable), stuck=True,
                                  shards=tuple(peer.held_ranks.items()))
        checkpointer = getattr(getattr(self._trainer, "_host", None), "checkpointer", None)
        if checkpointer is not None:
            try:
                checkpointer.wait()
            except BaseException:  # a failed write confirms nothing
                pass
        if peer is not None:
            peer.wait()  # the copy in flight is of a step boundary: finish it
        left = LeftBehind(tuple(self.outbox), tuple(peer.restorable) if peer is not None else (),
                          shards=tuple(peer.held_ranks.items()) if peer is not None else ())
        self.shutdown()
        self._reset()
        import gc

        gc.collect()  # the old attempt's module, optimizer and data go now, not later
        return left

    def _reset(self) -> None:
        self._thread, self._state = None, WorkerState.IDLE
        self._failure = self._result = None
        self._sink = self._trainer = self._predictions = None
        self._last_progress = time.monotonic()
        self._beats, self._slowest_s = -1, 0.0
        self.outbox, self.stop_at_step, self._first_steps = [], None, None
        self._sigterm = False
        self.aborting = False
        self._news.clear()  # the ended loop's news was for the attempt that is over
