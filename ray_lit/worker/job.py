"""One rank's run of one stage: build the trainer's host and sinks, restore, run, report.

Runs on the worker's loop thread (``Worker._run_loop``); rank 0 returns the final state the
driver applies to the user's Trainer (``driver.results``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import cloudpickle
import torch

from ray_lit.messages import FinalState, FromPeers, Job, Restore, resolve

if TYPE_CHECKING:
    from ray_lit.loop.context import LoopContext


def run_job(worker: Any, payload: dict[str, Any], job: Job) -> bytes | None:
    """Build this rank's trainer and run the stage; rank 0 returns its pickled
    ``FinalState``, the other ranks None."""
    from ray_lit.checkpoint.writer import CheckpointWriter
    from ray_lit.core.seed import seed_everything
    from ray_lit.loop.reporting import NullSink, RecordingSink
    from ray_lit.strategies import resolve_strategy
    from ray_lit.worker.host import WorkerHost

    ranks = worker._ranks
    spec = payload["spec"]
    trainer = spec.trainer_class._from_run_spec(spec)
    ctx = trainer._ctx  # the stage's services: the loop and the checkpoint code take this
    module = payload["module"]
    if job.accumulate is not None:  # elastic: the controller's accumulation plan
        ctx.config = dataclasses.replace(ctx.config, accumulate_grad_batches=job.accumulate)
    if job.seed is not None:
        seed_everything(job.seed)
    device = torch.device("cpu")
    if job.accelerator == "tpu":
        import torch_xla.core.xla_model as xm  # checked on the driver (choose_backend)

        device = xm.xla_device()
    elif job.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", 0)  # Ray exposes only this worker's GPU(s)
        torch.cuda.set_device(device)
    checkpointer = None
    if job.checkpointing is not None:
        checkpointer = CheckpointWriter.from_spec(job.checkpointing)
        checkpointer.attach(worker, ranks, attempt=job.attempt, fence=job.fence)
    strategy = resolve_strategy(ctx.config.strategy, distributed=True)
    host = WorkerHost(ranks, device, seed=job.sampler_seed, checkpointer=checkpointer,
                      strategy=strategy, data_key=job.fence)
    sink = RecordingSink() if ranks.world_rank == 0 else NullSink()
    for logger in trainer.loggers:
        logger.sink = sink
    ctx.host, ctx.sink = host, sink
    worker._sink, worker._trainer = sink, trainer
    stage, weights = job.stage, resolve(job.weights)
    return_predictions = job.return_predictions
    checkpoint = resolve(job.checkpoint)
    if job.restore is not None:
        checkpoint = load_restore(
            job.restore, ranks.world_rank,
            retry_timeout_s=getattr(ctx.config, "storage_retry_timeout_s", None),
            sharded=strategy.shards_state)
    # the last reference to the job (the worker handed it over in a box): a peer snapshot's
    # ObjectRef in it no longer pins the object once every rank has loaded it
    del job
    from ray_lit.loop.stages import run_evaluation, run_fit

    if stage == "predict":
        results = _run_predict(worker, ctx, module, payload, weights, return_predictions)
    elif stage == "fit":
        run_fit(ctx, module, payload.get("train"), payload.get("val"), payload.get("dm"),
                checkpoint)
        if checkpointer is not None:
            checkpointer.finish(ctx)
        results = None
    else:
        results = run_evaluation(ctx, stage, module, payload.get("loaders"),
                                 payload.get("dm"), weights)
    gathered = None
    if trainer.strategy.shards_state:
        # each rank holds a shard: the gather is COLLECTIVE, every rank joins it, rank 0 keeps it
        gathered = trainer.strategy.lightning_module_state_dict(trainer.lightning_module)
    if ranks.world_rank != 0:
        return None
    return cloudpickle.dumps(final_state(ctx, results, gathered))


def _run_predict(worker: Any, ctx: LoopContext, module: Any, payload: dict[str, Any],
                 weights: dict | None, return_predictions: bool) -> list[int | None]:
    """``trainer.predict`` on this rank: each batch output is streamed to the driver through
    the worker's polls (``ChunkOutbox``) as the rank goes. Returns each predict loader's batch
    count over all ranks (rank 0's ``FinalState.results``).

    The stage ends only once the polls took every chunk: the driver must hold all of this
    rank's outputs when it sees the rank DONE."""
    from ray_lit.loop.predict_loop import ChunkOutbox, run_predict

    outbox = None
    if return_predictions:
        outbox = ChunkOutbox(notify=worker.wake, cancelled=lambda: worker.aborting)
        worker._predictions = outbox
    loop = run_predict(ctx, module, payload.get("loaders"), payload.get("dm"), weights,
                       return_predictions=return_predictions, outbox=outbox)
    if outbox is not None:
        outbox.drain()
    return loop.totals


def load_restore(restore: Restore, world_rank: int, retry_timeout_s: float | None = None,
                 sharded: bool = False) -> dict[str, Any]:
    """Rank 0's full checkpoint, with this rank's own RNG and loop state where it has a part
    (from storage, or from a surviving worker's memory: ``peer_snapshot``). Every rank calls
    it before its stage starts.

    Storage reads are retried like the writes (``storage_retry_timeout_s``, default 300 s).
    A sharded checkpoint (written by ``FSDPStrategy`` ranks, ``checkpoint.shard_restore``) is
    read lazily when ``sharded`` (the strategy loads each rank's own shards after sharding),
    else whole.
    """
    from ray_lit.storage.checkpoint_io import load_checkpoint
    from ray_lit.storage.retry import DEFAULT_TIMEOUT_S, StorageRetry

    if isinstance(restore, FromPeers):
        from ray_lit.checkpoint.peer import restore_checkpoint

        return restore_checkpoint(restore, world_rank)
    retry = StorageRetry(DEFAULT_TIMEOUT_S if retry_timeout_s is None else retry_timeout_s)

    def read(uri: str) -> dict[str, Any]:
        return retry.call(lambda: load_checkpoint(uri, map_location="cpu"),
                          what="checkpoint read", uri=uri)

    checkpoint = read(restore.rank0_uri)
    from ray_lit.checkpoint.shard_restore import restore_checkpoint as restore_shards
    from ray_lit.checkpoint.shard_restore import sharded_dir

    directory = sharded_dir(checkpoint)
    if directory is not None:
        from ray_lit.storage.filesystem import Storage, split

        dcp_uri = Storage(split(restore.rank0_uri)[0]).uri(directory)  # beside the part
        checkpoint = restore_shards(checkpoint, dcp_uri, lazy=sharded, retry=retry)
    own = restore.parts.get(world_rank)
    if world_rank != 0 and own is not None:
        part = read(own)
        checkpoint["loops"]["rng"] = part["loops"]["rng"]
    return checkpoint


def final_state(ctx: LoopContext, results: Any,
                state_dict: dict[str, Any] | None = None) -> FinalState:
    """Rank 0's view of the run, sent back to the driver's Trainer. ``state_dict``: the
    module's full state when a sharded strategy gathered it (on every rank); else rank 0's
    own ``state_dict`` is the full one."""
    trainer = ctx.trainer
    module = trainer.lightning_module
    if state_dict is None:
        state_dict = module.state_dict()
    return FinalState(
        state_dict={k: v.detach().cpu() for k, v in state_dict.items()},
        hparams=module.__dict__.get("_hparams"),
        callback_metrics=_cpu(trainer.callback_metrics),
        logged_metrics=_cpu(trainer.logged_metrics),
        pbar=dict(trainer.progress_bar_metrics),
        progress=ctx.progress.state_dict(),
        should_stop=trainer.should_stop,
        callbacks={callback_key(cb): _picklable_state(cb) for cb in trainer.callbacks},
        num_training_batches=trainer.num_training_batches,
        num_val_batches=trainer.num_val_batches,
        num_test_batches=trainer.num_test_batches,
        results=results,
        interrupted=trainer.interrupted,
    )


def callback_key(callback: Any) -> str:
    """The key a callback's state travels under: the driver's tag for a callback the driver
    shipped, else its ``state_key`` (one ``configure_callbacks`` made on both sides)."""
    return callback.__dict__.get("_ray_lit_key") or callback.state_key


def _picklable_state(obj: Any) -> dict[str, Any]:
    """The parts of a callback's ``__dict__`` that can travel back to the driver."""
    from ray_lit.core.module import LightningModule

    out = {}
    for key, value in obj.__dict__.items():
        if isinstance(value, LightningModule) or type(value).__name__ == "Trainer":
            continue
        try:
            cloudpickle.dumps(value)
        except Exception:
            continue
        out[key] = value
    return out


def _cpu(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
