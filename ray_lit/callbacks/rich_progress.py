"""``RichProgressBar``: the driver's progress display drawn with ``rich`` (optional extra).

It is a ``ProgressBar``, so it takes the same place in a run: it never runs inside the loop or
on a worker; the driver's event sink calls ``on_run_start``, ``start_stage``, ``update``,
``end_stage`` and ``on_run_end`` (replaying rank 0's events for a distributed fit), and there is
one display, in the user's terminal. One rich ``Progress`` holds a task per stage in progress:
"Epoch N/M" with the metrics beside it, and a validation (or sanity-check, or test) task below.
Where stderr is not a terminal rich draws no animation and prints the final state when the run
ends.

``rich`` is imported only when a ``RichProgressBar`` is built (``pip install ray_lit[rich]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray_lit.callbacks.progress import ProgressBar

_TITLES = {"validate": "Validation", "sanity_check": "Sanity Checking", "test": "Testing",
           "predict": "Predicting"}


def _require_rich() -> Any:
    try:
        import rich  # noqa: F401 - the extra is what this checks
    except ImportError as err:
        raise ImportError(
            "RichProgressBar needs the `rich` package: pip install ray_lit[rich] (or use "
            "ray_lit's default ProgressBar).") from err
    import rich.progress

    return rich.progress


@dataclass
class RichProgressBarTheme:
    """Styles of the bar's parts (any rich style string, e.g. ``"bold magenta"``).

    ``metrics_format`` formats float metrics; ``metrics_text_delimiter`` separates them.
    """

    description: str = ""
    progress_bar: str = "#6206E0"
    progress_bar_finished: str = "#6206E0"
    progress_bar_pulse: str = "#6206E0"
    batch_progress: str = ""
    time: str = "dim"
    processing_speed: str = "dim underline"
    metrics: str = "italic"
    metrics_text_delimiter: str = " "
    metrics_format: str = ".3f"


class RichProgressBar(ProgressBar):
    """Progress bars drawn with ``rich``, on the driver.

    Args:
        refresh_rate: redraw every this many batches (0 disables the bar).
        leave: keep each finished epoch's bar on screen (otherwise one bar is reused).
        theme: styles of the parts, a ``RichProgressBarTheme``.
        console_kwargs: keyword arguments of the ``rich.console.Console`` drawn to (for
            example ``{"file": stream, "width": 120}``).

    Raises:
        ImportError: ``rich`` is not installed (``pip install ray_lit[rich]``).
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False,
                 theme: RichProgressBarTheme | None = None,
                 console_kwargs: dict[str, Any] | None = None) -> None:
        _require_rich()
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.theme = theme or RichProgressBarTheme()
        self._console_kwargs = dict(console_kwargs or {})
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    # --- the driver's calls -------------------------------------------------------------------
    def on_run_start(self, stage: str) -> None:
        if not self.is_enabled:
            return
        self._stop()
        self._stages.clear()
        self._run_stage = stage
        self._progress = self._new_progress()
        self._progress.start()

    def start_stage(self, stage: str, total: int | None, epoch: int,
                    max_epochs: int | None) -> None:
        if not self.is_enabled or self._progress is None:
            return
        super().start_stage(stage, total, epoch, max_epochs)
        description = self._description(stage, epoch, max_epochs)
        task = self._tasks.get(stage)
        if task is not None and stage == "train" and not self.leave:
            self._progress.reset(task, total=total, description=description, metrics="")
            return
        if task is not None and stage != "train":
            self._progress.remove_task(task)
        self._tasks[stage] = self._progress.add_task(description, total=total, metrics="")

    def _draw(self, stage: str, n_done: int, metrics: dict[str, float | int | str]) -> None:
        if self._progress is None:
            return
        fields = {"metrics": self._metrics_text(metrics)} if stage == "train" else {}
        self._progress.update(self._tasks[stage], completed=n_done, refresh=True, **fields)

    def end_stage(self, stage: str) -> None:
        state = self._stages.pop(stage, None)
        if not self.is_enabled or state is None or self._progress is None:
            return
        task = self._tasks.get(stage)
        train = self._stages.get("train")
        if stage == "validate" and train is not None:
            # validation inside an epoch: its metrics join the epoch's line, its bar goes
            train.metrics.update(state.metrics)
            self._progress.update(self._tasks["train"],
                                  metrics=self._metrics_text(train.metrics))
        if task is None:
            return
        self._progress.update(task, completed=state.n_done)
        nested = stage in ("validate", "sanity_check") and self._run_stage == "fit"
        if nested:
            self._progress.remove_task(task)
            del self._tasks[stage]
        elif stage == "train" and self.leave:
            del self._tasks[stage]  # stays on screen; the next epoch gets a new bar

    def on_run_end(self) -> None:
        self._stop()
        self._stages.clear()
        self._run_stage = None

    def print(self, *args: Any, sep: str = " ", end: str = "\n") -> None:
        """Print above the bars (through rich's console while they are shown)."""
        if self._progress is not None:
            self._progress.console.print(*args, sep=sep, end=end)
        else:
            print(*args, sep=sep, end=end)

    # --- drawing ------------------------------------------------------------------------------
    def _new_progress(self) -> Any:
        progress = _require_rich()
        from rich.console import Console

        theme = self.theme
        columns = [
            progress.TextColumn("[progress.description]{task.description}",
                                style=theme.description),
            progress.BarColumn(style=theme.progress_bar,
                               complete_style=theme.progress_bar_finished,
                               finished_style=theme.progress_bar_finished,
                               pulse_style=theme.progress_bar_pulse),
            progress.MofNCompleteColumn(),
            progress.TimeElapsedColumn(),
            progress.TextColumn("{task.fields[metrics]}", style=theme.metrics),
        ]
        console = Console(**self._console_kwargs)
        # no refresh thread: the driver redraws at each update it replays (refresh_rate)
        return progress.Progress(*columns, console=console, auto_refresh=False)

    def _description(self, stage: str, epoch: int, max_epochs: int | None) -> str:
        if stage == "train":
            last = f"/{max_epochs - 1}" if max_epochs is not None and max_epochs > 0 else ""
            return f"Epoch {epoch}{last}"
        return _TITLES.get(stage, stage.capitalize())

    def _metrics_text(self, metrics: dict[str, Any]) -> str:
        theme = self.theme
        parts = []
        for name, value in metrics.items():
            if isinstance(value, float):
                value = format(value, theme.metrics_format)
            parts.append(f"{name}: {value}")
        return theme.metrics_text_delimiter.join(parts)

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
        self._progress = None
        self._tasks = {}

    def __getstate__(self) -> dict[str, Any]:
        # a live rich display holds a console and a refresh thread: copies start without one
        state = super().__getstate__()
        state["_progress"] = None
        state["_tasks"] = {}
        return state
