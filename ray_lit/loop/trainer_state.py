"""The state and helpers the loops use on the Trainer (the object callbacks see as ``trainer``).

``LoopState`` is a base class of ``ray_lit.Trainer``; it holds the run's counters and metric
dictionaries and the small services the loops call (batch transfer, logging cadence, progress
bar view, step dispatch). Kept apart from ``trainer.py`` so that file stays about options and
stages.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from ray_lit.core.hooks import _signature_of
from ray_lit.core.metric_store import MetricStore
from ray_lit.loop.context import InContext, LoopContext
from ray_lit.loop.optimization import accumulation_for_epoch
from ray_lit.loop.outputs import floats, to_float, training_output
from ray_lit.loop.progress import Progress


class TrainerState(str, Enum):
    """Where a run is (0.9 ``TrainerState``; 2.x calls these values ``TrainerStatus``).

    Compare ``trainer.state == TrainerState.FINISHED``; ``trainer.state.status`` is the member.
    """

    INITIALIZING = "initializing"
    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"


TrainerStatus = TrainerState


class TrainerFn(str, Enum):
    """What the user called (2.x ``TrainerFn``)."""

    FITTING = "fit"
    VALIDATING = "validate"
    TESTING = "test"
    PREDICTING = "predict"


class RunningStage(str, Enum):
    """The loop that is running now (2.x ``RunningStage``)."""

    TRAINING = "train"
    SANITY_CHECKING = "sanity_check"
    VALIDATING = "validate"
    TESTING = "test"
    PREDICTING = "predict"


@dataclass(frozen=True, eq=False)
class RunState:
    """``trainer.state``: equal to the 0.9 ``TrainerState`` member of its ``status``, and
    carrying 2.x's ``fn``, ``status`` and ``stage``.

    A snapshot: the trainer makes a new one at each read, so a state kept by a callback
    during a run still says RUNNING afterwards, as 0.9's enum member did.
    """

    status: TrainerState = TrainerState.INITIALIZING
    fn: TrainerFn | None = None
    stage: RunningStage | None = None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RunState):
            return (self.status, self.fn, self.stage) == (other.status, other.fn, other.stage)
        if isinstance(other, str):  # a TrainerState member (a str) or its value
            return self.status == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.status)  # equal objects (a RunState and its status) hash alike

    @property
    def finished(self) -> bool:
        return self.status is TrainerState.FINISHED

    @property
    def stopped(self) -> bool:
        return self.status in (TrainerState.FINISHED, TrainerState.INTERRUPTED)


class LoopState:
    """Counters, metric dictionaries and loop services shared by the fit and eval loops.

    The services a stage runs with live in one typed ``LoopContext`` (``trainer._ctx``); the
    names below are views of its fields, so the loops and callbacks keep the Trainer's names.
    """

    _ctx: LoopContext
    config = InContext("config")
    _host = InContext("host")
    _sink = InContext("sink")
    _hooks = InContext("hooks")
    _progress = InContext("progress")
    _precision = InContext("precision")
    _metric_store = InContext("metrics")
    _train_loader = InContext("train_loader")
    _val_loaders = InContext("val_loaders")

    def _init_run_fields(self) -> None:
        """The run's objects before any stage ran: on the user's Trainer (``__init__``) and
        on each worker's (``_from_run_spec``)."""
        from ray_lit.loop.reporting import NullSink

        self.lightning_module: Any = None
        self.datamodule: Any = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[Any] = []
        self._optimizer_frequencies: list[int] = []
        self._sink = NullSink()
        self._precision = None
        self._resumed = False
        self.num_restarts = 0
        self.world_size_history: list[int] = []
        self.tested_ckpt_path: str | None = None
        self.run_dir: str | None = None

    @classmethod
    def _from_run_spec(cls, spec: Any) -> Any:
        """A worker's Trainer, built from the driver's ``RunSpec`` (``ray_lit.messages``).

        Every rank calls it once per stage, before the job sets the rank's host and sink.
        Nothing of the driver's Trainer arrives besides the spec's fields: no half-run loop
        state, no driver handles. ``__init__`` is not called: the options were validated and
        the callbacks' ``on_init_*`` hooks ran on the driver.
        """
        from ray_lit.loop.host import LocalHost

        trainer = cls.__new__(cls)
        trainer._init_loop_state()
        trainer._init_run_fields()
        trainer._host = LocalHost(False)  # the job replaces it with the rank's WorkerHost
        trainer.config = spec.config
        trainer.default_root_dir = spec.default_root_dir
        trainer.callbacks = list(spec.callbacks)
        trainer.loggers = list(spec.loggers)
        trainer.run_dir = spec.run_dir
        trainer.num_restarts = spec.num_restarts
        trainer.world_size_history = list(spec.world_size_history)
        trainer.tested_ckpt_path = spec.tested_ckpt_path
        trainer._progress.load_state_dict(spec.progress)
        trainer.__dict__.update(spec.extras)
        return trainer

    def _init_loop_state(self) -> None:
        self._progress = Progress()
        self._beats = 0  # batches started in any stage: a rank's liveness (loop/liveness.py)
        self._run_state = RunState()
        # 0.9 names for the loaders the last stage used (None until one ran)
        self.train_dataloader: Any = None
        self.val_dataloaders: list[Any] | None = None
        self.test_dataloaders: list[Any] | None = None
        self.batch_idx = 0  # the training batch in progress (index within the epoch)
        self.callback_metrics: dict[str, Any] = {}
        self.logged_metrics: dict[str, Any] = {}
        self._pbar_raw: dict[str, Any] = {}
        # outside a running loop stage the store only checks that the hook may log
        self._metric_store = MetricStore("idle")
        self._running_losses: collections.deque = collections.deque(maxlen=20)
        self._eval_steps: dict[str, int] = {}
        self.should_stop = False
        self.sanity_checking = False
        self.training = self.validating = self.testing = False
        self.predicting = False  # 2.x: inside trainer.predict
        self.predict_loop: Any = None  # the last predict run's loop (``loop.predict_loop``)
        self.interrupted = False
        self._val_ran_this_epoch = False
        self._val_enabled = False
        self._val_check_batch: float = 1
        self._accumulation = 1
        self._restarted_mid_epoch = False
        self.num_training_batches: float = 0
        self.num_val_batches: list[float] = []
        self.num_test_batches: list[float] = []
        self.num_predict_batches: list[float] = []
        self.predict_dataloaders: list[Any] | None = None

    @property
    def strategy(self) -> Any:
        """How the ranks train one model together (``ray_lit.strategies.Strategy``): the
        module's wrapper, ``barrier()``, ``broadcast()``, ``all_gather()``, ``root_device``."""
        return self._host.strategy

    @property
    def estimated_stepping_batches(self) -> int | float:
        """Optimizer steps the whole fit will take (2.x), for schedulers such as OneCycleLR:
        ``ceil(batches per epoch / accumulate_grad_batches)`` summed over ``max_epochs``,
        capped by ``max_steps``; ``inf`` when neither bounds the run.

        Batches per epoch are this rank's (on Ray workers each rank sees its shard of the
        data) after ``limit_train_batches``. Readable from ``configure_optimizers``: the
        training data is then set up before the optimizers (every rank, the same way).
        """
        pending = getattr(self, "_pending_train_data", None)
        if pending is not None:  # inside configure_optimizers: set the data up now
            self._pending_train_data = None
            pending()
        max_steps = self.config.max_steps
        capped = max_steps is not None and max_steps != -1
        max_epochs = self.config.max_epochs
        batches = self.num_training_batches
        if max_epochs is None or max_epochs == -1 or batches == float("inf"):
            return max_steps if capped else float("inf")
        epochs = max(max_epochs, 1)
        schedule = self.config.accumulate_grad_batches
        if isinstance(schedule, int):
            total = math.ceil(batches / schedule) * epochs
        else:  # 0.9 schedule {epoch: factor}: epoch by epoch, until max_steps caps it
            total = 0
            for epoch in range(epochs):
                total += math.ceil(batches / self._accumulation_for_epoch(epoch))
                if capped and total >= max_steps:
                    break
        return min(total, max_steps) if capped else total

    @property
    def num_devices(self) -> int:
        """Devices (ranks) per node (2.x): 1 in process; on Ray workers, the workers this
        rank's node runs."""
        ranks = getattr(self._host, "ranks", None)
        return int(getattr(ranks, "local_world_size", 1) or 1)

    @property
    def num_nodes(self) -> int:
        """Nodes the run spans (2.x): 1 in process; on Ray workers, world size over the
        workers per node (rounded up when Ray placed them unevenly)."""
        return max(1, math.ceil(self._host.world_size / self.num_devices))

    # --- counters as Lightning names them ---------------------------------------------------
    @property
    def current_epoch(self) -> int:
        return self._progress.epoch

    @property
    def global_step(self) -> int:
        return self._progress.global_step

    @property
    def running_sanity_check(self) -> bool:
        return self.sanity_checking

    @property
    def state(self) -> RunState:
        """``trainer.state == TrainerState.FINISHED`` (0.9); ``.fn``, ``.status``, ``.stage``
        (2.x)."""
        if self.sanity_checking:
            stage = RunningStage.SANITY_CHECKING
        elif self.testing:
            stage = RunningStage.TESTING
        elif self.predicting:
            stage = RunningStage.PREDICTING
        elif self.validating:
            stage = RunningStage.VALIDATING
        elif self.training:
            stage = RunningStage.TRAINING
        else:
            stage = None
        return RunState(self._run_state.status, self._run_state.fn, stage)

    @state.setter
    def state(self, value: RunState | TrainerState) -> None:
        """0.9 code (and its tests) assign a ``TrainerState`` member; a ``RunState`` works."""
        if isinstance(value, RunState):
            self._run_state = RunState(value.status, value.fn)
        else:
            self._run_state = RunState(TrainerState(value), self._run_state.fn)

    def _start_run(self, fn: str) -> None:
        """A stage starts: status RUNNING for ``fn`` (``"fit"``, ``"validate"``, ``"test"``,
        ``"predict"``)."""
        self._run_state = RunState(TrainerState.RUNNING, TrainerFn(fn))

    def _end_run(self, status: TrainerState) -> None:
        self._run_state = RunState(status, self._run_state.fn)

    @contextlib.contextmanager
    def _driver_run(self, fn: str) -> Iterator[None]:
        """``trainer.state`` on the driver around a run on Ray workers (the loop that sets
        it runs in the workers): RUNNING, then FINISHED, or INTERRUPTED on Ctrl-C or error."""
        self._start_run(fn)
        try:
            yield
        except BaseException:
            self._end_run(TrainerState.INTERRUPTED)
            raise
        self._end_run(TrainerState.INTERRUPTED if self.interrupted else TrainerState.FINISHED)

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        return floats(self._pbar_raw)

    @property
    def progress_bar_dict(self) -> dict[str, Any]:
        module = getattr(self, "lightning_module", None)
        base = module.get_progress_bar_dict() if module is not None else {}
        return {**base, **self.progress_bar_metrics}

    # --- loop services -------------------------------------------------------------------------
    def _accumulation_for_epoch(self, epoch: int) -> int:
        return accumulation_for_epoch(self.config.accumulate_grad_batches, epoch)

    def _transfer_batch(self, batch: Any, dataloader_idx: int) -> Any:
        """``on_before_batch_transfer`` -> ``transfer_batch_to_device`` ->
        ``on_after_batch_transfer`` (datamodule hooks win over the module's)."""
        self._beats += 1
        module, dm, device = self.lightning_module, self.datamodule, self._host.device
        owner = module
        if dm is not None and type(dm).transfer_batch_to_device is not \
                _dm_base().transfer_batch_to_device:
            owner = dm
        hooks = self._hooks
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

    def _call_step(self, name: str, *args: Any) -> Any:
        module = self.lightning_module
        previous = module._current_fx_name
        module.__dict__["_current_fx_name"] = name
        try:
            return self.strategy.call_step(name, *args)
        finally:
            module.__dict__["_current_fx_name"] = previous

    def _lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step one scheduler that is due (every rank): the module's 2.x
        ``lr_scheduler_step(scheduler, metric)`` when it overrides it (a scheduler that is
        not torch's), else ``scheduler.step()`` (``step(metric)`` for ReduceLROnPlateau)."""
        if self._hooks.overridden("lr_scheduler_step"):
            self._hooks.module("lr_scheduler_step", scheduler, metric)
        elif metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def _training_step_end(self, raw: Any) -> Any:
        """``training_step_end``: each rank's own output, or (``gather_step_outputs=True``,
        the seed's dp/ddp2 use case) the outputs of all ranks gathered with a differentiable
        all-gather. COLLECTIVE when gathering."""
        if not self._hooks.overridden("training_step_end"):
            return raw
        if self.config.gather_step_outputs:
            raw = _gather_tree(raw, self.strategy.all_gather)
        return self._hooks.module("training_step_end", raw)

    def _manual_training_step(self, batch: Any, batch_idx: int) -> Any:
        raw = self._call_step("training_step", batch, batch_idx)
        if raw is None or (isinstance(raw, dict) and "loss" not in raw):
            from ray_lit.loop.outputs import StepOutput

            return StepOutput(raw=raw, kept=raw)
        return training_output(raw)

    def _manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``self.manual_backward(loss)`` (every rank, inside the training step): the
        ``on_before_backward`` / ``on_after_backward`` hooks around the backward, as 2.x
        runs them, and the strategy readies gradient sync first (``DDPStrategy.pre_backward``).

        0.9 wrote ``manual_backward(loss, optimizer)``: an optimizer among the positional
        arguments is dropped, the rest go to ``Tensor.backward``.
        """
        args = tuple(a for a in args if not isinstance(a, torch.optim.Optimizer))
        hooks = self._hooks
        hooks.both("on_before_backward", loss)
        self.strategy.pre_backward(loss)
        self._precision.scale(loss).backward(*args, **kwargs)
        hooks.both("on_after_backward")

    def _record_loss(self, loss: torch.Tensor) -> None:
        self._running_losses.append(loss)

    def _running_loss_value(self) -> float | None:
        if not self._running_losses:
            return None
        return float(torch.stack(list(self._running_losses)).float().mean().item())

    def _logger_version(self) -> Any:
        loggers = getattr(self, "loggers", [])
        return loggers[0].version if loggers else None

    def _pbar_view(self) -> dict[str, Any]:
        """What the progress bar shows now (host sync: only called at the refresh cadence)."""
        return self.progress_bar_dict

    def _should_log_step(self, batch_idx: int, should_step: bool = True) -> bool:
        """Log cadence: every ``log_every_n_steps`` batches (0.9); while accumulating, only at
        the optimizer steps, every ``log_every_n_steps`` of them (2.x never logs mid-window)."""
        if self.config.fast_dev_run or self.should_stop:
            return True
        every = self.config.log_every_n_steps
        if self._accumulation == 1:
            return (batch_idx + 1) % every == 0
        return should_step and (self._progress.batches_that_stepped + 1) % every == 0

    def _log_to_loggers(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record ``metrics`` in ``logged_metrics`` and send them to the loggers (as floats).

        Without an explicit step a ``'step'`` key is used as the step; failing that the
        global step, and ``'epoch'`` is added (spec §1.8: a ``'step'`` key gets no
        ``'epoch'``, as in 0.9.0's ``log_metrics``).
        """
        metrics = dict(metrics)
        if step is None:
            explicit = metrics.pop("step", None)
            if explicit is not None:
                step = int(to_float(explicit))
            else:
                step = self._progress.batches_that_stepped
                metrics["epoch"] = self.current_epoch
        for key, value in metrics.items():
            if key != "epoch":
                self.logged_metrics[key] = value
        if self.loggers:
            self._sink.log_metrics(floats(metrics), step)

    def _next_eval_step(self, stage: str) -> int:
        step = self._eval_steps.get(stage, 0)
        self._eval_steps[stage] = step + 1
        return step

    def _replace_callback_metrics(self, metrics: dict[str, Any]) -> None:
        self.callback_metrics.clear()
        self.callback_metrics.update(metrics)

    def _monitoring_callbacks(self) -> list[Any]:
        from ray_lit.callbacks.early_stopping import EarlyStopping
        from ray_lit.callbacks.model_checkpoint import ModelCheckpoint

        return [cb for cb in self.callbacks if isinstance(cb, (ModelCheckpoint, EarlyStopping))]

    def _default_checkpoint_dir(self) -> str:
        root = self.default_root_dir
        if self.loggers:
            logger = self.loggers[0]
            save_dir = getattr(logger, "save_dir", None) or root
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            return os.path.join(save_dir, str(logger.name), version, "checkpoints")
        return os.path.join(root, "checkpoints")

    def _run_validation(self) -> None:
        """Validation inside fit; rank 0's stop decision then holds for every rank."""
        from ray_lit.loop.eval_loop import EvalLoop

        EvalLoop(self, "validate").run(self._val_loaders, self.num_val_batches)
        self._val_ran_this_epoch = True
        self.should_stop = self.strategy.agree_on_rank_zero(self.should_stop)  # COLLECTIVE

    def _refresh_epoch_length(self) -> None:
        """Batches this epoch runs (a resumed epoch may have been re-sharded)."""
        from ray_lit.loop.data import limit_batches

        length = self._host.epoch_length(self._train_loader, self._progress.batches_done)
        self.num_training_batches = limit_batches(length, self.config.limit_train_batches,
                                                  "limit_train_batches")

    def _after_train_step(self, is_last: bool) -> None:
        module = self.lightning_module
        if self.config.terminate_on_nan and not module.automatic_optimization:
            # automatic optimisation checks before backward and after each step
            # (``loop.train_step``); a manual step can only be checked once it is done
            from ray_lit.loop.train_step import check_finite_loss, check_finite_parameters

            if self._running_losses:
                check_finite_loss(self._running_losses[-1])
            check_finite_parameters(module)
        self._host.after_train_step(self, is_last)

    def _after_epoch(self) -> None:
        self._host.after_epoch(self)


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
