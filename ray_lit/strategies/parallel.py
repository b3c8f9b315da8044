"""``ParallelStrategy``: the collectives of every strategy with a torch.distributed group.

Each Ray worker joins the process group before its loop starts (``worker/process_group.py``);
a parallel strategy uses that default group. A world of one short-cuts every collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ray_lit.strategies.base import Strategy


class ParallelStrategy(Strategy):
    """Collectives over the default process group; subclasses decide how the model is
    wrapped and how its state is collected."""

    strategy_name = "parallel"

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _comm_device(self) -> torch.device:
        """NCCL communicates device tensors; gloo host tensors."""
        return self.root_device if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self, name: str | None = None) -> None:
        if self._distributed:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self._distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def all_gather(self, tensor: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
        if not self._distributed:
            return tensor.unsqueeze(0)
        # torch.distributed.nn's all_gather is differentiable; the plain one is not needed
        from torch.distributed.nn.functional import all_gather

        return torch.stack(all_gather(tensor.contiguous()))

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        if reduce_op not in ("mean", "sum"):
            raise ValueError(f"reduce_op={reduce_op!r}: use 'mean' or 'sum'")
        if not self._distributed:
            return tensor
        out = tensor.detach().clone().to(self._comm_device())
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        if reduce_op == "mean":
            out = out / self.world_size
        return out.to(tensor.device)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if not self._distributed:
            return bool(decision)
        votes = torch.tensor([1 if decision else 0], dtype=torch.int32,
                             device=self._comm_device())
        dist.all_reduce(votes, op=dist.ReduceOp.SUM)
        count = int(votes.item())
        return count == self.world_size if all else count > 0

    def agree_on_rank_zero(self, flag: bool, needed: bool = True) -> bool:
        if not needed or not self._distributed:
            return bool(flag)
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())
