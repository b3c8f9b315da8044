"""The process that hosts the loop: its ranks, its device, its data and its strategy.

The host owns what depends on where the loop runs: the ranks, the device, how dataloaders are
sharded and resumed, and the fault-tolerance checkpoints. How the ranks train one model
together (wrapping, gradient sync, collectives, checkpoint state) is its ``strategy``
(``ray_lit.strategies``), which the loop reaches as ``trainer.strategy``. ``LocalHost`` is the
in-process host of ``num_workers=0``: world size 1, a ``SingleDeviceStrategy``. The Ray worker's
host (``ray_lit.worker.host.WorkerHost``) implements the same methods for one rank of a group.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch

from ray_lit.strategies import resolve_strategy


class LocalHost:
    """One process, no process group."""

    world_rank = 0
    world_size = 1
    local_rank = 0
    node_rank = 0

    def __init__(self, use_gpu: bool = False, strategy: Any = None) -> None:
        if use_gpu and torch.cuda.is_available():
            self.device = torch.device("cuda", 0)
        else:
            self.device = torch.device("cpu")
        # the Trainer's ``strategy`` option (a name or an object); "auto": one device
        self.strategy = resolve_strategy(strategy, distributed=False)
        self.strategy.connect(global_rank=0, world_size=1, local_rank=0, node_rank=0,
                              device=self.device)

    @property
    def is_global_zero(self) -> bool:
        return self.world_rank == 0

    # --- data ----------------------------------------------------------------------------------
    def prepare_loader(self, loader: Any, train: bool, whole: bool = False) -> Any:
        """This rank's copy of ``loader`` (``whole``: a predict loader, every row)."""
        if hasattr(loader, "shard_for_rank"):  # a RayDataLoader: dealt in this process
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            return loader.shard_for_rank(None, 0, 1, seed, train, whole)
        return loader

    def set_epoch(self, epoch: int, batches_done: int) -> int:
        """Serve ``epoch``; the epoch continues from ``batches_done`` (a resume skips them)."""
        self._epoch = epoch
        return batches_done

    def iterate_train(self, loader: Any, skip: int) -> Iterator[tuple[int, Any]]:
        """Batches of the epoch with their index; a mid-epoch resume skips what was done."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self._epoch)
        iterator = enumerate(loader)
        if skip:
            iterator = itertools.islice(iterator, skip, None)
        return iterator

    def epoch_length(self, loader: Any, batches_done: int) -> float:
        """Batches in this epoch (the resume skips ``batches_done`` of them)."""
        from ray_lit.loop.data import loader_length

        return loader_length(loader)

    def sampler_state(self, batches_done: int) -> dict | None:
        """In process the loader is the user's own: a resume skips the batches done."""
        return None

    def load_sampler_state(self, state: dict) -> None: ...

    # --- fault tolerance (distributed only) ----------------------------------------------------
    def after_train_step(self, ctx: Any, is_last: bool) -> None: ...

    def after_epoch(self, ctx: Any) -> None: ...
