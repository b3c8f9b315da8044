"""The process that hosts the loop: its ranks, its device, and its collectives.

The loop calls the host wherever ranks must cooperate (model wrapping, gradient sync, stop
decisions, sampler epochs, fault-tolerance checkpoints). ``LocalHost`` is the in-process host of
``num_workers=0``: world size 1, every collective a no-op. The Ray worker's host
(``ray_lit.worker.host.WorkerHost``) implements the same methods with
torch.distributed.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch


class LocalHost:
    """One process, no process group."""

    world_rank = 0
    world_size = 1
    local_rank = 0
    node_rank = 0

    def __init__(self, use_gpu: bool = False) -> None:
        if use_gpu and torch.cuda.is_available():
            self.device = torch.device("cuda", 0)
        else:
            self.device = torch.device("cpu")
        self._wrapped: Any = None

    @property
    def is_global_zero(self) -> bool:
        return self.world_rank == 0

    # --- model ---------------------------------------------------------------------------------
    def setup_module(self, module: torch.nn.Module, find_unused_parameters: bool = False,
                     sync_batchnorm: bool = False) -> None:
        """Move the module to this host's device (and wrap it for DDP where there is one)."""
        module.to(self.device)
        self._module = module

    def call_step(self, name: str, *args: Any) -> Any:
        return getattr(self._module, name)(*args)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def teardown_module(self) -> None:
        self._module = None

    # --- data ----------------------------------------------------------------------------------
    def prepare_loader(self, loader: Any, train: bool) -> Any:
        return loader

    def set_epoch(self, epoch: int, batches_done: int) -> None:
        self._epoch = epoch

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

    # --- collectives ---------------------------------------------------------------------------
    def agree_on_rank_zero(self, flag: bool, needed: bool = True) -> bool:
        """COLLECTIVE in a group: rank 0's ``flag`` for every rank (here: the flag itself)."""
        return bool(flag)

    def barrier(self) -> None: ...

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack of every rank's tensor (differentiable in a group): here ``tensor[None]``."""
        return tensor.unsqueeze(0)

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    # --- fault tolerance (distributed only) ----------------------------------------------------
    def after_train_step(self, trainer: Any, is_last: bool) -> None: ...

    def after_epoch(self, trainer: Any) -> None: ...
