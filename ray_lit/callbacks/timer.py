"""``Timer``: stop training once a time budget is spent, and time each stage.

Every rank runs the callback and measures its own clock, but ranks start and finish batches at
slightly different moments, so two ranks could disagree about whether the budget is spent at a
given batch. One rank stopping while the other trains on would leave the other waiting forever in
its next collective. So, as ``EarlyStopping``'s decision, the stop decision is global rank 0's:
each check broadcasts rank 0's verdict to every rank (``strategy.agree_on_rank_zero``, a
collective every rank reaches at the same batch), and all ranks stop after the same batch.

The elapsed training time is part of the callback's state, so a run resumed from a checkpoint
(or restarted after a lost worker) continues the budget instead of starting it anew.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

from ray_lit.callbacks.base import Callback
from ray_lit.errors import MisconfigurationException

_STAGES = ("train", "sanity_check", "validate", "test", "predict")
_INTERVALS = ("step", "epoch")
_DURATION = re.compile(r"(\d+):(\d\d):(\d\d):(\d\d)")


def parse_duration(duration: str | timedelta | dict[str, int] | None) -> float | None:
    """Seconds in ``duration``: ``"DD:HH:MM:SS"``, a ``timedelta``, a dict of ``timedelta``
    keywords (``{"hours": 1}``) or None (no limit).

    Raises:
        MisconfigurationException: a string in another format, or another type.
    """
    if duration is None:
        return None
    if isinstance(duration, str):
        match = _DURATION.fullmatch(duration.strip())
        if match is None:
            raise MisconfigurationException(
                f"Timer(duration={duration!r}) is not a valid duration: write it as "
                "'DD:HH:MM:SS' (e.g. '00:12:00:00' for 12 hours).")
        days, hours, minutes, seconds = (int(g) for g in match.groups())
        duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(duration, dict):
        try:
            duration = timedelta(**duration)
        except TypeError as err:
            raise MisconfigurationException(
                f"Timer(duration={duration!r}): a dict holds timedelta keywords such as "
                "{'hours': 1, 'minutes': 30}.") from err
    if not isinstance(duration, timedelta):
        raise MisconfigurationException(
            f"Timer(duration={duration!r}): pass a 'DD:HH:MM:SS' string, a datetime.timedelta "
            "or a dict like {'hours': 1}.")
    return duration.total_seconds()


def _print_on_driver(trainer: Any, text: str) -> None:
    """Print on the driver: through the trainer's event sink (rank 0 of a worker group records
    the line and the driver replays it), or plainly without one."""
    sink = getattr(trainer, "_sink", None)
    if sink is not None:
        sink.print(text)
    else:
        print(text)


def _stage(stage: str) -> str:
    stage = getattr(stage, "value", stage)  # a Lightning ``RunningStage`` member
    if stage not in _STAGES:
        raise ValueError(f"Timer: unknown stage {stage!r}; use one of {list(_STAGES)}.")
    return stage


class Timer(Callback):
    """Stop training when ``duration`` has elapsed; time training, validation and testing.

    Args:
        duration: the training time budget: ``"DD:HH:MM:SS"``, a ``timedelta``, a dict of
            ``timedelta`` keywords, or None to only measure.
        interval: check after every training batch (``"step"``) or every training epoch
            (``"epoch"``).
        verbose: print a line on the driver when the budget stops training.

    Raises:
        MisconfigurationException: a malformed ``duration`` or an unknown ``interval``.

    Example::

        timer = Timer(duration="00:12:00:00")
        trainer = pl.Trainer(callbacks=[timer])
        trainer.fit(model)
        timer.time_elapsed("train")   # seconds (rank 0's measurement after a distributed fit)
    """

    def __init__(self, duration: str | timedelta | dict[str, int] | None = None,
                 interval: str = "step", verbose: bool = True) -> None:
        interval = getattr(interval, "value", interval)
        if interval not in _INTERVALS:
            raise MisconfigurationException(
                f"Timer(interval={interval!r}) is not supported: use 'step' or 'epoch'.")
        self._duration = parse_duration(duration)
        self._interval = interval
        self._verbose = verbose
        self._start_time: dict[str, float | None] = dict.fromkeys(_STAGES)
        self._end_time: dict[str, float | None] = dict.fromkeys(_STAGES)
        self._offset = 0.0  # training seconds spent before this process resumed the run

    # --- queries (any rank; on the driver after a distributed fit: rank 0's values) ---------
    def start_time(self, stage: str = "train") -> float | None:
        """``time.monotonic()`` when ``stage`` last started, or None."""
        return self._start_time[_stage(stage)]

    def end_time(self, stage: str = "train") -> float | None:
        """``time.monotonic()`` when ``stage`` last ended, or None (not ended yet)."""
        return self._end_time[_stage(stage)]

    def time_elapsed(self, stage: str = "train") -> float:
        """Seconds spent in ``stage`` (training includes the time before a resume)."""
        stage = _stage(stage)
        start, end = self._start_time[stage], self._end_time[stage]
        offset = self._offset if stage == "train" else 0.0
        if start is None:
            return offset
        if end is None:
            return time.monotonic() - start + offset
        return end - start + offset

    def time_remaining(self, stage: str = "train") -> float | None:
        """Seconds left of the budget (negative once over it), or None without a budget."""
        if self._duration is None:
            return None
        return self._duration - self.time_elapsed(stage)

    # --- measuring ------------------------------------------------------------------------------
    def _start(self, stage: str) -> None:
        self._start_time[stage] = time.monotonic()
        self._end_time[stage] = None

    def _end(self, stage: str) -> None:
        self._end_time[stage] = time.monotonic()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start("train")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._end("train")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._start("validate")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._end("validate")

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._start("test")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._end("test")

    # --- deciding (COLLECTIVE: every rank calls these at the same point) ------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # after a resume the restored budget may already be spent: check before any batch
        if self._duration is not None:
            self._check_time_remaining(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._interval == "step" and self._duration is not None:
            self._check_time_remaining(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._interval == "epoch" and self._duration is not None:
            self._check_time_remaining(trainer)

    def _check_time_remaining(self, trainer: Any) -> None:
        """Rank 0's verdict on the budget, on every rank (a broadcast when distributed)."""
        spent = self.time_elapsed("train") >= self._duration
        spent = trainer.strategy.agree_on_rank_zero(spent)  # COLLECTIVE
        trainer.should_stop = bool(trainer.should_stop) or spent
        if spent and self._verbose and trainer.is_global_zero:
            elapsed = timedelta(seconds=int(self.time_elapsed("train")))
            _print_on_driver(trainer, f"Time limit reached. Elapsed time is {elapsed}. "
                                      "Signaling Trainer to stop.")

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"time_elapsed": {stage: self.time_elapsed(stage) for stage in _STAGES}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._offset = float(state_dict.get("time_elapsed", {}).get("train", 0.0))
