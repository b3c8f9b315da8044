"""``DDPStrategy``: one full replica of the module per Ray worker, gradients all-reduced.

The module is wrapped in ``DistributedDataParallel`` around a thin ``_StepModule`` whose
``forward(name, *args)`` runs ``module.<name>(*args)``: the training step goes through DDP's
forward, so DDP sees the step's graph and synchronises its gradients in backward. Every rank
holds the same parameters and optimizer state at a step boundary, so checkpoint state is the
plain ``state_dict`` (rank 0's part is the full checkpoint).

Manual optimisation (``automatic_optimization = False``) calls ``manual_backward`` *inside*
that forward, before DDP's forward has told its reducer to expect a backward (DDP does that
when forward returns). ``pre_backward`` does it just before each manual backward (Lightning
2.x does the same), and a manual module gets ``find_unused_parameters=True`` unless the
strategy object says otherwise: ``toggle_optimizer`` and a GAN's detached fake batch leave
parameters without a gradient in a backward, which the reducer can only finish if it looks
for them.

Bit-identical resume. DDP flattens the gradients into buckets and all-reduces each bucket; with
more than two ranks gloo's ring all-reduce sums an element in an order that depends on its
offset in the bucket, so a different bucket layout changes the last bit of some sums. DDP
starts with one layout (every parameter in one bucket, in parameter order) and rebuilds it,
once, after the first backward (in the order the gradients became ready). A resumed run builds
a new DDP, so its first step after the restore used the start layout where the uninterrupted
run used the rebuilt one: weights 1 ulp apart at 4 workers. ``setup_module`` therefore runs one
all-reduce of zero gradients (a backward over every parameter, in reverse parameter order,
through DDP's own forward) and rebuilds the buckets from it before any real step, so every DDP
of a run, first or resumed, reduces every step with the same layout. It costs one all-reduce at
setup and nothing per step. It is skipped where DDP never rebuilds
(``find_unused_parameters=True``), with ``static_graph=True`` (its first backward also records
the graph) and with sparse gradients.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ray_lit.strategies.parallel import ParallelStrategy

UNUSED_PARAMETERS_HELP = (
    "DDP found parameters that received no gradient in the previous training step. ray_lit "
    "runs DDP with find_unused_parameters=False by default (it is faster); if some parameters "
    "are legitimately unused in a step, pass Trainer(find_unused_parameters=True) (or "
    "strategy=DDPStrategy(find_unused_parameters=True)); otherwise make every parameter take "
    "part in the loss.")


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (nested lists, tuples, dicts): where DDP's reducer starts its
    search for the parameters a backward reaches."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors_in(item)]
    return []


# the step name that makes ``_StepModule`` run the bucket layout pass instead of a module method
_LAYOUT_PASS = "__ray_lit_bucket_layout_pass__"


class _StepModule(nn.Module):
    """What DDP wraps: ``forward(name, *args)`` runs ``module.<name>(*args)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, name: str, *args: Any) -> Any:
        if name == _LAYOUT_PASS:
            return _layout_loss(self.module)
        return getattr(self.module, name)(*args)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters DDP's reducer holds (``parameters()`` already drops shared duplicates)."""
    return [p for p in module.parameters() if p.requires_grad]


def _layout_loss(module: nn.Module) -> torch.Tensor:
    """A zero loss whose backward reaches every trainable parameter once, last parameter first.

    Each parameter joins a running sum after the previous ones, so autograd finishes the
    parameter added last first: DDP records the reverse parameter order, the order it assumes
    at construction and the usual order of a backward. The order only has to be the same in
    every run; the gradients are zero and are thrown away.
    """
    params = _trainable(module)
    total = torch.zeros((), device=params[0].device)
    for param in params:
        # .to: a module may spread its layers over devices
        total = total + (param.sum() * 0.0).to(total.device)
    return total


def _has_sparse_gradients(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
               for m in module.modules())


def _settle_bucket_layout(ddp: nn.parallel.DistributedDataParallel) -> None:
    """COLLECTIVE: make DDP rebuild its buckets now, from a zero backward, so that every step of
    every DDP of the run (first or resumed) all-reduces with the same layout (module docstring).

    The gradients the parameters held before are put back untouched.
    """
    params = _trainable(ddp.module)
    saved = [p.grad for p in params]
    for param in params:
        param.grad = None  # the backward must not accumulate into a caller's gradient
    try:
        with torch.enable_grad():
            ddp(_LAYOUT_PASS).backward()
        # a collective: rank 0's recorded order is broadcast, every rank rebuilds the same way
        ddp.reducer._rebuild_buckets()
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad


class DDPStrategy(ParallelStrategy):
    """Distributed data parallel over the Ray worker group.

    Args:
        find_unused_parameters: passed to DDP (also ``Trainer(find_unused_parameters=True)``);
            needed when some parameters get no gradient in a step.
        static_graph: passed to DDP; the graph is the same every step.
    """

    strategy_name = "ddp"

    def __init__(self, find_unused_parameters: bool | None = None,
                 static_graph: bool = False) -> None:
        super().__init__()
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph
        self._ddp: Any = None

    def setup_module(self, module: nn.Module, find_unused_parameters: bool = False,
                     sync_batchnorm: bool = False) -> None:
        """COLLECTIVE (world > 1): DDP broadcasts rank 0's parameters and buffers, so every
        replica starts identical, then (most setups) all-reduces zero gradients once to fix
        its bucket layout for the whole run (module docstring: bit-identical resume)."""
        if sync_batchnorm:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module.to(self.root_device)
        self.module = module
        if self._distributed and any(p.requires_grad for p in module.parameters()):
            device = self.root_device
            device_ids = [device.index] if device.type == "cuda" else None
            unused = self.find_unused_parameters
            if unused is None:
                # a manual step's backwards often leave parameters without a gradient
                # (toggle_optimizer, a detached generator output): see the module docstring
                manual = not getattr(module, "automatic_optimization", True)
                unused = find_unused_parameters or manual
            self._ddp = nn.parallel.DistributedDataParallel(
                _StepModule(module), device_ids=device_ids, find_unused_parameters=unused,
                static_graph=self.static_graph)
            # only DDP that rebuilds its buckets needs it; see the module docstring for why
            # static graphs and sparse gradients keep DDP's own first step
            if not unused and not self.static_graph and not _has_sparse_gradients(module):
                _settle_bucket_layout(self._ddp)

    def call_step(self, name: str, *args: Any) -> Any:
        if name == "training_step" and self._ddp is not None and torch.is_grad_enabled():
            try:
                return self._ddp(name, *args)
            except RuntimeError as err:
                if "find_unused_parameters" not in str(err):
                    raise
                # torch's text names its own keyword; say how to turn it on in ray_lit
                raise RuntimeError(UNUSED_PARAMETERS_HELP) from err
        return getattr(self.module, name)(*args)

    def pre_backward(self, loss: Any) -> None:
        """Every rank, right before each ``manual_backward``: tell DDP's reducer a backward of
        ``loss`` comes, so that backward all-reduces the gradients.

        DDP's own forward does this when it returns, which is too late for a backward run
        inside the training step; without it the reducer sees the hooks of a backward it did
        not expect and fails at the next step ("initialize_buckets must NOT be called during
        autograd execution"). Under ``no_sync`` (gradient sync off) nothing is prepared.
        """
        ddp = self._ddp
        if ddp is None or not torch.is_grad_enabled() or not ddp.require_backward_grad_sync:
            return
        ddp.require_forward_param_sync = True
        search = ddp.find_unused_parameters and not ddp.static_graph
        try:
            # buckets are rebuilt (once, after the first step) before the backward, not in it
            ddp.reducer._rebuild_buckets()
            ddp.reducer.prepare_for_backward(_tensors_in(loss) if search else [])
        except RuntimeError as err:
            if "find_unused_parameters" not in str(err):
                raise
            raise RuntimeError(UNUSED_PARAMETERS_HELP) from err

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    def teardown_module(self) -> None:
        self._ddp = None
        self.module = None
