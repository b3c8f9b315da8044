"""``Strategy``: the seam between the loop and how ranks train one model together.

A strategy decides four things, and only these (the anchor: Lightning Fabric's ``Strategy``):

1. **The model**: how the module is placed and wrapped (``setup_module``), how a training step
   runs through the wrapper so gradients are synchronised (``call_step``, and ``pre_backward``
   for a backward run inside the step: manual optimisation), and how gradient sync is skipped
   inside an accumulation window (``no_sync``).
2. **Agreement between ranks**: ``barrier``, ``broadcast``, ``all_gather``, ``reduce``,
   ``reduce_boolean_decision`` and ray_lit's ``agree_on_rank_zero`` (rank 0's decision for
   every rank). Each of these is a COLLECTIVE: every rank calls it, in the same order.
3. **State for checkpoints**: what of the module and each optimizer is collected
   (``lightning_module_state_dict``, ``optimizer_state``) and how it is put back
   (``load_model_state_dict``, ``load_optimizer_state_dict``). For DDP every rank holds the
   same full state; a sharded strategy gathers or saves shards here.
4. **Where the ranks are**: ``global_rank``, ``world_size``, ``root_device``, set by the host
   that runs the loop (``connect``): the in-process host or a Ray worker's host.

Everything else (data sharding, fault-tolerance checkpoints, metric streaming) is the host's
and the loop's. Two implementations ship now: ``SingleDeviceStrategy`` (``num_workers=0``, or
one process) and ``DDPStrategy`` (one replica per Ray worker); a new strategy plugs in here
without touching the loop or the controller.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class Strategy:
    """Base class of every strategy; the methods below are the whole protocol.

    Subclasses override what differs; the defaults here are those of one process (a world of
    one, so every collective returns its input).
    """

    strategy_name = "base"
    # True for a strategy whose ranks each hold only part of the module and optimizer state
    # (FSDP): ``lightning_module_state_dict`` and ``optimizer_state`` are then COLLECTIVE, so
    # every rank calls them at the same point even where only rank 0 writes, and in-memory
    # peer snapshots hold shards (``checkpoint.shard_ring``; a strategy other than FSDP that
    # shards is refused them). False: every rank holds the full state (one device, DDP).
    shards_state = False

    def __init__(self) -> None:
        self.global_rank = 0
        self.local_rank = 0
        self.node_rank = 0
        self.world_size = 1
        self.root_device = torch.device("cpu")
        self.module: nn.Module | None = None

    # --- where the ranks are (called by the host, once per run) --------------------------------
    def connect(self, *, global_rank: int, world_size: int, local_rank: int, node_rank: int,
                device: torch.device) -> None:
        """Tell the strategy which rank of how many it runs as, and on which device."""
        self.global_rank, self.world_size = global_rank, world_size
        self.local_rank, self.node_rank = local_rank, node_rank
        self.root_device = device

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    # --- the model (every rank) ----------------------------------------------------------------
    def setup_module(self, module: nn.Module, find_unused_parameters: bool = False,
                     sync_batchnorm: bool = False) -> None:
        """Move ``module`` to ``root_device`` and wrap it as the strategy needs. COLLECTIVE
        for parallel strategies (DDP broadcasts rank 0's parameters here)."""
        module.to(self.root_device)
        self.module = module

    def call_step(self, name: str, *args: Any) -> Any:
        """Run ``module.<name>(*args)``; a training step goes through the wrapper."""
        return getattr(self.module, name)(*args)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """A context in which backward does not synchronise gradients (accumulation)."""
        return contextlib.nullcontext()

    def pre_backward(self, loss: torch.Tensor) -> None:
        """Every rank, right before a backward the loop or ``manual_backward`` runs itself:
        prepare gradient sync for it (DDP's reducer); nothing to do in one process."""

    def teardown_module(self) -> None:
        """Drop the wrapper (the module itself stays the user's)."""
        self.module = None

    # --- agreement between ranks (COLLECTIVE: every rank, same order) --------------------------
    def barrier(self, name: str | None = None) -> None:
        """Wait until every rank reached this point."""

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
        return obj

    def all_gather(self, tensor: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
        """Every rank's ``tensor`` stacked on a new dim 0 (differentiable with ``sync_grads``
        where the strategy can)."""
        return tensor.unsqueeze(0)

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        """``tensor`` reduced over the ranks (``"mean"`` or ``"sum"``)."""
        return tensor

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """True when every rank (``all``) or any rank decided True."""
        return bool(decision)

    def agree_on_rank_zero(self, flag: bool, needed: bool = True) -> bool:
        """Rank 0's ``flag`` on every rank (a stop decision taken once). COLLECTIVE when
        ``needed`` (every rank passes the same ``needed``)."""
        return bool(flag)

    # --- state for checkpoints (every rank calls; what each returns is the strategy's) ---------
    def lightning_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """The module's state for a checkpoint (the full state on rank 0 for DDP)."""
        return module.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer``'s state for a checkpoint."""
        return optimizer.state_dict()

    def load_model_state_dict(self, module: nn.Module, state_dict: dict[str, Any],
                              strict: bool = True) -> Any:
        """Put a checkpoint's module state back (before or after ``setup_module``)."""
        return module.load_state_dict(state_dict, strict=strict)

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer,
                                  state_dict: dict[str, Any]) -> None:
        """Put a checkpoint's optimizer state back."""
        optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank {self.global_rank} of {self.world_size}, " \
               f"{self.root_device})"
