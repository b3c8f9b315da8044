"""``ProgressBar``: the one progress display of a run, driven by the trainer on the driver.

Unlike other callbacks it does not run inside the loop: the loop reports progress to an event
sink, and the driver's ``DriverSink`` (``ray_lit.driver.reporting``) calls ``on_run_start``,
``start_stage``, ``update``, ``end_stage`` and ``on_run_end`` here, also for a distributed fit
(rank 0's events are replayed on the driver). So there is exactly one bar, in the user's
terminal.

Three ways to show progress, chosen at each run start:

* a terminal (stderr is a TTY): tqdm bars, "Epoch N" with the metrics as postfix, a nested bar
  for validation, one for sanity checking and testing;
* a notebook (IPython kernel): the same with ``tqdm.auto`` widgets;
* anything else (CI logs, pipes, files): no carriage-return redraws, one plain line per finished
  epoch or evaluation run on stdout, e.g. ``Epoch 3: 100/100 [12.3 it/s] loss=0.123``.

A subclass customises the bar as it would Lightning's ``TQDMProgressBar``: ``init_train_tqdm``
(and ``init_validation_tqdm``, ``init_sanity_tqdm``, ``init_test_tqdm``, ``init_predict_tqdm``)
return the tqdm bar to draw, ``get_metrics(trainer, pl_module)`` the postfix, the
``*_description`` properties the titles. They run here, on the driver, for a distributed fit too
(where ``trainer`` is the driver's Trainer). A subclass that builds its own tqdm bars gets them
even where stderr is not a terminal, as Lightning always draws them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ray_lit.callbacks.base import Callback

_PAD_SIZE = 5
# the stage's title (a description property) and the method that builds its bar
_DESCRIPTIONS = {"validate": "validation_description", "sanity_check": "sanity_check_description",
                 "test": "test_description", "predict": "predict_description"}
_INITS = {"train": "init_train_tqdm", "validate": "init_validation_tqdm",
          "sanity_check": "init_sanity_tqdm", "test": "init_test_tqdm",
          "predict": "init_predict_tqdm"}
# Lightning's bar attributes, by the stages they show (sanity checking uses the validation bar)
_BAR_STAGES = {"train": ("train",), "val": ("validate", "sanity_check"), "test": ("test",),
               "predict": ("predict",)}
_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


def _in_notebook() -> bool:
    """Whether this process is an IPython kernel (Jupyter, Colab), where widgets render."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ipython = shell.get_ipython()
    except AttributeError:
        return False
    if ipython is None:
        return False
    return type(ipython).__name__ == "ZMQInteractiveShell" or \
        "IPKernelApp" in getattr(ipython, "config", {})


def _display_mode() -> str:
    """``"notebook"``, ``"terminal"`` or ``"plain"`` (no redraws)."""
    if _in_notebook():
        return "notebook"
    stream = sys.stderr
    return "terminal" if stream is not None and stream.isatty() else "plain"


def _format_num(value: Any) -> str:
    """Lightning's bar formatting: 3 significant digits, floats padded to 5 characters."""
    padded = isinstance(value, (float, str))
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return str(value)
    if not isinstance(value, str):
        short = f"{value:.3g}".replace("+0", "+").replace("-0", "-")
        value = short if len(short) < len(str(value)) else str(value)
    if padded and "e" not in value:
        if "." not in value and len(value) < _PAD_SIZE:
            try:
                float(value)
            except ValueError:
                return value
            value += "."
        value += "0" * (_PAD_SIZE - len(value))
    return value


def _format_rate(n_done: int, seconds: float) -> str:
    if n_done <= 0 or seconds <= 0:
        return "? it/s"
    rate = n_done / seconds
    return f"{rate:.1f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it"


@dataclass
class _StageState:
    """What is known about the stage in progress (kept for the plain summary line)."""

    total: int | None
    epoch: int
    max_epochs: int | None
    started: float = field(default_factory=time.monotonic)
    n_done: int = 0
    drawn: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


class ProgressBar(Callback):
    """tqdm progress bars, or plain lines when stderr is not a terminal.

    Args:
        refresh_rate: redraw every this many batches (0 disables the bar).
        process_position: row offset of the bars, for several trainers at once.
        leave: keep each finished epoch's bar on screen (otherwise one bar is reused).
    """

    BAR_FORMAT = _BAR_FORMAT

    def __init__(self, refresh_rate: int = 1, process_position: int = 0,
                 leave: bool = False) -> None:
        self.refresh_rate = int(refresh_rate)
        self.process_position = process_position
        self.leave = leave
        self._enabled = True
        self._mode = "plain"
        self._run_stage: str | None = None
        self._stages: dict[str, _StageState] = {}
        self._bars: dict[str, Any] = {}
        self._metrics: dict[str, Any] = {}  # what ``get_metrics`` returns: the train bar's
        self._opening_total: int | None = None  # the total of the bar an ``init_*`` builds
        self._trainer: Any = None

    # --- switching ----------------------------------------------------------------------------
    def disable(self) -> None:
        """Show nothing (``enable_progress_bar=False``)."""
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.refresh_rate > 0

    @property
    def is_disabled(self) -> bool:
        return not self.is_enabled

    # --- what a subclass customises (Lightning's TQDMProgressBar names) -----------------------
    @property
    def trainer(self) -> Any:
        """The Trainer this bar belongs to (the driver's, for a distributed fit)."""
        if self._trainer is None:
            raise TypeError(f"The `{type(self).__name__}._trainer` reference has not been set "
                            "yet: the bar is not attached to a Trainer.")
        return self._trainer

    def on_init_end(self, trainer: Any) -> None:
        """Driver, in ``Trainer.__init__``: remember the Trainer for ``get_metrics``."""
        self._trainer = trainer

    @property
    def sanity_check_description(self) -> str:
        return "Sanity Checking"

    @property
    def train_description(self) -> str:
        return "Training"

    @property
    def validation_description(self) -> str:
        return "Validation"

    @property
    def test_description(self) -> str:
        return "Testing"

    @property
    def predict_description(self) -> str:
        return "Predicting"

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """The items of the training bar's postfix; override to add or drop some. Driver.

        Args:
            trainer: the driver's Trainer (for a distributed fit it does not train: read the
                metrics from the returned items, not from its optimizers).
            pl_module: the Trainer's module.

        Returns:
            The standard items (``v_num``, the running ``loss``) and the ``prog_bar``
            metrics, as of the last update.
        """
        return dict(self._metrics)

    def _tqdm(self, desc: str, position: int, leave: bool, **options: Any) -> Any:
        total = self._opening_total
        bar = self._tqdm_class()(
            desc=desc, total=total, position=2 * self.process_position + position,
            leave=leave, disable=self.is_disabled, dynamic_ncols=True, file=sys.stderr,
            bar_format=self.BAR_FORMAT if total is not None else None, **options)
        bar._ray_lit_formats = True  # postfix numbers padded as Lightning's own bar pads them
        return bar

    def init_sanity_tqdm(self) -> Any:
        """The bar of the sanity check; override to customise it (driver)."""
        return self._tqdm(self.sanity_check_description, 0, leave=False)

    def init_train_tqdm(self) -> Any:
        """The training bar (one per epoch with ``leave=True``); override to customise it."""
        return self._tqdm(self.train_description, 0, leave=True, smoothing=0)

    def init_validation_tqdm(self) -> Any:
        """The validation bar, nested under the training bar during ``fit``; override to
        customise it (driver)."""
        in_fit = self._run_stage == "fit"
        # a standalone evaluation bar stays, like the last epoch's; nested ones vanish
        return self._tqdm(self.validation_description, 1 if in_fit else 0, leave=not in_fit)

    def init_test_tqdm(self) -> Any:
        """The test bar; override to customise it (driver)."""
        return self._tqdm(self.test_description, 0, leave=True)

    def init_predict_tqdm(self) -> Any:
        """The prediction bar; override to customise it (driver)."""
        return self._tqdm(self.predict_description, 0, leave=False, smoothing=0)

    def _bar_of(self, kind: str) -> Any:
        bar = next((self._bars[s] for s in _BAR_STAGES[kind] if s in self._bars), None)
        if bar is None:
            raise TypeError(f"The `{type(self).__name__}._{kind}_progress_bar` reference has "
                            "not been set yet.")
        return bar

    @property
    def train_progress_bar(self) -> Any:
        return self._bar_of("train")

    @property
    def val_progress_bar(self) -> Any:
        return self._bar_of("val")

    @property
    def test_progress_bar(self) -> Any:
        return self._bar_of("test")

    @property
    def predict_progress_bar(self) -> Any:
        return self._bar_of("predict")

    def _builds_own_bars(self) -> bool:
        """Whether a subclass overrides one of the ``init_*_tqdm`` methods."""
        return any(getattr(type(self), name) is not getattr(ProgressBar, name)
                   for name in _INITS.values())

    def _title(self, stage: str) -> str:
        name = _DESCRIPTIONS.get(stage)
        return getattr(self, name) if name else stage.capitalize()

    def _postfix_items(self, bar: Any = None) -> dict[str, Any]:
        """``get_metrics``'s items for ``bar``: formatted by ray_lit for its own bars; a bar
        the user built gets numbers, which it formats itself (as under Lightning)."""
        trainer = self._trainer
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        items = self.get_metrics(trainer, module)
        if bar is None or getattr(bar, "_ray_lit_formats", False):
            return self._postfix(items)
        return {str(k): v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
                for k, v in items.items()}

    # --- the driver's calls -------------------------------------------------------------------
    def on_run_start(self, stage: str) -> None:
        """A ``fit``, ``validate`` or ``test`` call begins; picks how to display it."""
        if not self.is_enabled:
            return
        self._close_bars()
        self._stages.clear()
        self._metrics = {}
        self._run_stage = stage
        self._mode = _display_mode()
        if self._mode == "plain" and self._builds_own_bars():
            self._mode = "terminal"  # the user's own tqdm bars are drawn, as Lightning does

    def start_stage(self, stage: str, total: int | None, epoch: int,
                    max_epochs: int | None) -> None:
        """A training epoch or an evaluation run begins.

        Args:
            stage: ``"train"``, ``"validate"``, ``"test"``, ``"predict"`` or
                ``"sanity_check"``.
            total: batches in this stage, or None when unknown (iterable datasets).
            epoch: the current epoch (0-based, shown as "Epoch N").
            max_epochs: the epoch limit, if any.
        """
        if not self.is_enabled:
            return
        self._stages[stage] = _StageState(total, epoch, max_epochs)
        if self._mode != "plain":
            self._open_bar(stage, total, epoch)

    def update(self, stage: str, n_done: int, metrics: dict[str, float | int | str]) -> None:
        """``n_done`` batches of ``stage`` are done; ``metrics`` are what the bar shows.

        Updates may come at any cadence (every batch in process, every few hundred ms when
        replayed from workers); the bar redraws when ``n_done`` crosses a multiple of
        ``refresh_rate`` or reaches the total.
        """
        if self._record(stage, n_done, metrics):
            self._draw(stage, n_done, metrics)

    def _record(self, stage: str, n_done: int, metrics: dict[str, float | int | str]) -> bool:
        """Note the stage's progress; True when the bar is due for a redraw."""
        state = self._stages.get(stage)
        if not self.is_enabled or state is None:
            return False
        state.n_done = n_done
        state.metrics = dict(metrics)
        if stage == "train":
            self._metrics = dict(metrics)
        due = n_done // self.refresh_rate > state.drawn // self.refresh_rate
        if not (due or n_done == state.total):
            return False
        state.drawn = n_done
        return True

    def _draw(self, stage: str, n_done: int, metrics: dict[str, float | int | str]) -> None:
        bar = self._bars.get(stage)
        if bar is not None:
            bar.n = n_done
            if stage == "train":
                bar.set_postfix(self._postfix_items(bar), refresh=False)
            bar.refresh()

    def end_stage(self, stage: str) -> None:
        """The stage finished: close its bar (terminal) or print its summary line (plain)."""
        state = self._stages.pop(stage, None)
        if not self.is_enabled or state is None:
            return
        train = self._stages.get("train")
        merged = stage == "validate" and train is not None
        if merged:
            # validation inside a training epoch: its metrics belong on the epoch's bar and line
            train.metrics.update(state.metrics)
            self._metrics = dict(train.metrics)
            if "train" in self._bars:
                self._bars["train"].set_postfix(self._postfix_items(self._bars["train"]))
        if self._mode == "plain":
            line = self._summary_line(stage, state, merged)
            if line:
                print(line, flush=True)
            return
        bar = self._bars.get(stage)
        if bar is None:
            return
        if stage == "train" and not self.leave:
            bar.n = state.n_done
            bar.refresh()  # kept and reset for the next epoch
            return
        bar.n = state.n_done
        bar.refresh()
        bar.close()
        del self._bars[stage]

    def on_run_end(self) -> None:
        """The ``fit``/``validate``/``test`` call ended (also on errors): close every bar."""
        self._close_bars()
        self._stages.clear()
        self._run_stage = None

    def print(self, *args: Any, sep: str = " ", end: str = "\n") -> None:
        """Print without breaking the bars (``tqdm.write`` while they are shown)."""
        text = sep.join(str(a) for a in args)
        if self._bars:
            self._tqdm_class().write(text, end=end)
        else:
            print(text, end=end)

    # --- drawing ------------------------------------------------------------------------------
    def _tqdm_class(self) -> Any:
        if self._mode == "notebook":
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
        return tqdm

    def _open_bar(self, stage: str, total: int | None, epoch: int) -> None:
        self._opening_total = total
        if stage == "train":
            bar = self._bars.get("train")
            if bar is None:  # the first epoch, or each epoch with leave=True (a bar each)
                bar = self._bars["train"] = self.init_train_tqdm()
            # as Lightning: whatever the bar was built with, each epoch is titled by its number
            bar.set_description(f"Epoch {epoch}", refresh=False)
            bar.reset(total=total)
            return
        self._close_bar(stage)
        init = _INITS.get(stage)
        bar = getattr(self, init)() if init else self._tqdm(self._title(stage), 0, leave=False)
        # as Lightning: the stage's description titles the bar, the rest is the built bar's
        bar.set_description(self._title(stage), refresh=False)
        bar.reset(total=total)
        self._bars[stage] = bar

    def _close_bar(self, stage: str) -> None:
        bar = self._bars.pop(stage, None)
        if bar is not None:
            bar.close()

    def _close_bars(self) -> None:
        # nested bars first so the main bar ends up last on screen
        for stage in sorted(self._bars, key=lambda s: s == "train"):
            self._close_bar(stage)

    @staticmethod
    def _postfix(metrics: dict[str, Any]) -> dict[str, str]:
        return {str(k): _format_num(v) for k, v in metrics.items()}

    def _summary_line(self, stage: str, state: _StageState, merged: bool) -> str | None:
        if stage == "sanity_check" or merged:
            return None  # the epoch line carries validation's metrics
        seconds = time.monotonic() - state.started
        count = f"{state.n_done}/{state.total}" if state.total is not None else str(state.n_done)
        title = f"Epoch {state.epoch}" if stage == "train" else self._title(stage)
        line = f"{title}: {count} [{_format_rate(state.n_done, seconds)}]"
        # a validation outside any epoch (after the last one, say) shows its own metrics
        in_fit_eval = stage == "validate" and self._run_stage == "fit"
        if stage == "train" and state.metrics:
            line += " " + " ".join(f"{k}={v}" for k, v in self._postfix_items().items())
        elif in_fit_eval and state.metrics:
            line += " " + " ".join(f"{k}={v}" for k, v in self._postfix(state.metrics).items())
        return line

    def __getstate__(self) -> dict[str, Any]:
        # tqdm bars hold streams and locks, the Trainer its run: copies start without them
        state = dict(self.__dict__)
        state["_bars"] = {}
        state["_stages"] = {}
        state["_trainer"] = None
        return state


TQDMProgressBar = ProgressBar
