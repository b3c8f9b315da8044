"""``StochasticWeightAveraging``: train on with a SWA learning rate and keep a running average of
the weights; the average is what the module holds when training ends.

From epoch ``swa_start`` on, each training epoch starts by folding the current weights into the
average, and a ``SWALR`` schedule replaces the module's scheduler: the callback takes the
module's scheduler out of ``trainer.lr_scheduler_configs`` and steps ``SWALR`` itself at each
training epoch end (where the loop steps epoch schedulers). When the last epoch ends the
averaged weights are copied into the module; a module with BatchNorm layers then gets its running
statistics recomputed for those weights with one forward pass over its training data
(``training_step`` without gradients), as ``torch.optim.swa_utils.update_bn`` does. 2.x runs that
pass as an extra training epoch without backward; ray_lit runs it inside ``on_train_end``, so the
loop needs no special mode.

Distributed: every rank averages the same (DDP-synchronised) weights, so the averages agree
without communication; each rank's BatchNorm pass reads its own shard, and rank 0's module (the
one the driver receives after ``fit``) holds the averaged weights.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import SWALR

from ray_lit.callbacks.base import Callback
from ray_lit.errors import MisconfigurationException

AvgFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _validate(swa_lrs: Any, swa_epoch_start: Any, annealing_strategy: Any, avg_fn: Any,
              device: Any) -> None:
    start_ok = (isinstance(swa_epoch_start, int) and not isinstance(swa_epoch_start, bool)
                and swa_epoch_start >= 1) or (isinstance(swa_epoch_start, float)
                                              and 0 <= swa_epoch_start <= 1)
    if not start_ok:
        raise MisconfigurationException(
            f"StochasticWeightAveraging(swa_epoch_start={swa_epoch_start!r}): use an int >= 1 "
            "(the epoch to start from) or a float in [0, 1] (a fraction of max_epochs).")
    lrs_ok = (isinstance(swa_lrs, float) and swa_lrs > 0) or (
        isinstance(swa_lrs, list) and swa_lrs
        and all(isinstance(lr, float) and lr > 0 for lr in swa_lrs))
    if not lrs_ok:
        raise MisconfigurationException(
            f"StochasticWeightAveraging(swa_lrs={swa_lrs!r}): use a positive float, or a list "
            "of positive floats (one per parameter group).")
    if annealing_strategy not in ("cos", "linear"):
        raise MisconfigurationException(
            f"StochasticWeightAveraging(annealing_strategy={annealing_strategy!r}): use 'cos' "
            "or 'linear'.")
    if avg_fn is not None and not callable(avg_fn):
        raise MisconfigurationException(
            "StochasticWeightAveraging(avg_fn=...): pass a function (averaged, current, "
            "num_averaged) -> new average, or None for the equal-weight mean.")
    if device is not None and not isinstance(device, (torch.device, str)):
        raise MisconfigurationException(
            f"StochasticWeightAveraging(device={device!r}): use a torch.device, a str such as "
            "'cpu', or None for the module's device.")


class StochasticWeightAveraging(Callback):
    """Average the weights of the last epochs (Izmailov et al., 2018) under a SWA schedule.

    Args:
        swa_lrs: the SWA learning rate: one float for every parameter group, or a list with
            one per group.
        swa_epoch_start: the (1-based) epoch averaging starts at, or a float fraction of
            ``max_epochs`` (``int(fraction * max_epochs)``).
        annealing_epochs: epochs ``SWALR`` takes to anneal each group's rate to ``swa_lrs``.
        annealing_strategy: ``"cos"`` or ``"linear"`` annealing.
        avg_fn: ``(averaged, current, num_averaged) -> new average`` per parameter; None:
            the equal-weight running mean.
        device: where the averaged weights are kept (``"cpu"`` by default, saving accelerator
            memory); None: the module's device.

    Raises:
        MisconfigurationException: an argument out of range (at construction), more than one
            optimizer or scheduler, or a sharded strategy (when ``fit`` starts).
    """

    def __init__(self, swa_lrs: float | list[float], swa_epoch_start: int | float = 0.8,
                 annealing_epochs: int = 10, annealing_strategy: str = "cos",
                 avg_fn: AvgFn | None = None,
                 device: torch.device | str | None = torch.device("cpu")) -> None:
        _validate(swa_lrs, swa_epoch_start, annealing_strategy, avg_fn, device)
        self.n_averaged: torch.Tensor | None = None
        self._swa_epoch_start = swa_epoch_start
        self._swa_lrs = swa_lrs
        self._annealing_epochs = annealing_epochs
        self._annealing_strategy = annealing_strategy
        self._avg_fn = avg_fn or self.avg_fn
        self._device = device
        self._model_contains_batch_norm: bool | None = None
        # parameter name -> averaged value (a dict of tensors, not a module copy: it travels
        # back to the driver with the callback's state, and holds no trainer reference)
        self._average: dict[str, torch.Tensor] | None = None
        self._initialized = False
        self._swa_scheduler: Any = None
        self._scheduler_state: dict[str, Any] | None = None
        self._init_n_averaged = 0
        self._latest_update_epoch = -1
        self._max_epochs = -1

    # --- the schedule ---------------------------------------------------------------------------
    @property
    def swa_start(self) -> int:
        """The 0-based epoch whose start is the first averaged."""
        return max(int(self._swa_epoch_start) - 1, 0)

    @property
    def swa_end(self) -> int:
        """The 0-based last training epoch (averaging runs through its start)."""
        return self._max_epochs - 1

    @staticmethod
    def pl_module_contains_batch_norm(pl_module: nn.Module) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pl_module.modules())

    @staticmethod
    def avg_fn(averaged: torch.Tensor, current: torch.Tensor,
               num_averaged: torch.Tensor) -> torch.Tensor:
        """The equal-weight running mean of ``num_averaged + 1`` values."""
        return averaged + (current - averaged) / (num_averaged + 1)

    # --- hooks (every rank, same order) ---------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        if getattr(getattr(trainer, "strategy", None), "shards_state", False):
            raise MisconfigurationException(
                "StochasticWeightAveraging does not support sharded models "
                "(strategy='fsdp'); use strategy='ddp' or drop the callback.")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                "StochasticWeightAveraging works with one optimizer; configure_optimizers "
                f"returned {len(trainer.optimizers)}.")
        if len(trainer.lr_scheduler_configs) > 1:
            raise MisconfigurationException(
                "StochasticWeightAveraging supports at most one lr scheduler; "
                f"configure_optimizers returned {len(trainer.lr_scheduler_configs)}.")
        max_epochs = trainer.max_epochs
        if isinstance(self._swa_epoch_start, float):
            if max_epochs is None or max_epochs < 0:
                raise MisconfigurationException(
                    "StochasticWeightAveraging(swa_epoch_start=<float>) needs max_epochs; pass "
                    "swa_epoch_start as an int epoch instead.")
            self._swa_epoch_start = int(max_epochs * self._swa_epoch_start)
        self._max_epochs = max_epochs
        self._model_contains_batch_norm = self.pl_module_contains_batch_norm(pl_module)
        if self._scheduler_state is not None:
            # resumed during averaging: the module's scheduler was already swapped out before
            # the checkpoint; SWALR is rebuilt from this state at the epoch start
            trainer.lr_scheduler_configs.clear()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        in_window = self.swa_start <= epoch <= self.swa_end
        if in_window and not self._initialized:
            self._start_averaging(trainer, pl_module)
        if in_window and epoch > self._latest_update_epoch:
            self._fold_in(pl_module)
            self._latest_update_epoch = epoch

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # where the loop steps epoch-interval schedulers (once per epoch, frequency 1)
        if self._swa_scheduler is not None:
            self._swa_scheduler.step()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # the epoch counter has moved past the last epoch: max_epochs after a full run; a run
        # stopped early (EarlyStopping, Timer) keeps its own weights, as in 2.x
        if self._average is None or trainer.current_epoch - 1 != self.swa_end:
            return
        self.transfer_weights(self._average, pl_module)
        if self._model_contains_batch_norm:
            self._update_batch_norm(trainer, pl_module)

    # --- averaging ------------------------------------------------------------------------------
    def _start_averaging(self, trainer: Any, pl_module: Any) -> None:
        self._initialized = True
        optimizer = trainer.optimizers[0]
        if isinstance(self._swa_lrs, float):
            self._swa_lrs = [self._swa_lrs] * len(optimizer.param_groups)
        if len(self._swa_lrs) != len(optimizer.param_groups):
            raise MisconfigurationException(
                f"StochasticWeightAveraging(swa_lrs=...) has {len(self._swa_lrs)} rates for "
                f"{len(optimizer.param_groups)} parameter groups; give one per group.")
        for lr, group in zip(self._swa_lrs, optimizer.param_groups):
            group["initial_lr"] = lr
        self._swa_scheduler = SWALR(
            optimizer, swa_lr=self._swa_lrs, anneal_epochs=self._annealing_epochs,
            anneal_strategy=self._annealing_strategy,
            last_epoch=trainer.max_epochs if self._annealing_strategy == "cos" else -1)
        if self._scheduler_state is not None:
            self._swa_scheduler.load_state_dict(self._scheduler_state)
        elif trainer.current_epoch != self.swa_start:
            warnings.warn("StochasticWeightAveraging starts after swa_start without saved "
                          "state: the average covers fewer epochs.", stacklevel=2)
        if trainer.lr_scheduler_configs:
            # the module's scheduler stops here: it would fight SWALR over the rates
            old = trainer.lr_scheduler_configs.pop(0)
            warnings.warn(f"StochasticWeightAveraging: SWALR replaces the module's "
                          f"{type(old.scheduler).__name__} from epoch {trainer.current_epoch} "
                          "on.", stacklevel=2)
        if self.n_averaged is None:
            self.n_averaged = torch.tensor(self._init_n_averaged, dtype=torch.long)

    def _fold_in(self, pl_module: nn.Module) -> None:
        """Add the module's current weights to the average."""
        assert self.n_averaged is not None
        device = self._device or next(pl_module.parameters()).device
        if self._average is None:
            self._average = {}
        for name, param in pl_module.named_parameters():
            # a copy: on the same device ``to`` would alias the live parameter, and an
            # ``avg_fn`` that returns it would make the "average" follow training
            current = param.detach().to(device, copy=True)
            averaged = self._average.get(name)
            if averaged is None or int(self.n_averaged) == 0:
                self._average[name] = current
            else:
                self._average[name] = self._avg_fn(averaged, current,
                                                   self.n_averaged.to(device)).detach()
        self.n_averaged += 1

    @staticmethod
    def transfer_weights(average: dict[str, torch.Tensor], pl_module: nn.Module) -> None:
        """Copy the averaged weights into ``pl_module``'s parameters."""
        with torch.no_grad():
            for name, param in pl_module.named_parameters():
                if name in average:
                    param.copy_(average[name].to(param.device))

    # --- BatchNorm statistics for the averaged weights ------------------------------------------
    def _update_batch_norm(self, trainer: Any, pl_module: Any) -> None:
        """One pass of ``training_step`` over this rank's training batches, without gradients,
        with every BatchNorm layer's running statistics reset to a cumulative average."""
        momenta = _reset_batch_norm(pl_module)
        was_training = pl_module.training
        pl_module.train()
        total = trainer.num_training_batches
        try:
            with torch.no_grad(), _no_logging(trainer):
                for batch_idx, batch in enumerate(trainer._train_loader):
                    if batch_idx >= total:
                        break
                    pl_module.training_step(trainer._ctx.transfer_batch(batch, 0), batch_idx)
        finally:
            for module, momentum in momenta.items():
                module.momentum = momentum
            pl_module.train(was_training)

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "n_averaged": 0 if self.n_averaged is None else int(self.n_averaged.item()),
            "latest_update_epoch": self._latest_update_epoch,
            "scheduler_state": None if self._swa_scheduler is None
            else self._swa_scheduler.state_dict(),
            "average_model_state": None if self._average is None
            else {k: v.detach().cpu().clone() for k, v in self._average.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._init_n_averaged = int(state_dict["n_averaged"])
        self._latest_update_epoch = state_dict["latest_update_epoch"]
        self._scheduler_state = state_dict["scheduler_state"]
        average = state_dict.get("average_model_state")
        self._average = None if average is None else dict(average)

    def __getstate__(self) -> dict[str, Any]:
        # SWALR holds the optimizer: a copy of the callback (shipping it to the workers,
        # returning it to the driver) carries the schedule's state instead
        state = dict(self.__dict__)
        if state["_swa_scheduler"] is not None:
            state["_scheduler_state"] = state["_swa_scheduler"].state_dict()
            state["_swa_scheduler"] = None
        return state


def _reset_batch_norm(pl_module: nn.Module) -> dict[nn.Module, float | None]:
    """Zero every BatchNorm layer's statistics and make it average cumulatively (momentum
    None); returns the momenta to put back."""
    momenta: dict[nn.Module, float | None] = {}
    for module in pl_module.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or \
                module.running_mean is None:
            continue
        module.running_mean.zero_()
        module.running_var.fill_(1)
        if module.num_batches_tracked is not None:
            module.num_batches_tracked.zero_()
        momenta[module] = module.momentum
        module.momentum = None
    return momenta


@contextlib.contextmanager
def _no_logging(trainer: Any) -> Iterator[None]:
    """``self.log`` calls of the BatchNorm pass are dropped, quietly: the pass is not training,
    and its values must not reach the loggers or the monitored metrics. Without a metric store
    ``LightningModule.log`` ignores a call (with a warning, silenced here)."""
    store = getattr(trainer, "_metric_store", None)
    trainer._metric_store = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"self\.log(_dict)?\(")
            yield
    finally:
        trainer._metric_store = store
