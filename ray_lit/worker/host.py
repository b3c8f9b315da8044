"""``WorkerHost``: the loop's host inside a Ray worker (one rank of the group).

Same methods as ``ray_lit.loop.host.LocalHost``, for one rank of an initialised process group:
each dataloader is rebuilt with a per-rank resumable sampler, and the fault-tolerance
checkpoints go through the worker's ``CheckpointWriter``. How the module is wrapped and how the
ranks agree is the ``strategy``'s (``DDPStrategy`` unless the Trainer names another).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ray_lit.data.loader import RayDataLoader, release_dealers
from ray_lit.loop.sampler import loader_batch_size, sampler_of, shard_dataloader
from ray_lit.strategies import DDPStrategy, Strategy
from ray_lit.worker.ranks import WorkerRanks


class WorkerHost:
    """One rank of a worker group, with an initialised process group."""

    reraise_interrupt = True

    def __init__(self, ranks: WorkerRanks, device: torch.device, seed: int,
                 checkpointer: Any = None, strategy: Strategy | None = None,
                 data_key: str = "") -> None:
        self.ranks = ranks
        self.world_rank = ranks.world_rank
        self.world_size = ranks.world_size
        self.local_rank = ranks.local_rank
        self.node_rank = ranks.node_rank
        self.device = device
        self.seed = seed
        self.checkpointer = checkpointer
        self.strategy = strategy if strategy is not None else DDPStrategy()
        self.strategy.connect(global_rank=ranks.world_rank, world_size=ranks.world_size,
                              local_rank=ranks.local_rank, node_rank=ranks.node_rank,
                              device=device)
        self._train_loader: Any = None
        self._epoch = 0
        self._pending_sampler_state: dict | None = None
        # names this job's Ray Data dealers: the attempt's fence plus the loader's order
        self._data_key = data_key or "job"
        self._data_loaders = 0
        release_dealers()  # the previous job's, on a kept worker group

    @property
    def is_global_zero(self) -> bool:
        return self.world_rank == 0

    # --- data ----------------------------------------------------------------------------------
    def prepare_loader(self, loader: Any, train: bool, whole: bool = False) -> Any:
        """This rank's copy of ``loader`` (``whole``: a predict loader, every row)."""
        if isinstance(loader, RayDataLoader):
            # every rank prepares its loaders in the same order: the count names the dealer
            self._data_loaders += 1
            key = f"ray_lit_data:{self._data_key}:{self._data_loaders}"
            sharded: Any = loader.shard_for_rank(key, self.world_rank, self.world_size, self.seed,
                                                 train, whole)
        else:
            sharded = shard_dataloader(loader, world_rank=self.world_rank,
                                       world_size=self.world_size, train=train, seed=self.seed)
        if train:
            self._train_loader = sharded
            if self._pending_sampler_state is not None:
                self.load_sampler_state(self._pending_sampler_state)
        return sharded

    def set_epoch(self, epoch: int, batches_done: int) -> int:
        """Serve ``epoch``; returns the batch the epoch continues from (``batches_done``, or
        0 where the loader cannot resume mid-epoch and starts the epoch again)."""
        self._epoch = epoch
        sampler = sampler_of(self._train_loader) if self._train_loader is not None else None
        if sampler is not None:
            # the same epoch keeps a restored mid-epoch position; a new epoch starts over
            sampler.set_epoch(epoch)
            if getattr(sampler, "restarted_epoch", False):
                sampler.restarted_epoch = False
                return 0
        elif self._train_loader is not None:
            for inner in (getattr(self._train_loader, "sampler", None),
                          getattr(self._train_loader, "batch_sampler", None)):
                if hasattr(inner, "set_epoch"):
                    inner.set_epoch(epoch)
        return batches_done

    def iterate_train(self, loader: Any, skip: int) -> Iterator[tuple[int, Any]]:
        # Creating a DataLoader iterator draws a seed for its worker processes from the global
        # torch RNG. Draw it from a generator seeded by (seed, epoch, rank) instead, so a run
        # resumed mid-epoch consumes the global RNG exactly as the uninterrupted run did.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self._epoch * 1009 + self.world_rank)
                              % (2**63 - 1))
            batches = iter(loader)
        # the resumable sampler already starts after the consumed batches: number from ``skip``
        if sampler_of(loader) is not None:
            return enumerate(batches, start=skip)
        iterator = enumerate(batches)
        for _ in range(skip):
            next(iterator, None)
        return iterator

    def _train_batch_size(self) -> int:
        return loader_batch_size(self._train_loader)

    def epoch_length(self, loader: Any, batches_done: int) -> float:
        """Batches in this epoch: after a resume the sampler serves only the remainder, which
        may be sharded over another world size than the batches already done."""
        from ray_lit.loop.data import loader_length

        if sampler_of(loader) is not None:
            return batches_done + loader_length(loader)
        return loader_length(loader)

    def sampler_state(self, batches_done: int) -> dict | None:
        """The train sampler's position after ``batches_done`` batches of this epoch."""
        sampler = sampler_of(self._train_loader) if self._train_loader is not None else None
        if sampler is None:
            return None
        return sampler.state_dict(batches_done, self._train_batch_size())

    def load_sampler_state(self, state: dict) -> None:
        sampler = sampler_of(self._train_loader) if self._train_loader is not None else None
        if sampler is None:
            self._pending_sampler_state = state  # the loader is built after the restore
            return
        sampler.load_state_dict(state)
        self._pending_sampler_state = None

    # --- fault tolerance ---------------------------------------------------------------------
    def after_train_step(self, ctx: Any, is_last: bool) -> None:
        """After each training batch (every rank): the checkpoint writer takes the stage's
        ``LoopContext`` and decides whether a fault-tolerance checkpoint is due."""
        if self.checkpointer is not None:
            self.checkpointer.after_train_step(ctx, is_last)

    def after_epoch(self, ctx: Any) -> None:
        if self.checkpointer is not None:
            self.checkpointer.after_epoch(ctx)
