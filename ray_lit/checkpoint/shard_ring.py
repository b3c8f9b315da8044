"""The shard ring: FSDP peer snapshots, each rank's shards kept by its neighbour.

Under ``FSDPStrategy`` over several ranks no rank holds the whole model, so the DDP scheme of
``checkpoint.peer`` (every rank keeps the replicated tensors) has nothing to keep. Instead, at
each snapshot every rank

1. copies its own shards to host memory (the local part of each parameter's and optimizer
   state's DTensor, with its global shape and offset: a ``piece``), serialised at the step
   boundary (synchronously: the copy is one shard, 1/N of the state);
2. sends them to rank ``(r + 1) % N`` and receives rank ``(r - 1) % N``'s (``exchange``:
   point-to-point over the group's backend, COLLECTIVE: every rank calls it at the same step);
3. keeps both in its ``PeerSnapshot``.

After a single lost rank ``r`` its shards are still held by rank ``r + 1``. Each survivor
tells the driver which ranks' shards it holds (``PeerSnapshot.held_ranks``, on ``LeftBehind``);
the driver picks survivors that together hold every rank's shards (``decide_restore``; at two
workers the one survivor) and passes their exports on (``FromPeers`` with a list of refs). Every
rank of the next attempt puts the pieces back together (``assemble``) and loads the full tensors
as a full-state checkpoint (each takes its own shard of them, no communication), which is exact:
the same values, cut the same way (``torch.equal`` with an uninterrupted run).

Where memory cannot restore exactly, the committed (sharded) checkpoint in storage is used, and
the driver prints why: every rank lost (no survivor), two ring-adjacent ranks lost (``r`` and
``r + 1``: nobody holds ``r``'s shards any more), or no snapshot newer than the latest commit.
A world size changed on restart (elastic) restores the assembled full state resharded, as a
storage restore reshards: equal values, but not bit-identical to a run at the old size.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LocalShards", "assemble", "covers_all", "exchange", "is_sharded", "neighbour",
           "source"]

PIECE = "__shard_piece__"  # marks a piece (a dict, so weights-only loading reads it)


def neighbour(rank: int, world_size: int) -> int:
    """The rank that keeps ``rank``'s shards in its memory."""
    return (rank + 1) % world_size


def source(rank: int, world_size: int) -> int:
    """The rank whose shards ``rank`` keeps."""
    return (rank - 1) % world_size


def covers_all(held: set[int] | list[int], world_size: int) -> bool:
    """Whether shards of the ranks ``held`` make up the full state of a world of
    ``world_size``."""
    return set(range(world_size)) <= set(held)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are DTensor shards (FSDP over several ranks)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _piece(tensor: Any) -> Any:
    """A DTensor's local shard copied to the host, with where it sits in the full tensor;
    any other tensor copied to the host; anything else as is."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(tensor, DTensor):
        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                          tensor.placements)
        # a fresh host tensor: the local shard may be a view into FSDP's padded buffer
        return {PIECE: True, "local": tensor.to_local().detach().to("cpu", copy=True),
                "shape": list(tensor.shape), "offset": list(offset)}
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().to("cpu", copy=True)
    return tensor


class LocalShards:
    """A rank's own shards of the module and optimizers, copied when ``capture`` is called
    (``split_rank_state`` hands this to ``PeerSnapshot.take``, which calls it at the step
    boundary on the loop thread)."""

    def __init__(self, module: torch.nn.Module, optimizers: list[Any]) -> None:
        self.module = module
        self.optimizers = optimizers

    def capture(self) -> dict[str, Any]:
        """The shards as a host state: ``params`` (by ``state_dict`` key), ``optimizer_states``
        (``optimizer.state_dict()`` with each DTensor a piece), ``rank``, ``world_size``."""
        import torch.distributed as dist

        params = {name: _piece(p) for name, p in
                  self.module.named_parameters(remove_duplicate=False)}
        optimizer_states = []
        for optimizer in self.optimizers:
            state = optimizer.state_dict()
            optimizer_states.append({
                "state": {idx: {k: _piece(v) for k, v in entry.items()}
                          for idx, entry in state["state"].items()},
                "param_groups": state["param_groups"]})
        return {"params": params, "optimizer_states": optimizer_states,
                "rank": dist.get_rank(), "world_size": dist.get_world_size()}


def exchange(blob: bytes, rank: int, world_size: int) -> bytes:
    """COLLECTIVE (every rank, same step): send ``blob`` (this rank's shards) to
    ``neighbour(rank)`` and return what ``source(rank)`` sent. Two point-to-point rounds over
    the default group: the sizes, then the bytes."""
    import torch.distributed as dist

    device = torch.device("cpu")
    if dist.get_backend() == "nccl":  # NCCL moves device tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    to, frm = neighbour(rank, world_size), source(rank, world_size)
    size_out = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    size_in = torch.zeros(1, dtype=torch.int64, device=device)
    _swap(size_out, size_in, to, frm)
    data_out = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    data_in = torch.empty(int(size_in.item()), dtype=torch.uint8, device=device)
    _swap(data_out, data_in, to, frm)
    return data_in.cpu().numpy().tobytes()


def _swap(out: torch.Tensor, into: torch.Tensor, to: int, frm: int) -> None:
    import torch.distributed as dist

    ops = [dist.P2POp(dist.isend, out, to), dist.P2POp(dist.irecv, into, frm)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


def _full(pieces: dict[int, Any]) -> Any:
    """One tensor put back together from every rank's piece (or, for a tensor every rank
    holds whole, such as Adam's ``step``, rank 0's)."""
    first = pieces[min(pieces)]
    if not (isinstance(first, dict) and first.get(PIECE)):
        return first
    full = torch.empty(first["shape"], dtype=first["local"].dtype)
    for piece in pieces.values():
        local = piece["local"]
        index = tuple(slice(o, o + n) for o, n in zip(piece["offset"], local.shape))
        full[index] = local
    return full


def assemble(shards: dict[int, dict[str, Any]]) -> tuple[dict[str, torch.Tensor],
                                                         list[dict[str, Any]]]:
    """The full parameters (by ``state_dict`` key) and full optimizer states (as a plain run
    saves them) from every rank's ``LocalShards.capture()``. Pure; every rank of the next
    attempt calls it with the same shards.

    Raises:
        ValueError: a rank's shards are missing.
    """
    world_size = shards[min(shards)]["world_size"]
    if not covers_all(shards, world_size):
        missing = sorted(set(range(world_size)) - set(shards))
        raise ValueError(f"the shards of rank(s) {missing} of {world_size} are missing")
    ranks = sorted(shards)
    first = shards[ranks[0]]
    params = {name: _full({r: shards[r]["params"][name] for r in ranks})
              for name in first["params"]}
    optimizer_states = []
    for i, opt in enumerate(first["optimizer_states"]):
        state = {idx: {k: _full({r: shards[r]["optimizer_states"][i]["state"][idx][k]
                                 for r in ranks}) for k in entry}
                 for idx, entry in opt["state"].items()}
        optimizer_states.append({"state": state, "param_groups": opt["param_groups"]})
    return params, optimizer_states
