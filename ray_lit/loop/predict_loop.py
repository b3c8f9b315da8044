"""``trainer.predict``: the prediction loop (2.x ``_PredictionLoop``), one rank's part of it.

Runs where the loop runs: the driver for ``num_workers=0``, every Ray worker otherwise. Each rank
predicts its own shard of every predict dataloader and

- in process, keeps the batch outputs (moved to CPU) to return them;
- on a Ray worker, hands each batch output to the driver as a ``PredictionChunk`` through a
  bounded ``ChunkOutbox`` that the worker's polls empty, so a large prediction set streams to
  the driver instead of piling up in one worker (``driver.predictions`` puts it back in order).

Sharding: a predict loader is split by **whole batches of the user's loader** (rank ``r`` runs
batches ``r, r + W, r + 2W, ...``), without padding. Lightning also shards predict without
padding (``UnrepeatedDistributedSampler``) but by samples; whole batches mean each batch output
is exactly the one ``num_workers=0`` computes (same samples, same batch composition, any output
type), so the driver returns the in-process result without having to split or collate outputs.
Predict runs no collective per batch, so ranks may run one batch more or less than others.
"""

from __future__ import annotations

import collections
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sized
from typing import TYPE_CHECKING, Any

import cloudpickle
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from ray_lit.core.batch import move_to_device
from ray_lit.core.hooks import _signature_of
from ray_lit.core.module import LightningModule
from ray_lit.errors import MisconfigurationException
from ray_lit.loop.data import limit_batches, loader_length, resolve_loaders
from ray_lit.messages import PredictionChunk

if TYPE_CHECKING:
    from ray_lit.loop.context import LoopContext

__all__ = ["ChunkOutbox", "PredictBatches", "PredictLoop", "prepare_predict_loader",
           "run_predict"]


# --- sharding --------------------------------------------------------------------------------
class PredictBatches(Sampler[list[int]]):
    """Rank ``rank``'s batches of the user's batch sampler, and which ones it served.

    Every rank of a worker group holds one (built by ``prepare_predict_loader``); in process
    one with ``num_replicas=1`` records the batches for the prediction writers. Rank ``rank``
    serves the user's batches ``rank, rank + num_replicas, ...``; nothing is padded.

    Args:
        batch_sampler: the user's batch sampler (a ``BatchSampler`` or any iterable of index
            lists), or a sampler whose single indices are the "batches" (``batch_size=None``).
        num_replicas: the world size.
        rank: this worker's world rank.
        seed: seeds torch's RNG while several ranks materialise the user's order, so a
            shuffling sampler that draws from the global RNG gives every rank the same order.
        single: the wrapped sampler yields single indices (no automatic batching).

    Attributes:
        seen: ``(position, indices)`` of each batch served so far, in serving order;
            ``position`` is the batch's place in the user's loader.
    """

    def __init__(self, batch_sampler: Any, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 single: bool = False) -> None:
        self.batch_sampler = batch_sampler
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.single = single
        self.seen: list[tuple[int, list[int]]] = []

    def _user_batches(self) -> Iterator[list[int]]:
        for item in self.batch_sampler:
            yield [int(item)] if self.single else [int(i) for i in item]

    def __iter__(self) -> Iterator[Any]:
        self.seen = []
        if self.num_replicas == 1:
            # one rank: the user's sampler as it is (its own RNG use included), lazily
            batches: Iterator[tuple[int, list[int]]] = enumerate(self._user_batches())
        else:
            # every rank must see the same order: materialise it under a shared seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                order = list(self._user_batches())
            batches = ((p, order[p]) for p in range(self.rank, len(order), self.num_replicas))
        for position, indices in batches:
            # recorded before the DataLoader fetches the batch: the ``k``-th entry is the
            # ``k``-th batch the loop receives, even when loader workers prefetch ahead
            self.seen.append((position, indices))
            yield indices[0] if self.single else indices

    @property
    def total(self) -> int | None:
        """Batches of the user's loader (all ranks together), or None when unknown."""
        return len(self.batch_sampler) if isinstance(self.batch_sampler, Sized) else None

    def __len__(self) -> int:
        total = self.total
        if total is None:
            raise TypeError("the wrapped sampler has no length")
        return len(range(self.rank, total, self.num_replicas))


def prepare_predict_loader(loader: Any, *, world_rank: int, world_size: int,
                           seed: int) -> tuple[Any, PredictBatches | None]:
    """This rank's copy of a predict ``loader`` and the sampler that records its batches.

    Called on every rank (and in process with ``world_size=1``) for each predict loader.

    Returns:
        ``(loader, batches)``. ``batches`` is None where the loader is used as given: not a
        ``DataLoader``, an ``IterableDataset``, or a loader that already has a
        ``DistributedSampler`` (the user shards those themselves; the driver then gets every
        rank's outputs, rank after rank, and the writers get no ``batch_indices``).

    Raises:
        MisconfigurationException: on several ranks, a ``DataLoader`` subclass that cannot be
            rebuilt with another batch sampler (see ``loop.sampler.shard_dataloader``).
    """
    from torch.utils.data import DistributedSampler

    from ray_lit.loop.sampler import ResumableDistributedSampler, _rebuild

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader, None
    sharded = (DistributedSampler, ResumableDistributedSampler)
    if isinstance(loader.sampler, sharded) or isinstance(
            getattr(loader.batch_sampler, "sampler", None), sharded):
        return loader, None
    if loader.batch_sampler is None:  # batch_size=None: each "batch" is one sample
        batches = PredictBatches(loader.sampler, world_size, world_rank, seed, single=True)
        overrides: dict[str, Any] = {"sampler": batches, "batch_size": None}
    else:
        batches = PredictBatches(loader.batch_sampler, world_size, world_rank, seed)
        overrides = {"batch_sampler": batches}
    try:
        return _rebuild(loader, overrides), batches
    except MisconfigurationException:
        if world_size > 1:
            raise
        # in process the user's loader still predicts; only the writers' indices are missing
        warnings.warn(f"Could not record the batch indices of {type(loader).__name__}; "
                      "prediction writers get batch_indices=[].", stacklevel=3)
        return loader, None


# --- streaming to the driver (worker side) ---------------------------------------------------
class ChunkOutbox:
    """Prediction chunks on their way from one rank's loop to the driver (a Ray worker).

    The loop thread ``put``s one chunk per batch; the actor's ``poll`` ``take``s at most
    ``per_poll_bytes`` of them per status (at least one), so no single message grows with the
    prediction set. The outbox holds at most ``capacity_bytes``: a loop that predicts faster
    than the driver polls waits (and wakes the poll), so a worker never holds more than that
    of undelivered predictions.

    Args:
        capacity_bytes: the most payload bytes held before ``put`` waits.
        per_poll_bytes: the most payload bytes one ``take`` returns (one chunk always goes).
        notify: called when the driver should poll now (the worker's ``wake``).
        cancelled: true once the driver gave the attempt up (``put``/``drain`` then raise).
    """

    def __init__(self, capacity_bytes: int = 64 << 20, per_poll_bytes: int = 8 << 20,
                 notify: Callable[[], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.per_poll_bytes = per_poll_bytes
        self._notify = notify or (lambda: None)
        self._cancelled = cancelled or (lambda: False)
        self._chunks: collections.deque[PredictionChunk] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()

    def _wait(self) -> None:
        self._notify()
        self._cond.wait(0.5)
        if self._cancelled():
            raise RuntimeError("ray_lit: the driver ended this attempt while predictions "
                               "were on their way")

    def put(self, chunk: PredictionChunk) -> None:
        """Queue ``chunk`` (loop thread); waits while the outbox is full."""
        size = len(chunk.payload)
        with self._cond:
            while self._chunks and self._bytes + size > self.capacity_bytes:
                self._wait()
            self._chunks.append(chunk)
            self._bytes += size

    def take(self) -> tuple[PredictionChunk, ...]:
        """The next chunks for one status (poll thread), oldest first."""
        out: list[PredictionChunk] = []
        with self._cond:
            taken = 0
            while self._chunks and (not out or
                                    taken + len(self._chunks[0].payload) <= self.per_poll_bytes):
                chunk = self._chunks.popleft()
                taken += len(chunk.payload)
                out.append(chunk)
            self._bytes -= taken
            self._cond.notify_all()
        return tuple(out)

    def pending(self) -> bool:
        """Chunks are waiting for a poll."""
        with self._cond:
            return bool(self._chunks)

    def drain(self) -> None:
        """Wait until polls took every chunk (loop thread, before the stage reports DONE:
        the driver must have every chunk when it sees the rank finished)."""
        with self._cond:
            while self._chunks:
                self._wait()


# --- the loop --------------------------------------------------------------------------------
class PredictLoop:
    """``trainer.predict_loop``: runs ``predict_step`` over every predict loader of a rank.

    Attributes:
        return_predictions: keep (in process) or stream (``outbox``) the batch outputs.
        current_batch_indices: dataset indices of the batch in progress (for the writers).
        epoch_batch_indices: per dataloader, per batch, the dataset indices (kept only when a
            writer writes at epoch end, as in 2.x).
        totals: per dataloader, the batches of the user's loader over all ranks (None when
            the loader was not sharded by ray_lit); what rank 0 tells the driver.
    """

    def __init__(self, ctx: LoopContext, return_predictions: bool = True,
                 outbox: ChunkOutbox | None = None) -> None:
        self.ctx = ctx
        self.trainer = ctx.trainer  # the facade: Lightning's names, what hooks receive
        self.return_predictions = return_predictions
        self.outbox = outbox
        self.current_batch_indices: list[int] = []
        self.epoch_batch_indices: list[list[list[int]]] = []
        self._predictions: list[list[Any]] = []
        self.totals: list[int | None] = []

    @property
    def num_dataloaders(self) -> int:
        return len(self._predictions)

    @property
    def predictions(self) -> list[Any]:
        """This rank's kept outputs: a list per dataloader, one flat list for one (2.x)."""
        if not self._predictions:
            return []
        return self._predictions[0] if len(self._predictions) == 1 else self._predictions

    def _writers(self) -> tuple[bool, bool]:
        from ray_lit.callbacks.prediction_writer import BasePredictionWriter

        writers = [cb for cb in self.trainer.callbacks if isinstance(cb, BasePredictionWriter)]
        return (any(w.interval.on_batch for w in writers),
                any(w.interval.on_epoch for w in writers))

    def run(self, loaders: list[Any], recorders: list[PredictBatches | None]) -> None:
        """Predict every loader in order (``recorders``: each loader's ``PredictBatches``)."""
        ctx = self.ctx
        trainer, module = self.trainer, self.trainer.lightning_module
        hooks = ctx.hooks
        on_batch, on_epoch = self._writers()
        self._predictions = [[] for _ in loaders]
        self.epoch_batch_indices = [[] for _ in loaders]
        limit = trainer.config.limit_predict_batches
        counts = [limit_batches(loader_length(dl), limit, "limit_predict_batches")
                  for dl in loaders]
        # with a limit each rank stops early: the driver cannot know the whole count, so it
        # orders what arrived without checking for missing batches
        limited = not (isinstance(limit, float) and limit == 1.0)
        self.totals = [r.total if r is not None and not limited else None for r in recorders]
        # outputs stay on the rank only where something there reads them: in process to
        # return them, for an epoch-end writer (2.x keeps them for it too)
        keep = (self.return_predictions and self.outbox is None) or on_epoch
        stream = self.return_predictions and self.outbox is not None
        multi = len(loaders) > 1
        if multi and "dataloader_idx" not in _signature_of(module.predict_step)[0] and not \
                _signature_of(module.predict_step)[1]:
            raise MisconfigurationException(
                f"trainer.predict() got {len(loaders)} dataloaders, but "
                f"{type(module).__name__}.predict_step has no `dataloader_idx` argument. Add "
                "it: predict_step(self, batch, batch_idx, dataloader_idx=0).")
        names, var_pos, _ = _signature_of(module.predict_step)
        pass_batch_idx = var_pos or "batch_idx" in names or len(names) >= 2
        # 2.x restores each submodule's own training flag afterwards (frozen BN stays frozen)
        modes = {name: m.training for name, m in module.named_modules()}
        module.zero_grad()
        module.eval()
        hooks.both("on_predict_start")
        hooks.both("on_predict_epoch_start")
        total = sum(counts)
        ctx.sink.progress_start("predict", None if total == math.inf else int(total),
                                     trainer.current_epoch, trainer.config.max_epochs)
        done = 0
        with torch.inference_mode():
            for dl_idx, (loader, recorder) in enumerate(zip(loaders, recorders)):
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= counts[dl_idx]:
                        break
                    position, indices = (recorder.seen[batch_idx] if recorder is not None
                                         else (None, []))
                    if on_batch:
                        self.current_batch_indices = indices
                    if on_epoch:
                        self.epoch_batch_indices[dl_idx].append(indices)
                    batch = ctx.transfer_batch(batch, dl_idx)
                    hooks.batch_start("on_predict_batch_start", batch, batch_idx, dl_idx)
                    args: tuple[Any, ...] = (batch, batch_idx) if pass_batch_idx else (batch,)
                    if multi:
                        args = (*args, dl_idx)
                    with ctx.precision.autocast():
                        out = ctx.call_step("predict_step", *args)
                    hooks.batch_end("on_predict_batch_end", out, batch, batch_idx, dl_idx)
                    if keep or stream:
                        cpu = move_to_device(out, torch.device("cpu"))
                        if keep:
                            self._predictions[dl_idx].append(cpu)
                        if stream:
                            self.outbox.put(PredictionChunk(
                                rank=trainer.global_rank, dataloader_idx=dl_idx,
                                batch_idx=batch_idx, indices=tuple(indices),
                                payload=cloudpickle.dumps(cpu), position=position))
                    done += 1
                    if ctx.sink.wants_progress(done):
                        ctx.sink.progress_update("predict", done, {})
        hooks.both("on_predict_epoch_end")
        if not self.return_predictions:
            self._predictions = []  # 2.x: nothing kept after the epoch-end writers ran
        self.epoch_batch_indices = []
        hooks.both("on_predict_end")
        for name, m in module.named_modules():
            m.train(modes.get(name, True))
        ctx.sink.progress_update("predict", done, {})
        ctx.sink.progress_end("predict")


def run_predict(ctx: LoopContext, module: LightningModule, loaders: Any, datamodule: Any,
                weights: dict | None, return_predictions: bool = True,
                outbox: ChunkOutbox | None = None) -> PredictLoop:
    """``trainer.predict`` in this process (in process, or one rank of a worker group).

    Args:
        loaders: the loaders passed to ``predict`` (None: the datamodule's, then the module's
            ``predict_dataloader()``).
        weights: a checkpoint dict whose ``state_dict`` is loaded first, or None.
        return_predictions: keep (in process) or stream (``outbox``) the outputs.
        outbox: on a Ray worker, where the batch outputs go to reach the driver.

    Returns:
        The loop: ``predictions`` (what ``trainer.predict`` returns in process) and ``totals``.
    """
    trainer = ctx.trainer
    from ray_lit.loop.optimization import Precision
    from ray_lit.loop.stages import _guarded, attach, prepare_and_setup, wrap_with_weights

    attach(ctx, module, datamodule)
    ctx.start_run("predict")
    trainer.predicting = True
    loop = PredictLoop(ctx, return_predictions, outbox)
    trainer.predict_loop = loop
    with _guarded(ctx, "predict"):
        prepare_and_setup(ctx, "predict")
        wrap_with_weights(ctx, module, weights)
        ctx.precision = Precision(trainer.config.precision, ctx.host.device)
        found = resolve_loaders(loaders, trainer.datamodule, module, "predict_dataloader")
        if not found:
            raise MisconfigurationException(
                "trainer.predict() found no dataloader: pass dataloaders=, or implement "
                "predict_dataloader() on the module or its datamodule.")
        host = ctx.host
        seed = getattr(host, "seed", 0)
        prepared = []
        for dl in found:
            if hasattr(dl, "shard_for_rank"):  # a RayDataLoader: the host deals it
                shard = host.prepare_loader(dl, train=False, whole=True)
                prepared.append((shard, shard))  # the shard records its batches' positions
            else:
                prepared.append(prepare_predict_loader(dl, world_rank=host.world_rank,
                                                       world_size=host.world_size, seed=seed))
        trainer.predict_dataloaders = [dl for dl, _ in prepared]
        trainer.num_predict_batches = [
            limit_batches(loader_length(dl), trainer.config.limit_predict_batches,
                          "limit_predict_batches") for dl, _ in prepared]
        ctx.sink.run_start("predict")
        loop.run([dl for dl, _ in prepared], [rec for _, rec in prepared])
        ctx.sink.finalize("success")
    return loop
