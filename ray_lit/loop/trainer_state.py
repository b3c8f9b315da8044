"""The Trainer's run state as Lightning names it (the object callbacks see as ``trainer``).

``LoopState`` is a base class of ``ray_lit.Trainer``: the counters and metric dictionaries that
Lightning code reads on the trainer (``current_epoch``, ``callback_metrics``, ``state``,
``estimated_stepping_batches``, ...). What the loops run with and do lives in the Trainer's
``LoopContext`` (``loop/context.py``); the private names below are views of its fields.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from ray_lit.loop.context import InContext, LoopContext
from ray_lit.loop.outputs import floats


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
    """Lightning's names for the run's counters and metric dictionaries (every rank).

    The services a stage runs with live in one typed ``LoopContext`` (``trainer._ctx``), which
    the loops take; the private names below are views of its fields for the module's
    ``self.log`` and for callbacks written against them.
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
    _beats = InContext("beats")
    _pbar_raw = InContext("pbar_raw")
    _running_losses = InContext("running_losses")
    _eval_steps = InContext("eval_steps")
    _val_enabled = InContext("val_enabled")
    _val_check_batch = InContext("val_check_batch")
    _val_ran_this_epoch = InContext("val_ran_this_epoch")
    _accumulation = InContext("accumulation")
    _restarted_mid_epoch = InContext("restarted_mid_epoch")
    _optimizer_frequencies = InContext("optimizer_frequencies")
    _resumed = InContext("resumed")
    _pending_train_data = InContext("pending_train_data")

    def _init_run_fields(self) -> None:
        """The run's objects before any stage ran: on the user's Trainer (``__init__``) and
        on each worker's (``_from_run_spec``)."""
        from ray_lit.loop.reporting import NullSink

        self.lightning_module: Any = None
        self.datamodule: Any = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[Any] = []
        self._sink = NullSink()
        self._precision = None
        self._optimizer_frequencies = []
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
        InContext.context_of(self).reset_loop_state()
        self._run_state = RunState()
        # 0.9 names for the loaders the last stage used (None until one ran)
        self.train_dataloader: Any = None
        self.val_dataloaders: list[Any] | None = None
        self.test_dataloaders: list[Any] | None = None
        self.batch_idx = 0  # the training batch in progress (index within the epoch)
        self.callback_metrics: dict[str, Any] = {}
        self.logged_metrics: dict[str, Any] = {}
        self.should_stop = False
        self.sanity_checking = False
        self.training = self.validating = self.testing = False
        self.predicting = False  # 2.x: inside trainer.predict
        self.predict_loop: Any = None  # the last predict run's loop (``loop.predict_loop``)
        self.interrupted = False
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
        pending = self._pending_train_data
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
                total += math.ceil(batches / self._ctx.accumulation_for_epoch(epoch))
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
