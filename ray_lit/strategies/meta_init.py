"""Meta-device initialisation for ``FSDPStrategy``: tensors ``configure_model`` created under
``torch.device("meta")`` get their values after sharding, one module at a time, so that no
rank ever holds the whole model.

The order, on every rank (``FSDPStrategy.setup_module``): ``meta_owners`` lists the modules
that own meta tensors (and refuses one without ``reset_parameters``); the model is sharded
while still meta; ``empty_shards`` allocates each rank's shards (``to_empty``: 1/N of each
sharded parameter); ``materialize_meta`` runs each owner's ``reset_parameters()`` on temporary
full tensors of that module only and keeps rank 0's values, cut to the rank's shard.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_lit.errors import MisconfigurationException

__all__ = ["empty_shards", "materialize_meta", "meta_owners"]


def _is_meta(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).is_meta


def meta_owners(module: nn.Module) -> list[nn.Module]:
    """The submodules of ``module`` (itself included) that directly own a parameter or buffer
    on the meta device, in ``modules()`` order (the order their constructors ran, for models
    built as a tree). Each must have ``reset_parameters``: it is how they are materialised.

    Raises:
        MisconfigurationException: an owner has no ``reset_parameters`` (its tensors could
            only be left uninitialised).
    """
    owners = [m for m in module.modules()
              if any(_is_meta(t) for t in (*m.parameters(recurse=False),
                                           *m.buffers(recurse=False)))]
    missing = [type(m).__name__ for m in owners
               if not callable(getattr(m, "reset_parameters", None))]
    if missing:
        raise MisconfigurationException(
            f"FSDPStrategy got tensors on the meta device in modules without "
            f"reset_parameters() ({sorted(set(missing))}): after sharding, ray_lit "
            "materialises meta tensors by calling each owning module's reset_parameters(). "
            "Give those modules a reset_parameters() that initialises their own parameters "
            "and buffers, or build them on the CPU in configure_model.")
    return owners


def empty_shards(root: nn.Module, device: torch.device) -> None:
    """Every rank, after sharding: ``to_empty`` allocates this rank's shards (1/N of each
    sharded parameter) in place of the meta ones; the tensors that already had values keep
    them (``to_empty`` would otherwise leave them uninitialised too)."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    named = [*root.named_parameters(), *root.named_buffers()]
    kept = {name: local(t).detach().clone() for name, t in named if not _is_meta(t)}
    root.to_empty(device=device)
    with torch.no_grad():
        for name, t in [*root.named_parameters(), *root.named_buffers()]:
            if name in kept:
                local(t).copy_(kept[name])


def materialize_meta(owners: list[nn.Module], device: torch.device, distributed: bool) -> None:
    """Give the meta tensors of ``owners`` (``meta_owners``) their values, one module at a
    time, by that module's ``reset_parameters()``.

    Every rank calls it (COLLECTIVE when ``distributed``: one broadcast per tensor). For each
    owner in turn, its sharded parameters are swapped for temporary full tensors (the only
    full tensors ever built: one module's), ``reset_parameters()`` runs on every rank (so each
    rank's RNG advances as an eager construction would have advanced it), rank 0's values are
    broadcast (as ``_broadcast_initial_state`` does for an eager model) and each rank keeps
    its own shard. The values are therefore those of the same model built eagerly on rank 0,
    when its constructors draw only in ``reset_parameters`` and in ``modules()`` order.
    ``distributed=False`` (a world of one): the meta tensors are replaced by the full ones.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    for owner in owners:
        swapped: dict[str, nn.Parameter] = {}
        for name, param in list(owner.named_parameters(recurse=False)):
            if isinstance(param, DTensor) or param.is_meta:
                full = torch.empty(param.shape, dtype=param.dtype, device=device)
                swapped[name] = param
                owner._parameters[name] = nn.Parameter(full, requires_grad=param.requires_grad)
        for name, buf in list(owner.named_buffers(recurse=False)):
            if buf.is_meta:
                owner._buffers[name] = torch.empty_like(buf, device=device)
        with torch.no_grad():
            owner.reset_parameters()  # type: ignore[operator]
            if not distributed:
                continue
            for buf in owner.buffers(recurse=False):
                dist.broadcast(buf, src=0)
            for name, sharded in swapped.items():
                full = owner._parameters[name].data
                dist.broadcast(full, src=0)
                if isinstance(sharded, DTensor):
                    mine = distribute_tensor(full, sharded.device_mesh, sharded.placements,
                                             src_data_rank=None)
                    sharded.to_local().copy_(mine.to_local())
                else:
                    sharded.data = full
                owner._parameters[name] = sharded
