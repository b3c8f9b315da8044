"""``FSDPStrategy``: the module's parameters, gradients and optimizer state sharded over the
Ray workers with FSDP2 (``torch.distributed.fsdp.fully_shard``).

How the module is sharded (``setup_module``, every rank, COLLECTIVE):

1. Rank 0's parameters and buffers are broadcast first (as DDP does), so every rank shards the
   same initial model even when ``configure_model`` built layers from each worker's own RNG.
2. Units: ``auto_wrap_policy`` picks the submodules that become their own FSDP unit (one
   all-gather each, freed again after its forward when ``reshard_after_forward``). A set of
   module classes, or a callable ``(module) -> bool``. The default (``None``) is
   ``default_wrap_policy``: every child of an ``nn.ModuleList`` / ``nn.Sequential`` that has a
   sibling of the same class (repeated blocks), and any other submodule whose parameters not
   yet in a unit reach ``1 / max(4, world_size)`` of the model's (post-order, innermost
   first). Real models should name their block class; the default suits simple networks.
   When the user's ``configure_model`` already called ``fully_shard`` on submodules, no policy
   is applied: their units stand as they are.
3. The root: the module is put inside a small ``_FSDPRoot`` whose ``forward(name, *args)``
   runs ``module.<name>(*args)``, and that root is sharded last. Every step (training,
   validation, test, predict) runs through it (``call_step``): ``training_step`` is not the
   module's ``forward``, so FSDP's hooks on the LightningModule itself would never run; the
   root's hooks all-gather the parameters outside any unit before the step and register the
   backward hooks on its outputs. A ``fully_shard`` of the LightningModule itself in
   ``configure_model`` is refused for the same reason (shard its layers instead).

A world of one (``num_workers=0``, or one Ray worker) shards nothing: the module trains
unwrapped and its state is the plain ``state_dict`` (FSDP over one rank only adds copies).
``mixed_precision`` then has no effect; ``Trainer(precision="bf16")`` autocasts in every case.

Checkpoint state: ``lightning_module_state_dict`` and ``optimizer_state`` gather the module's
and each optimizer's state to full tensors on host memory on EVERY rank
(``DTensor.full_tensor``, COLLECTIVE: every rank calls them at the same point, in the same
order). The result is exactly the state a plain or DDP run saves (same keys, optimizer state by
parameter index), so a checkpoint of an FSDP run loads with ``load_from_checkpoint`` in a plain
process, resumes a DDP run, and resumes an FSDP run at another world size: loading takes each
rank's shard of the full tensors (``distribute_tensor(..., src_data_rank=None)``: local, no
communication). ``trainer.save_checkpoint`` and the driver's final weights always use this
full state; fault-tolerance checkpoints over several ranks are sharded (below).

``state_dict_type`` decides what ``ModelCheckpoint`` writes:

* ``"full"``: one ordinary file, gathered as above (rank 0 writes).
* ``"sharded"``: a ``torch.distributed.checkpoint`` directory under the same name
  (``ray_lit.checkpoint.sharded.save_sharded``): nothing is gathered, each rank writes its own
  shards (``sharded_state_dicts`` switches the two methods above to the local DTensors for the
  save), rank 0 the non-tensor rest (``storage.sharded_io``). ``Trainer.fit(ckpt_path=...)``
  / ``resume=`` under this strategy read such a directory lazily (``checkpoint.sharded.
  load_lazily``): each rank reads only the byte ranges of the chunks that overlap its own
  shards. Everything else that reads a checkpoint (``load_from_checkpoint``, ``validate`` /
  ``test`` / ``predict``, another strategy) reads it in one process, whole, so full and
  sharded checkpoints are interchangeable at load, at any world size; ``python -m ray_lit
  consolidate`` turns one into a file.

Manual optimisation (``automatic_optimization = False``): ``manual_backward`` and
``optimizer.step()`` run inside the training step, i.e. inside the root's forward, so the root
must hold no parameters: every submodule that directly owns parameters no unit holds becomes a
unit of its own (``manual_units``; a parameter on the LightningModule itself is refused). Each
unit gathers its parameters in its own forward and reduce-scatters its gradients in its own
backward, however many backwards a step runs; ``clip_gradients`` works on the DTensor
gradients (the norm is the global one).

Meta-device initialisation: tensors that ``configure_model`` created under
``torch.device("meta")`` are sharded while still meta, then ``to_empty`` allocates each rank's
shards and ``materialize_meta`` gives them values one module at a time through the module's
``reset_parameters()`` (rank 0's values, as for an eager model), so no rank ever holds more than
its shards plus one module's full tensors. A module with meta tensors and no
``reset_parameters`` is refused.

In-memory peer snapshots (``snapshot_every_n_steps``): each rank keeps a host copy of its own
shards and of its ring neighbour's (``checkpoint.shard_ring``); a single lost rank (or lost
ranks that are not ring neighbours) is restored exactly from the survivors' memory together.
Where memory cannot restore exactly (every rank lost, two adjacent ranks lost, no snapshot newer
than the latest commit) the latest committed sharded checkpoint is used.

Fault-tolerance checkpoints over several ranks are sharded (``checkpoint.writer``): at each
one every rank plans its DCP shards inside ``sharded_state_dicts`` (the plans are exchanged in
the background, ``storage.dcp_plan``), its own shards are copied to host memory (overlapped
with the next step) and written by its background thread; the restore reads each rank's own
chunks into its DTensors (``load_model_state_dict`` / ``load_optimizer_state_dict`` with
``checkpoint.shard_restore``'s lazy state), at any world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ray_lit.errors import MisconfigurationException
from ray_lit.strategies.meta_init import empty_shards, materialize_meta, meta_owners
from ray_lit.strategies.parallel import ParallelStrategy

WrapPolicy = set[type[nn.Module]] | Callable[[nn.Module], bool] | None

_PRECISIONS = ("bf16", "bf16-mixed", "16", "16-mixed", 16)
STATE_DICT_TYPES = ("full", "sharded")


class _FSDPRoot(nn.Module):
    """The FSDP root: ``forward(name, *args)`` runs ``module.<name>(*args)`` through FSDP's
    root hooks (see the module docstring)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, name: str, *args: Any) -> Any:
        return getattr(self.module, name)(*args)


def _numel(params: Iterator[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def default_wrap_policy(module: nn.Module, world_size: int) -> set[nn.Module]:
    """The submodules of ``module`` that become their own FSDP unit by default (the root is
    never among them): repeated blocks of a container, then size (see the module docstring)."""
    total = _numel(module.parameters())
    if total == 0:
        return set()
    chosen: set[nn.Module] = set()
    for container in module.modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            children = [c for c in container.children() if _numel(c.parameters())]
            for child in children:
                if sum(type(c) is type(child) for c in children) > 1:
                    chosen.add(child)
    threshold = total / max(4, world_size)
    covered: set[int] = set()  # ids of parameters already in a chosen unit

    def visit(sub: nn.Module) -> None:
        for child in sub.children():
            visit(child)
        if sub is module:
            return
        if sub in chosen:
            covered.update(id(p) for p in sub.parameters())
            return
        free = sum(p.numel() for p in sub.parameters() if id(p) not in covered)
        if free and free >= threshold:
            chosen.add(sub)
            covered.update(id(p) for p in sub.parameters())

    visit(module)
    return chosen


def manual_units(module: nn.Module) -> list[nn.Module]:
    """Under manual optimisation: the submodules that directly own parameters no FSDP unit
    holds yet, innermost first, so that the root holds no parameters.

    Why: ``manual_backward`` and ``optimizer.step()`` run inside the training step, i.e. inside
    the root's forward. A unit's parameters are gathered by its own forward and reduced by its
    own backward hooks, wherever that happens; the root's parameters would be resharded by the
    first backward while its forward still uses them (a second forward in the same step fails
    on mixed tensors). Parameters registered on the LightningModule itself cannot be moved into
    a unit, so they are refused with the fix.
    """
    from torch.distributed.fsdp import FSDPModule

    covered = {id(p) for m in module.modules() if isinstance(m, FSDPModule) and m is not module
               for p in m.parameters()}
    own = [name for name, p in module.named_parameters(recurse=False) if id(p) not in covered]
    if own:
        raise MisconfigurationException(
            f"FSDPStrategy with manual optimisation (automatic_optimization=False) cannot shard "
            f"the parameters {own} registered on {type(module).__name__} itself: the training "
            "step runs inside the FSDP root, so every parameter must belong to a submodule. "
            "Move them into a submodule (e.g. an nn.Module holding the nn.Parameter), or use "
            "strategy='ddp'.")
    order: list[nn.Module] = []

    def visit(sub: nn.Module) -> None:
        for child in sub.children():
            visit(child)
        if sub is not module and not isinstance(sub, FSDPModule) and any(
                id(p) not in covered for p in sub.parameters(recurse=False)):
            order.append(sub)

    visit(module)
    return order


class FSDPStrategy(ParallelStrategy):
    """Fully sharded data parallel (FSDP2) over the Ray worker group.

    Args:
        auto_wrap_policy: which submodules become their own FSDP unit: a set of module
            classes, a callable ``(module) -> bool``, or None for ``default_wrap_policy``.
        mixed_precision: ``"bf16"`` / ``"bf16-mixed"`` (parameters all-gathered and computed
            in bfloat16, gradients reduced in float32, the sharded parameters and optimizer
            state stay float32), ``"16"`` / ``"16-mixed"`` (the same in float16), a
            ``torch.distributed.fsdp.MixedPrecisionPolicy``, or None (float32).
        reshard_after_forward: free each unit's gathered parameters after its forward (and
            gather again for backward): less memory, one more all-gather per unit.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in host
            memory (``CPUOffloadPolicy``); the optimizer steps on the CPU. Nothing to do on
            CPU workers (they are in host memory already).
        state_dict_type: what ``ModelCheckpoint`` writes: ``"full"``, one ordinary file of
            the gathered full state; ``"sharded"``, a ``torch.distributed.checkpoint``
            directory of each rank's shards (no gather; see the module docstring). Both load
            everywhere.
    """

    strategy_name = "fsdp"
    shards_state = True

    def __init__(self, auto_wrap_policy: WrapPolicy = None, mixed_precision: Any = None,
                 reshard_after_forward: bool = True, cpu_offload: bool = False,
                 state_dict_type: str = "full") -> None:
        super().__init__()
        if state_dict_type not in STATE_DICT_TYPES:
            raise MisconfigurationException(
                f"FSDPStrategy(state_dict_type={state_dict_type!r}): use 'full' (checkpoints "
                "are single files of the gathered state) or 'sharded' (checkpoints are "
                "torch.distributed.checkpoint directories, one shard file per rank).")
        if not (mixed_precision is None or mixed_precision in _PRECISIONS
                or type(mixed_precision).__name__ == "MixedPrecisionPolicy"):
            raise MisconfigurationException(
                f"FSDPStrategy(mixed_precision={mixed_precision!r}): use 'bf16', 'bf16-mixed', "
                "'16-mixed', a torch.distributed.fsdp.MixedPrecisionPolicy, or None.")
        if auto_wrap_policy is not None and not callable(auto_wrap_policy) and not (
                isinstance(auto_wrap_policy, (set, frozenset, list, tuple))
                and all(isinstance(c, type) for c in auto_wrap_policy)):
            raise MisconfigurationException(
                "FSDPStrategy(auto_wrap_policy=...) takes a set of nn.Module classes or a "
                f"callable (module) -> bool; got {auto_wrap_policy!r}.")
        self.auto_wrap_policy = auto_wrap_policy
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.state_dict_type = state_dict_type
        self._root: Any = None
        self._keep_shards = False  # inside sharded_state_dicts: no gathers

    # --- the model (every rank) ----------------------------------------------------------------
    def _fsdp_kwargs(self) -> dict[str, Any]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        kwargs: dict[str, Any] = {
            "mesh": init_device_mesh(self.root_device.type, (self.world_size,)),
            "reshard_after_forward": self.reshard_after_forward,
        }
        policy = self.mixed_precision
        if policy in ("bf16", "bf16-mixed"):
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        elif policy in ("16", "16-mixed", 16):
            policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
        if policy is not None:
            kwargs["mp_policy"] = policy
        if self.cpu_offload and self.root_device.type != "cpu":
            # on CPU workers everything is in host memory already (and FSDP's offload policy
            # needs an accelerator: it refuses a CPU-only process)
            kwargs["offload_policy"] = CPUOffloadPolicy()
        return kwargs

    def _units(self, module: nn.Module) -> list[nn.Module]:
        """The submodules to shard as units, innermost first (FSDP2 needs children sharded
        before their parents)."""
        policy = self.auto_wrap_policy
        if policy is None:
            chosen = default_wrap_policy(module, self.world_size)
        elif isinstance(policy, (set, frozenset, list, tuple)):
            classes = tuple(policy)
            chosen = {m for m in module.modules() if isinstance(m, classes)}
        else:
            chosen = {m for m in module.modules() if policy(m)}
        chosen.discard(module)
        order: list[nn.Module] = []

        def visit(sub: nn.Module) -> None:
            for child in sub.children():
                visit(child)
            if sub in chosen and any(True for _ in sub.parameters()):
                order.append(sub)

        visit(module)
        return order

    def _broadcast_initial_state(self, module: nn.Module) -> None:
        """COLLECTIVE: rank 0's tensors not yet sharded, on every rank."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        device = self._comm_device()
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                if isinstance(tensor, DTensor) or tensor.is_meta:
                    continue  # sharded by the user's configure_model already, or not yet built
                data = tensor.data.to(device)
                dist.broadcast(data, src=0)
                if data is not tensor.data:
                    tensor.data.copy_(data)

    def setup_module(self, module: nn.Module, find_unused_parameters: bool = False,
                     sync_batchnorm: bool = False) -> None:
        """COLLECTIVE (world > 1): broadcast rank 0's initial state, shard the units (under
        manual optimisation every parameter owner too), then the root, then materialise meta
        tensors (see the module docstring). A world of one is left unwrapped (its meta
        tensors are materialised whole)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(module, FSDPModule):
            raise MisconfigurationException(
                f"configure_model called fully_shard on the LightningModule "
                f"({type(module).__name__}) itself. FSDPStrategy shards the root itself (the "
                "steps are not the module's forward): fully_shard its layers only, or leave "
                "sharding to FSDPStrategy(auto_wrap_policy=...).")
        owners = meta_owners(module)  # refused here when one has no reset_parameters
        if sync_batchnorm:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        # meta tensors stay meta until they are materialised below (they cannot be moved)
        module._apply(lambda t: t if t.is_meta else t.to(self.root_device))
        self.module = module
        if not self._distributed:
            materialize_meta(owners, self.root_device, distributed=False)
            return  # a world of one: nothing to shard (module docstring)
        self._broadcast_initial_state(module)
        kwargs = self._fsdp_kwargs()
        if not any(isinstance(m, FSDPModule) for m in module.modules()):
            for unit in self._units(module):
                fully_shard(unit, **kwargs)
        if not getattr(module, "automatic_optimization", True):
            for unit in manual_units(module):
                fully_shard(unit, **kwargs)
        root = _FSDPRoot(module)
        fully_shard(root, **kwargs)
        self._root = root
        if owners:
            empty_shards(root, self.root_device)
            materialize_meta(owners, self.root_device, distributed=True)

    def call_step(self, name: str, *args: Any) -> Any:
        """Every step through the FSDP root (the parameters are sharded between steps)."""
        if self._root is not None:
            return self._root(name, *args)
        return getattr(self.module, name)(*args)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Inside an accumulation window: no reduce-scatter in backward (the unsharded
        gradients accumulate until the window's last backward); restored on exit."""
        if self._root is None:
            return contextlib.nullcontext()
        return self._no_gradient_sync()

    @contextlib.contextmanager
    def _no_gradient_sync(self) -> Iterator[None]:
        self._root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self._root.set_requires_gradient_sync(True)

    def teardown_module(self) -> None:
        """Drop the root wrapper; the module keeps its sharded parameters (its state is
        still gathered through ``lightning_module_state_dict`` after the stage)."""
        self._root = None
        self.module = None

    # --- state for checkpoints -----------------------------------------------------------------
    def lightning_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """COLLECTIVE when sharded (every rank, same point): the full module state, each
        sharded tensor gathered and moved to host memory one at a time (the device holds at
        most one full tensor more than its shard). Every rank gets the same dict. Inside
        ``sharded_state_dicts``: each rank's own DTensors, nothing gathered."""
        if self._keep_shards:
            return module.state_dict()
        return {k: _full(v) for k, v in module.state_dict().items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """COLLECTIVE when sharded: ``optimizer.state_dict()`` with every sharded state tensor
        gathered to a full host tensor (keyed by parameter index, as a plain run saves it).
        Inside ``sharded_state_dicts``: the local DTensor state, nothing gathered."""
        state = optimizer.state_dict()
        if self._keep_shards:
            return state
        return {"state": {idx: {k: _full(v) for k, v in entry.items()}
                          for idx, entry in state["state"].items()},
                "param_groups": state["param_groups"]}

    def load_model_state_dict(self, module: nn.Module, state_dict: dict[str, Any],
                              strict: bool = True) -> Any:
        """Every rank: each sharded parameter takes its own shard of the full tensor (no
        communication); plain tensors load as they are. Works before and after sharding.
        A sharded fault-tolerance checkpoint's lazy state (``checkpoint.shard_restore``) reads
        only the chunks of this rank's own shards from storage instead."""
        if hasattr(state_dict, "load_into_module"):  # checkpoint.shard_restore's lazy state
            return state_dict.load_into_module(module, strict=strict)
        current = module.state_dict()
        local = {k: _shard_like(v, current.get(k)) for k, v in state_dict.items()}
        return module.load_state_dict(local, strict=strict)

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer,
                                  state_dict: dict[str, Any]) -> None:
        """Every rank: the full (or plain) optimizer state, each tensor shaped like its
        parameter cut to this rank's shard, then loaded. A sharded fault-tolerance
        checkpoint's lazy state reads only this rank's shards of each state tensor."""
        if hasattr(state_dict, "load_into_optimizer"):  # checkpoint.shard_restore's lazy state
            state_dict.load_into_optimizer(optimizer)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        indices = [i for group in state_dict["param_groups"] for i in group["params"]]
        by_index = dict(zip(indices, params))
        state = {}
        for idx, entry in state_dict["state"].items():
            param = by_index.get(idx)
            state[idx] = {k: _shard_like(v, param) if k != "step" else v
                          for k, v in entry.items()}
        optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


@contextlib.contextmanager
def sharded_state_dicts(strategy: Any) -> Iterator[None]:
    """Inside: ``strategy.lightning_module_state_dict`` / ``optimizer_state`` return each
    rank's own shards (DTensors) without gathering, for a sharded checkpoint save (every
    rank). A strategy other than ``FSDPStrategy`` holds full state anyway: unchanged."""
    if not isinstance(strategy, FSDPStrategy):
        yield
        return
    strategy._keep_shards = True
    try:
        yield
    finally:
        strategy._keep_shards = False


def _full(value: Any) -> Any:
    """A sharded tensor gathered (COLLECTIVE) to a full host tensor; anything else as is."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    return value


def _shard_like(value: Any, like: Any) -> Any:
    """``value`` (a full tensor) as this rank's shard of ``like`` when ``like`` is sharded and
    ``value`` has its full shape; anything else as is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(value, DTensor) or \
            not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(like.shape):
        return value
    device = like.to_local().device
    return distribute_tensor(value.to(device), like.device_mesh, like.placements,
                             src_data_rank=None)
