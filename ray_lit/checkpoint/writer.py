"""Worker side of fault-tolerance checkpoints: when to take one, and the asynchronous write.

Every rank takes a checkpoint at the same step boundary (the conditions depend only on counters
every rank shares, so no collective is needed to agree): every ``every_n_steps`` optimizer
steps, at each epoch end, when the driver asks for one before a planned stop (preemption), and
at the end of fit. With ``snapshot_every_n_steps`` every rank also keeps an in-memory snapshot
between them (``peer_snapshot``), which survivors of a loss hand to the next attempt. At that
boundary the small, fast-changing state is copied to host memory;
parameters and optimizer state are copied by a background thread during the next forward and
backward (``HostSnapshot``: optimizer steps wait for that copy), which then serialises and
writes this rank's part while training goes on; at most one write is in flight. The driver
commits the checkpoint once every rank confirmed its part.

A sharded strategy over several ranks (``FSDPStrategy``) writes sharded checkpoints: every rank
plans its shards of a DCP directory at the boundary (DCP's plans are exchanged in a background
thread through the process group's store, ``storage.dcp_plan``: the boundary waits for no other
rank), its own shards are copied to host like the parameters above, and the thread writes its
shard file and its part once the plan is there; the driver writes DCP's ``.metadata`` at the commit
(``storage.dcp_plan``, ``checkpoint.manager``).

Storage faults (``storage/retry.py``): a failed part write is retried with backoff in its
thread, from an in-memory copy of the serialised part, so the host buffers are free again and
training goes on. The next checkpoint supersedes a write still retrying (that part is never
confirmed, so its checkpoint is never committed), and the retry bound
(``storage_retry_timeout_s``) counts from the outage's first failure across writes; past it the
loop raises ``StorageUnavailableError``. ``wait`` (end of fit, preemption) waits for the retries.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray_lit.checkpoint.host_copy import HostSnapshot
from ray_lit.checkpoint.layout import checkpoint_name, part_uri
from ray_lit.loop.liveness import long_phase
from ray_lit.messages import CheckpointSpec, PartWritten, SnapshotPart
from ray_lit.storage.filesystem import Storage
from ray_lit.storage.retry import DEFAULT_TIMEOUT_S, StorageRetry, is_transient

if TYPE_CHECKING:
    from ray_lit.loop.context import LoopContext

log = logging.getLogger("ray_lit")


class PreemptedExit(Exception):
    """Raised in the loop after the checkpoint the driver asked for is written."""


class AttemptAborted(Exception):
    """Raised in a surviving worker's loop when the driver gave the attempt up."""


@dataclass
class _Write:
    """One part write in its thread: ``released`` once the host buffers are no longer read
    (the next capture may reuse them), ``cancel`` to stop retrying (superseded)."""

    name: str
    thread: threading.Thread | None = None
    released: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Shards:
    """A sharded checkpoint's DCP part of this rank: the plan and the directory's name."""

    plan: Any
    directory: str


class CheckpointWriter:
    """Shipped to every worker with the job; ``attach`` binds it to the worker and its rank.

    ``storage`` (a ``Storage`` of ``run_uri`` with the retry policy) is built on first use
    from the Trainer's ``storage_retry_timeout_s``; tests may set it to a faulty filesystem.
    """

    def __init__(self, run_uri: str, every_n_steps: int | None, asynchronous: bool = True,
                 snapshot_every_n_steps: int | None = None) -> None:
        self.run_uri = run_uri.rstrip("/")
        self.every_n_steps = every_n_steps
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self._attempt = 0
        self._fence = ""
        self._last_snapshot_step = -1
        self.asynchronous = asynchronous
        self._worker: Any = None
        self._rank = 0
        self._world_size = 1
        self._thread: threading.Thread | None = None
        self._write_job: _Write | None = None
        self.storage: Storage | None = None
        self.superseded = 0  # writes given up for a newer checkpoint while storage failed
        self._error: BaseException | None = None
        self._last_step_taken = -1
        self._last_name: str | None = None
        self._snapshot = HostSnapshot()
        self._prepared = False
        self._announced = False  # the attempt's first step was reported to the driver
        self.overlap_copy = True  # off after a torn copy (a parameter changed outside step)
        self.stall_s: list[float] = []
        self._shard_planner: Any = None  # the DCP plan of sharded checkpoints, kept

    @classmethod
    def from_spec(cls, spec: CheckpointSpec) -> CheckpointWriter:
        """The writer a worker builds from the job's ``CheckpointSpec``."""
        return cls(spec.run_uri, spec.every_n_steps,
                   snapshot_every_n_steps=spec.snapshot_every_n_steps)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_worker"] = state["_thread"] = state["_write_job"] = None
        state["_snapshot"] = state["_shard_planner"] = None
        state.pop("peer_snapshot", None)  # host memory stays where it was taken
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._snapshot = HostSnapshot()

    @property
    def fence_wait_s(self) -> list[float]:
        """Time optimizer steps waited for a deferred copy, per checkpoint or in-memory
        snapshot that made one wait."""
        peer = self._peer(create=False)
        return self._snapshot.fence_wait_s + (peer.fence_wait_s if peer is not None else [])

    def attach(self, worker: Any, ranks: Any, attempt: int = 0, fence: str = "") -> None:
        """Bind to this worker, its rank, and the attempt whose parts it writes (``fence``)."""
        self._worker = worker
        self._rank = ranks.world_rank
        self._world_size = ranks.world_size
        self._attempt = attempt
        self._fence = fence

    # --- when -----------------------------------------------------------------------------------
    def after_train_step(self, ctx: LoopContext, is_last: bool) -> None:
        step = ctx.trainer.global_step
        if getattr(self._worker, "aborting", False):
            raise AttemptAborted("the driver is re-forming the worker group")
        if not self._announced and self._worker is not None:
            self._announced = True
            self._worker.wake()  # an attempt's first step is news: a recovery is over
        if not self._prepared and step >= 1:
            self._prepare(ctx)
        stop_at = getattr(self._worker, "stop_at_step", None)
        if stop_at is not None and step >= stop_at:
            self.take(ctx, tag="preempt")
            self.wait()
            raise PreemptedExit(f"checkpoint at step {step} written; stopping as asked")
        if is_last or step <= 0 or step in (self._last_step_taken, self._last_snapshot_step):
            return
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.take(ctx)
        elif self.snapshot_every_n_steps and step % self.snapshot_every_n_steps == 0:
            self.snapshot(ctx)

    def after_epoch(self, ctx: LoopContext) -> None:
        self.take(ctx)

    def finish(self, ctx: LoopContext) -> None:
        if ctx.trainer.global_step != self._last_step_taken:
            self.take(ctx)
        with long_phase("the last fault-tolerance checkpoint write"):  # no batches meanwhile
            self.wait()
        self._snapshot.release()
        peer = self._peer(create=False)
        if peer is not None:  # the run is over: nobody will restore from it
            peer.release()

    # --- what -----------------------------------------------------------------------------------
    def _prepare(self, ctx: LoopContext) -> None:
        """After the first optimizer step (the optimizer state exists now), allocate the host
        buffers of this rank's checkpoint in the background."""
        self._prepared = True
        if self.snapshot_every_n_steps:  # every rank keeps the replicated part in memory
            from ray_lit.checkpoint.peer import split_rank_state

            trainer = ctx.trainer
            replicated, _ = split_rank_state({}, trainer.lightning_module, trainer.optimizers)
            self._peer().prepare(replicated)
        if self._sharded(ctx) and self.asynchronous and self._thread is None:
            # every rank holds its own shards: each prepares host buffers for them
            from ray_lit.storage.dcp_plan import flat_local_tensors
            from ray_lit.storage.sharded_io import split_checkpoint
            from ray_lit.strategies.fsdp import sharded_state_dicts

            strategy, module = ctx.strategy, ctx.trainer.lightning_module
            with sharded_state_dicts(strategy):  # the tensors only: no user hooks here
                tensors, _ = split_checkpoint(
                    {"state_dict": strategy.lightning_module_state_dict(module),
                     "optimizer_states": [strategy.optimizer_state(o)
                                          for o in ctx.trainer.optimizers]}, self._world_size)
            state = {"shards": flat_local_tensors(tensors)}
            self._thread = threading.Thread(target=self._snapshot.prepare, args=(state,),
                                            daemon=True, name="ray_lit-ckpt-prepare")
            self._thread.start()
            return
        if self._rank != 0 or not self.asynchronous or self._thread is not None:
            return  # other ranks' parts are small
        if ctx.strategy.shards_state:
            # the state is gathered afresh at each checkpoint (COLLECTIVE, every rank): no
            # buffers to prepare from it here, where rank 0 alone would start the gather
            return
        # the large entries of ``dump_checkpoint``'s dict, under the same keys (no user hooks)
        module, strategy = ctx.trainer.lightning_module, ctx.strategy
        state = {"state_dict": {k: v.detach() for k, v in
                                strategy.lightning_module_state_dict(module).items()},
                 "optimizer_states": [strategy.optimizer_state(opt)
                                      for opt in ctx.trainer.optimizers]}
        self._thread = threading.Thread(target=self._snapshot.prepare, args=(state,),
                                        daemon=True, name="ray_lit-ckpt-prepare")
        self._thread.start()

    def take(self, ctx: LoopContext, tag: str = "") -> None:
        """Copy this rank's state to host memory now; write it in the background."""
        import time

        start = time.perf_counter()
        with long_phase("the previous checkpoint write"):
            # at most one write in flight (waiting for it is part of the stall); one still
            # retrying a failing storage is superseded by this one
            self._settle_previous()
        progress = ctx.progress
        shards = None
        if self._sharded(ctx):
            rank_state, shards = self._plan_shards(ctx)
        else:
            rank_state = self._rank_state(ctx)
        state = self._snapshot.capture(rank_state, ctx.trainer.optimizers,
                                       deferred=self.overlap_copy)
        self.stall_s.append(time.perf_counter() - start)
        name = checkpoint_name(progress.global_step, progress.epoch, tag)
        meta = {"global_step": progress.global_step, "epoch": progress.epoch}
        self._last_step_taken = progress.global_step
        self._last_name = name
        uri = part_uri(self.run_uri, name, self._rank, self._fence)
        job = _Write(name)
        self._storage(ctx)
        args = (state, uri, name, meta, job, shards)
        if self.asynchronous:
            job.thread = threading.Thread(target=self._write, args=args,
                                          daemon=True, name="ray_lit-ckpt-writer")
            self._thread, self._write_job = job.thread, job
            job.thread.start()
        else:
            self._write(*args)
        if self._error is not None:
            raise self._error

    def _storage(self, ctx: LoopContext | None = None) -> Storage:
        """The run directory with this worker's retry policy (built once per writer)."""
        if self.storage is None:
            timeout = getattr(getattr(ctx, "config", None), "storage_retry_timeout_s",
                              DEFAULT_TIMEOUT_S)
            self.storage = Storage(self.run_uri, retry=StorageRetry(timeout))
        return self.storage

    def _settle_previous(self) -> None:
        """Before a new capture: wait until the write in flight no longer reads the host
        buffers; if it is still retrying a failing storage, give it up for the new one (its
        part is never confirmed, so its checkpoint never commits)."""
        job = self._write_job
        if job is not None and job.thread is not None:
            job.released.wait()
            retry = self._storage().retry
            while job.thread.is_alive():
                if retry is not None and retry.failing_for_s > 0:
                    # only a write that is failing: a healthy slow upload is waited for
                    job.cancel.set()
                    self.superseded += 1
                    log.warning("ray_lit: rank %d gives up writing checkpoint %s (storage "
                                "still failing) for the newer one", self._rank, job.name)
                    break
                job.thread.join(0.05)
            self._thread = self._write_job = None
        self.wait()

    def _rank_state(self, ctx: LoopContext, join_gather: bool = True) -> dict[str, Any]:
        """This rank's checkpoint state at the step boundary, tensors where they live: rank 0's
        whole checkpoint; the other ranks' own loop state (RNG, progress, sampler)."""
        from ray_lit.core.seed import rng_state
        from ray_lit.loop.checkpoint_state import dump_checkpoint, join_state_gather

        progress = ctx.progress
        if self._rank == 0:
            return dump_checkpoint(ctx, on_device=True)
        # a sharded strategy: rank 0's checkpoint is the gathered full state, and every rank
        # takes part in that gather (COLLECTIVE) at this same step boundary
        if join_gather:
            join_state_gather(ctx)
        state = {"loops": {"progress": progress.state_dict(), "rng": rng_state(),
                           "sampler": ctx.host.sampler_state(progress.batches_done),
                           "world_size": self._world_size}}
        if progress.batches_done >= ctx.trainer.num_training_batches:
            state["loops"]["progress"]["epoch_finished"] = True
        return state

    # --- sharded checkpoints (a sharded strategy over several ranks) ---------------------------
    def _sharded(self, ctx: LoopContext) -> bool:
        """Each rank writes only its own shards (``FSDPStrategy`` over more than one rank)."""
        from ray_lit.strategies.fsdp import FSDPStrategy

        # FSDPStrategy hands out its shards without gathering (``sharded_state_dicts``)
        return isinstance(ctx.strategy, FSDPStrategy) and \
            self._world_size > 1

    def _shard_state(self, ctx: LoopContext) -> dict[str, Any]:
        """Inside ``sharded_state_dicts``: rank 0's whole checkpoint (hooks included), the
        other ranks' own loop state; every rank's module and optimizer state as its own
        DTensor shards, on device (nothing gathered)."""
        if self._rank == 0:
            from ray_lit.loop.checkpoint_state import dump_checkpoint

            return dump_checkpoint(ctx, on_device=True)
        strategy, module = ctx.strategy, ctx.trainer.lightning_module
        return {**self._rank_state(ctx, join_gather=False),
                "state_dict": strategy.lightning_module_state_dict(module),
                "optimizer_states": [strategy.optimizer_state(o) for o in ctx.trainer.optimizers]}

    def _plan_shards(self, ctx: LoopContext) -> tuple[dict[str, Any], _Shards]:
        """At the step boundary, every rank (COLLECTIVE: DCP's plans are gathered once): this
        rank's part (rank 0: the checkpoint without the module's and optimizers' tensors;
        others: their loop state) and its DCP shards, tensors still on device."""
        from ray_lit.storage.dcp_plan import ShardPlanner
        from ray_lit.storage.sharded_io import SHARDED_MARKER, split_checkpoint
        from ray_lit.strategies.fsdp import sharded_state_dicts

        with sharded_state_dicts(ctx.strategy):
            tensors, meta = split_checkpoint(self._shard_state(ctx), self._world_size)
        if self._shard_planner is None:  # one per attempt: the layout is the attempt's
            self._shard_planner = ShardPlanner()
        plan = self._shard_planner.plan(tensors, self._rank, self._world_size)
        directory = f"model-{self._fence}" if self._fence else "model"
        if self._rank == 0:
            meta[SHARDED_MARKER]["dcp_dir"] = directory
            part = meta
        else:
            part = {"loops": meta["loops"]}
        # the tensors go through the host copy with the part (paths "part", "shards")
        return {"part": part, "shards": plan.tensors}, _Shards(plan, directory)

    def _save_sharded(self, state: dict[str, Any], uri: str, name: str, shards: _Shards,
                      job: _Write) -> list[Any] | None:
        """Write this rank's DCP shard file and its part; DCP's write results, or None when
        superseded. A local run directory is written in place; after a failure (or for a URI)
        the shard file is written to a local temporary directory, the shard and the part are
        held as bytes (the host buffers are free again) and uploaded with retries."""
        import os
        import tempfile

        from ray_lit.storage.checkpoint_io import checkpoint_to_bytes, save_checkpoint
        from ray_lit.storage.dcp_plan import write_shards

        storage = self._storage()
        rel_dir = f"checkpoints/{name}/{shards.directory}"
        if storage.local:
            try:
                results = write_shards(shards.plan, state["shards"], storage.uri(rel_dir))
                save_checkpoint(state["part"], uri)
                if storage.retry is not None:
                    storage.retry.succeeded(uri)
                return results
            except (OSError, RuntimeError) as err:
                if not is_transient(err) or storage.retry is None:
                    raise
                storage.retry.failed(err, what="checkpoint write", uri=uri)
        files: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(prefix="ray_lit_shards_") as tmp:
            results = write_shards(shards.plan, state["shards"], tmp)
            for file in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, file), "rb") as src:
                    files[f"{rel_dir}/{file}"] = src.read()
        files[uri[len(self.run_uri) + 1:]] = checkpoint_to_bytes(state["part"])  # the part last
        job.released.set()  # the bytes are all the retries need
        retry, once = storage.retry or StorageRetry(0), storage.once()
        for rel, data in files.items():
            done = retry.call(lambda rel=rel, data=data: once.write_bytes(rel, data) or True,
                              what="checkpoint write", uri=storage.uri(rel), cancel=job.cancel)
            if done is None or job.cancel.is_set():
                return None
        return results

    def snapshot(self, ctx: LoopContext) -> None:
        """An in-memory snapshot (``peer_snapshot``): the replicated tensors stay in this
        worker's memory, copied while the next step runs; this rank's own part goes to the
        driver with the next poll."""
        import time

        from ray_lit.checkpoint.peer import own_part_bytes, split_rank_state

        start = time.perf_counter()
        step = ctx.trainer.global_step
        self._last_snapshot_step = step
        if self._sharded(ctx):
            from ray_lit.strategies.fsdp import sharded_state_dicts

            # nothing gathered: the snapshot keeps this rank's own shards (``shard_ring``),
            # so a full dump (every rank joining rank 0's gather) would only be thrown away
            with sharded_state_dicts(ctx.strategy):
                state = self._shard_state(ctx)
        else:
            state = self._rank_state(ctx)
        replicated, own = split_rank_state(state, ctx.trainer.lightning_module,
                                           ctx.trainer.optimizers)
        key = (self._attempt, step)
        peer = self._peer()
        if peer.torn and self.overlap_copy:
            self.overlap_copy = False
            log.warning("ray_lit: a parameter or optimizer state tensor changed outside "
                        "optimizer.step while a peer snapshot was copied; it was dropped, and "
                        "later snapshots and checkpoints copy synchronously")
        peer.take(replicated, ctx.trainer.optimizers, key, deferred=self.overlap_copy)
        blob = own_part_bytes(own)
        self.stall_s.append(time.perf_counter() - start)
        if self._worker is not None:
            self._worker.post(SnapshotPart(key, self._rank, self._world_size, blob))

    def _peer(self, create: bool = True) -> Any:
        """This worker's ``PeerSnapshot`` (it lives on the ``Worker``, across attempts; on
        the writer itself outside a Ray worker)."""
        from ray_lit.checkpoint.peer import PeerSnapshot

        holder = self._worker if self._worker is not None else self
        if getattr(holder, "peer_snapshot", None) is None and create:
            holder.peer_snapshot = PeerSnapshot()
        return getattr(holder, "peer_snapshot", None)

    def _write(self, state: dict[str, Any], uri: str, name: str, meta: dict[str, Any],
               job: _Write, shards: _Shards | None = None) -> None:
        try:
            if not self._snapshot.copy_deferred():
                # a parameter changed in place outside optimizer.step during the copy: this
                # checkpoint is never written (so never committed); copy synchronously from now
                self.overlap_copy = False
                log.warning("ray_lit: a parameter or optimizer state tensor changed outside "
                            "optimizer.step while checkpoint %s was copied; it is skipped and "
                            "later checkpoints copy synchronously", name)
                return
            if shards is not None:
                results = self._save_sharded(state, uri, name, shards, job)
                if results is None:
                    return  # superseded by a newer checkpoint while storage failed
                # the driver writes the DCP directory's .metadata from every rank's results
                # before it commits the manifest
                meta = {**meta, "dcp": {"dir": shards.directory, "results": results,
                                        "metadata": shards.plan.metadata
                                        if self._rank == 0 else None}}
            elif not self._save(state, uri, job):
                return  # superseded by a newer checkpoint while storage failed
        except BaseException as err:  # surfaced on the loop thread at the next take/wait
            self._error = err
            return
        finally:
            job.released.set()
        if self._worker is not None:
            self._worker.post(PartWritten(name, self._rank, self._world_size, meta,
                                          self._fence))

    def _save(self, state: dict[str, Any], uri: str, job: _Write) -> bool:
        """Write this rank's part; False when it was superseded before it got written.

        A local run directory is streamed to disk first (no in-memory copy of the whole part);
        only after that fails is the part serialised to memory, which frees the host buffers
        for the next checkpoint, and retried from there.
        """
        from ray_lit.storage.checkpoint_io import checkpoint_to_bytes, save_checkpoint

        storage = self._storage()
        rel = uri[len(self.run_uri) + 1:]
        if storage.local:
            try:
                save_checkpoint(state, uri)
                if storage.retry is not None:
                    storage.retry.succeeded(uri)
                return True
            except (OSError, RuntimeError) as err:
                if not is_transient(err) or storage.retry is None:
                    raise
                storage.retry.failed(err, what="checkpoint write", uri=uri)
        data = checkpoint_to_bytes(state)
        job.released.set()  # the bytes are all the retries need
        retry, once = storage.retry or StorageRetry(0), storage.once()
        done = retry.call(lambda: once.write_bytes(rel, data) or True, what="checkpoint write",
                          uri=uri, cancel=job.cancel)
        # superseded meanwhile: the writer moved on to a newer checkpoint, do not confirm
        return done is not None and not job.cancel.is_set()

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
