"""``WorkerHost``: the loop's host inside a Ray worker (one DDP rank).

Same methods as ``ray_lit.loop.host.LocalHost``, implemented with torch.distributed: the module
is wrapped in DDP, the training step goes through the wrapper so gradients are all-reduced, each
dataloader is rebuilt with a per-rank resumable sampler, and stop decisions are broadcast from
rank 0. Every method marked COLLECTIVE must be reached by every rank in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ray_lit.loop.sampler import loader_batch_size, sampler_of, shard_dataloader
from ray_lit.worker.ranks import WorkerRanks


class _StepModule(nn.Module):
    """What DDP wraps: ``forward(name, *args)`` runs ``module.<name>(*args)``, so
    ``training_step`` goes through DDP's forward and its gradients are synchronised."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, name: str, *args: Any) -> Any:
        return getattr(self.module, name)(*args)


class WorkerHost:
    """One rank of a worker group, with an initialised process group."""

    reraise_interrupt = True

    def __init__(self, ranks: WorkerRanks, device: torch.device, seed: int,
                 checkpointer: Any = None) -> None:
        self.ranks = ranks
        self.world_rank = ranks.world_rank
        self.world_size = ranks.world_size
        self.local_rank = ranks.local_rank
        self.node_rank = ranks.node_rank
        self.device = device
        self.seed = seed
        self.checkpointer = checkpointer
        self._module: nn.Module | None = None
        self._ddp: Any = None
        self._train_loader: Any = None
        self._epoch = 0
        self._pending_sampler_state: dict | None = None

    @property
    def is_global_zero(self) -> bool:
        return self.world_rank == 0

    # --- model ---------------------------------------------------------------------------------
    def setup_module(self, module: nn.Module, find_unused_parameters: bool = False,
                     sync_batchnorm: bool = False) -> None:
        if sync_batchnorm:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module.to(self.device)
        self._module = module
        if self.world_size > 1 and any(p.requires_grad for p in module.parameters()):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP broadcasts rank 0's parameters and buffers here: all replicas start identical
            self._ddp = nn.parallel.DistributedDataParallel(
                _StepModule(module), device_ids=device_ids,
                find_unused_parameters=find_unused_parameters)

    def call_step(self, name: str, *args: Any) -> Any:
        if name == "training_step" and self._ddp is not None and torch.is_grad_enabled():
            return self._ddp(name, *args)
        return getattr(self._module, name)(*args)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    def teardown_module(self) -> None:
        self._ddp = None

    # --- data ----------------------------------------------------------------------------------
    def prepare_loader(self, loader: Any, train: bool) -> Any:
        sharded = shard_dataloader(loader, world_rank=self.world_rank,
                                   world_size=self.world_size, train=train, seed=self.seed)
        if train:
            self._train_loader = sharded
            if self._pending_sampler_state is not None:
                self.load_sampler_state(self._pending_sampler_state)
        return sharded

    def set_epoch(self, epoch: int, batches_done: int) -> None:
        self._epoch = epoch
        sampler = sampler_of(self._train_loader) if self._train_loader is not None else None
        if sampler is not None:
            # the same epoch keeps a restored mid-epoch position; a new epoch starts over
            sampler.set_epoch(epoch)
        elif self._train_loader is not None:
            for inner in (getattr(self._train_loader, "sampler", None),
                          getattr(self._train_loader, "batch_sampler", None)):
                if hasattr(inner, "set_epoch"):
                    inner.set_epoch(epoch)

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

    # --- collectives ---------------------------------------------------------------------------
    def agree_on_rank_zero(self, flag: bool, needed: bool = True) -> bool:
        """COLLECTIVE (when ``needed``): rank 0's ``flag`` for every rank."""
        if not needed or self.world_size == 1:
            return bool(flag)
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """COLLECTIVE: every rank's tensor stacked on a new dim 0 (differentiable)."""
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        from torch.distributed.nn.functional import all_gather

        return torch.stack(all_gather(tensor.contiguous()))

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # --- fault tolerance ---------------------------------------------------------------------
    def after_train_step(self, trainer: Any, is_last: bool) -> None:
        if self.checkpointer is not None:
            self.checkpointer.after_train_step(trainer, is_last)

    def after_epoch(self, trainer: Any) -> None:
        if self.checkpointer is not None:
            self.checkpointer.after_epoch(trainer)
