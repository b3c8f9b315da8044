"""``LoopContext``: what a stage runs with besides the user's objects, in one typed place.

The loops, the checkpoint code and the worker's job read and set these through the Trainer
(``trainer._host``, ``trainer._sink``, ...), which keeps Lightning's names for callbacks and
modules; the values live here, on ``trainer._ctx``, so what a running stage depends on is one
object with one schema instead of attributes scattered over the Trainer. A worker builds a fresh
context for each stage (``LoopState._from_run_spec``); nothing of it crosses the process boundary
(the driver sends a ``RunSpec``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray_lit.core.metric_store import MetricStore
from ray_lit.loop.progress import Progress

__all__ = ["InContext", "LoopContext"]


@dataclass(eq=False)
class LoopContext:
    """The run's services and counters, set by the stage that runs (every rank).

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


class InContext:
    """A Trainer attribute that is a view of one ``LoopContext`` field (read and set)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @staticmethod
    def context_of(obj: Any) -> LoopContext:
        context = obj.__dict__.get("_ctx")
        if context is None:  # the first field set (``__init__``) makes the context
            context = obj.__dict__["_ctx"] = LoopContext()
        return context

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(self.context_of(obj), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(self.context_of(obj), self.name, value)
