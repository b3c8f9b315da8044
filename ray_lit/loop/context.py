"""``LoopContext``: what a stage runs with besides the user's objects, and what it does with it.

The loops, the checkpoint code and the worker's job take a context (``FitLoop(ctx)``,
``run_fit(ctx, ...)``): the options, the rank's host, where metrics go, the hook dispatcher,
the counters, the precision plugin, the metric store, the loaders, the loop's own bookkeeping
(cadences, running losses, evaluation steps), and the operations the loops perform with them
(batch transfer, step dispatch, the log cadence, logging to the loggers, validation inside fit).

``ctx.trainer`` is the facade the user's hooks receive as ``trainer``: the loops read and set
Lightning's names there (``lightning_module``, ``callbacks``, ``should_stop``,
``callback_metrics``, ...) and nothing else of it. The Trainer's private names for these fields
(``trainer._host``, ``trainer._progress``, ...) are views of this object (``InContext``), kept
for callbacks written against them; new code takes the context.

One context per Trainer: a worker builds a fresh Trainer, and with it a fresh context, for each
stage (``LoopState._from_run_spec``); nothing of it crosses the process boundary (the driver
sends a ``RunSpec``).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_lit.core.hooks import _signature_of
from ray_lit.core.metric_store import MetricStore
from ray_lit.loop.optimization import accumulation_for_epoch
from ray_lit.loop.outputs import floats, to_float, training_output
from ray_lit.loop.progress import Progress

__all__ = ["InContext", "LoopContext"]


def _running_losses() -> collections.deque:
    return collections.deque(maxlen=20)  # the progress bar's running mean of the last 20


@dataclass(eq=False)
class LoopContext:
    """The run's services, counters and the loop's bookkeeping (every rank).

    Attributes:
        config: the validated options (``TrainerConfig``).
        host: where this rank runs: ranks, device and the strategy (``loop.host.LocalHost``
            in one process, ``worker.host.WorkerHost`` on a Ray worker).
        sink: where metrics, progress and checkpoint notices go (``loop.reporting``: a
            ``NullSink``, a worker's ``RecordingSink`` or the driver's ``DriverSink``).
        hooks: the stage's hook dispatcher (``loop.dispatch.HookDispatcher``), None before a
            stage ran.
        progress: the fit loop's counters (``loop.progress.Progress``): resumable.
        precision: the precision plugin of the last ``fit`` (``core.precision``), or None.
        metrics: the store ``self.log`` writes into for the running hook
            (``core.metric_store.MetricStore``).
        train_loader: the training loader as this rank iterates it (sharded), or None.
        val_loaders: the validation loaders as this rank iterates them, or None.
        beats: batches started in any stage: the rank's liveness (``loop/liveness.py``).
        pbar_raw: the progress bar's logged values (tensors until the bar refreshes).
        running_losses: the last training losses (the bar's ``loss``).
        eval_steps: the next logger step of each evaluation stage.
        val_enabled: whether fit validates at all (loaders and limits allow it).
        val_check_batch: validate every this many training batches (a float: a fraction).
        val_ran_this_epoch: whether validation ran in the running epoch.
        accumulation: batches per optimizer step in the running epoch.
        restarted_mid_epoch: whether the running epoch resumed part way.
        optimizer_frequencies: 0.9's per-optimizer ``frequency`` (empty: every optimizer
            every batch).
        resumed: whether this fit restored a checkpoint.
        pending_train_data: sets the training data up, while ``fit`` runs
            ``configure_optimizers`` (which may ask for ``estimated_stepping_batches``).
        trainer: the facade the user's hooks receive (its ``_ctx`` is this object).
    """

    config: Any = None
    host: Any = None
    sink: Any = None
    hooks: Any = None
    progress: Progress = field(default_factory=Progress)
    precision: Any = None
    metrics: MetricStore = field(default_factory=lambda: MetricStore("idle"))
    train_loader: Any = None
    val_loaders: list[Any] | None = None
    beats: int = 0
    pbar_raw: dict[str, Any] = field(default_factory=dict)
    running_losses: collections.deque = field(default_factory=_running_losses)
    eval_steps: dict[str, int] = field(default_factory=dict)
    val_enabled: bool = False
    val_check_batch: float = 1
    val_ran_this_epoch: bool = False
    accumulation: int = 1
    restarted_mid_epoch: bool = False
    optimizer_frequencies: list[int] = field(default_factory=list)
    resumed: bool = False
    pending_train_data: Any = None
    trainer: Any = field(default=None, repr=False)

    def reset_loop_state(self) -> None:
        """The loop's bookkeeping back to a Trainer that never ran (the services stay)."""
        self.progress = Progress()
        self.metrics = MetricStore("idle")  # outside a stage it only checks a hook may log
        self.beats = 0
        self.pbar_raw = {}
        self.running_losses = _running_losses()
        self.eval_steps = {}
        self.val_enabled = self.val_ran_this_epoch = self.restarted_mid_epoch = False
        self.val_check_batch = 1
        self.accumulation = 1

    # --- the stage -----------------------------------------------------------------------------
    def start_run(self, fn: str) -> None:
        """A stage starts: ``trainer.state`` RUNNING for ``fn`` (``"fit"``, ``"validate"``,
        ``"test"``, ``"predict"``)."""
        from ray_lit.loop.trainer_state import RunState, TrainerFn, TrainerState

        self.trainer.state = RunState(TrainerState.RUNNING, TrainerFn(fn))

    def end_run(self, status: Any) -> None:
        """The stage ended with ``status`` (a ``TrainerState``)."""
        self.trainer.state = status

    def several_optimizers_expected(self) -> bool:
        """0.9's ``training_step(batch, batch_idx, optimizer_idx)``: one step per optimizer."""
        import inspect

        module = self.trainer.lightning_module
        try:
            return "optimizer_idx" in inspect.signature(module.training_step).parameters
        except (TypeError, ValueError):
            return False

    def find_unused_parameters(self) -> bool:
        # several optimizers toggle requires_grad per step: DDP must tolerate unused params
        return bool(self.config.find_unused_parameters or self.several_optimizers_expected())

    # --- the module's steps ----------------------------------------------------------------------
    @property
    def strategy(self) -> Any:
        return self.host.strategy

    def accumulation_for_epoch(self, epoch: int) -> int:
        return accumulation_for_epoch(self.config.accumulate_grad_batches, epoch)

    def transfer_batch(self, batch: Any, dataloader_idx: int) -> Any:
        """``on_before_batch_transfer`` -> ``transfer_batch_to_device`` ->
        ``on_after_batch_transfer`` (datamodule hooks win over the module's)."""
        self.beats += 1
        trainer = self.trainer
        module, dm, device = trainer.lightning_module, trainer.datamodule, self.host.device
        owner = module
        if dm is not None and type(dm).transfer_batch_to_device is not \
                _dm_base().transfer_batch_to_device:
            owner = dm
        hooks = self.hooks
        before = hooks.overridden("on_before_batch_transfer")
        after = hooks.overridden("on_after_batch_transfer")
        custom = owner is dm or hooks.overridden("transfer_batch_to_device")
        if before:
            batch = module.on_before_batch_transfer(batch, dataloader_idx)
        if custom:
            fn = owner.transfer_batch_to_device
            if len(_signature_of(fn)[0]) >= 3:
                batch = fn(batch, device, dataloader_idx)
            else:
                batch = fn(batch, device)
        elif device.type != "cpu":
            batch = module.transfer_batch_to_device(batch, device, dataloader_idx)
        if after:
            batch = module.on_after_batch_transfer(batch, dataloader_idx)
        return batch

    def call_step(self, name: str, *args: Any) -> Any:
        """The module's ``name`` step through the strategy (the wrapped module's forward)."""
        module = self.trainer.lightning_module
        previous = module._current_fx_name
        module.__dict__["_current_fx_name"] = name
        try:
            return self.strategy.call_step(name, *args)
        finally:
            module.__dict__["_current_fx_name"] = previous

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step one scheduler that is due (every rank): the module's 2.x
        ``lr_scheduler_step(scheduler, metric)`` when it overrides it (a scheduler that is
        not torch's), else ``scheduler.step()`` (``step(metric)`` for ReduceLROnPlateau)."""
        if self.hooks.overridden("lr_scheduler_step"):
            self.hooks.module("lr_scheduler_step", scheduler, metric)
        elif metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def training_step_end(self, raw: Any) -> Any:
        """``training_step_end``: each rank's own output, or (``gather_step_outputs=True``,
        the seed's dp/ddp2 use case) the outputs of all ranks gathered with a differentiable
        all-gather. COLLECTIVE when gathering."""
        if not self.hooks.overridden("training_step_end"):
            return raw
        if self.config.gather_step_outputs:
            raw = _gather_tree(raw, self.strategy.all_gather)
        return self.hooks.module("training_step_end", raw)

    def manual_training_step(self, batch: Any, batch_idx: int) -> Any:
        raw = self.call_step("training_step", batch, batch_idx)
        if raw is None or (isinstance(raw, dict) and "loss" not in raw):
            from ray_lit.loop.outputs import StepOutput

            return StepOutput(raw=raw, kept=raw)
        return training_output(raw)

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``self.manual_backward(loss)`` (every rank, inside the training step): the
        ``on_before_backward`` / ``on_after_backward`` hooks around the backward, as 2.x
        runs them, and the strategy readies gradient sync first (``DDPStrategy.pre_backward``).

        0.9 wrote ``manual_backward(loss, optimizer)``: an optimizer among the positional
        arguments is dropped, the rest go to ``Tensor.backward``.
        """
        args = tuple(a for a in args if not isinstance(a, torch.optim.Optimizer))
        hooks = self.hooks
        hooks.both("on_before_backward", loss)
        self.strategy.pre_backward(loss)
        self.precision.scale(loss).backward(*args, **kwargs)
        hooks.both("on_after_backward")

    def record_loss(self, loss: torch.Tensor) -> None:
        self.running_losses.append(loss)

    def running_loss_value(self) -> float | None:
        if not self.running_losses:
            return None
        return float(torch.stack(list(self.running_losses)).float().mean().item())

    # --- logging ---------------------------------------------------------------------------------
    def logger_version(self) -> Any:
        loggers = getattr(self.trainer, "loggers", [])
        return loggers[0].version if loggers else None

    def pbar_view(self) -> dict[str, Any]:
        """What the progress bar shows now (host sync: only called at the refresh cadence)."""
        return self.trainer.progress_bar_dict

    def should_log_step(self, batch_idx: int, should_step: bool = True) -> bool:
        """Log cadence: every ``log_every_n_steps`` batches (0.9); while accumulating, only at
        the optimizer steps, every ``log_every_n_steps`` of them (2.x never logs mid-window)."""
        if self.config.fast_dev_run or self.trainer.should_stop:
            return True
        every = self.config.log_every_n_steps
        if self.accumulation == 1:
            return (batch_idx + 1) % every == 0
        return should_step and (self.progress.batches_that_stepped + 1) % every == 0

    def log_to_loggers(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record ``metrics`` in ``logged_metrics`` and send them to the loggers (as floats).

        Without an explicit step a ``'step'`` key is used as the step; failing that the
        global step, and ``'epoch'`` is added (spec §1.8: a ``'step'`` key gets no
        ``'epoch'``, as in 0.9.0's ``log_metrics``).
        """
        trainer = self.trainer
        metrics = dict(metrics)
        if step is None:
            explicit = metrics.pop("step", None)
            if explicit is not None:
                step = int(to_float(explicit))
            else:
                step = self.progress.batches_that_stepped
                metrics["epoch"] = trainer.current_epoch
        for key, value in metrics.items():
            if key != "epoch":
                trainer.logged_metrics[key] = value
        if trainer.loggers:
            self.sink.log_metrics(floats(metrics), step)

    def next_eval_step(self, stage: str) -> int:
        step = self.eval_steps.get(stage, 0)
        self.eval_steps[stage] = step + 1
        return step

    def replace_callback_metrics(self, metrics: dict[str, Any]) -> None:
        callback_metrics = self.trainer.callback_metrics
        callback_metrics.clear()
        callback_metrics.update(metrics)

    # --- callbacks and checkpoints ---------------------------------------------------------------
    def monitoring_callbacks(self) -> list[Any]:
        from ray_lit.callbacks.early_stopping import EarlyStopping
        from ray_lit.callbacks.model_checkpoint import ModelCheckpoint

        return [cb for cb in self.trainer.callbacks
                if isinstance(cb, (ModelCheckpoint, EarlyStopping))]

    def default_checkpoint_dir(self) -> str:
        trainer = self.trainer
        root = trainer.default_root_dir
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = getattr(logger, "save_dir", None) or root
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            return os.path.join(save_dir, str(logger.name), version, "checkpoints")
        return os.path.join(root, "checkpoints")

    # --- inside the fit loop ---------------------------------------------------------------------
    def run_validation(self) -> None:
        """Validation inside fit; rank 0's stop decision then holds for every rank."""
        from ray_lit.loop.eval_loop import EvalLoop

        trainer = self.trainer
        EvalLoop(self, "validate").run(self.val_loaders, trainer.num_val_batches)
        self.val_ran_this_epoch = True
        trainer.should_stop = self.strategy.agree_on_rank_zero(trainer.should_stop)  # COLLECTIVE

    def refresh_epoch_length(self) -> None:
        """Batches this epoch runs (a resumed epoch may have been re-sharded)."""
        from ray_lit.loop.data import limit_batches

        length = self.host.epoch_length(self.train_loader, self.progress.batches_done)
        self.trainer.num_training_batches = limit_batches(length, self.config.limit_train_batches,
                                                          "limit_train_batches")

    def after_train_step(self, is_last: bool) -> None:
        trainer = self.trainer
        module = trainer.lightning_module
        if self.config.terminate_on_nan and not module.automatic_optimization:
            # automatic optimisation checks before backward and after each step
            # (``loop.train_step``); a manual step can only be checked once it is done
            from ray_lit.loop.train_step import check_finite_loss, check_finite_parameters

            if self.running_losses:
                check_finite_loss(self.running_losses[-1])
            check_finite_parameters(module)
        self.host.after_train_step(self, is_last)

    def after_epoch(self) -> None:
        self.host.after_epoch(self)


class InContext:
    """A Trainer attribute that is a view of one ``LoopContext`` field (read and set)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @staticmethod
    def context_of(obj: Any) -> LoopContext:
        context = obj.__dict__.get("_ctx")
        if context is None:  # the first field set (``__init__``) makes the context
            context = obj.__dict__["_ctx"] = LoopContext(trainer=obj)
        return context

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(self.context_of(obj), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(self.context_of(obj), self.name, value)


def _dm_base() -> type:
    from ray_lit.core.datamodule import LightningDataModule

    return LightningDataModule


def _gather_tree(value: Any, gather: Any) -> Any:
    """All-gather every tensor in a step output (dicts, lists, Results keep their shape)."""
    from ray_lit.core.results import Result

    if isinstance(value, torch.Tensor):
        return gather(value)
    if isinstance(value, Result):
        out = value.copy()
        for key in list(out.keys()):
            if key != "meta" and isinstance(dict.__getitem__(out, key), torch.Tensor):
                dict.__setitem__(out, key, gather(dict.__getitem__(out, key)))
        return out
    if isinstance(value, dict):
        return {k: _gather_tree(v, gather) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_gather_tree(v, gather) for v in value)
    return value
