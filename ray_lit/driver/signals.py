"""``SignalHandlers``: what SIGTERM and Ctrl-C mean to the driver while attempts run (driver)."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["SignalHandlers"]


class SignalHandlers:
    """While attempts run on the main thread: a SIGTERM asks for a checkpoint-and-stop, and a
    Ctrl-C (SIGINT with Python's default handler) is remembered as well as raised, so the
    supervision raises it again should the first ``KeyboardInterrupt`` land in code that
    swallows it (a Ctrl-C never leaves the group training).

    Args:
        preempt: set on SIGTERM (the controller stops at a common step, checkpointing).
        interrupted: set on Ctrl-C.
    """

    def __init__(self, preempt: threading.Event, interrupted: threading.Event) -> None:
        self.preempt = preempt
        self.interrupted = interrupted
        self.previous: dict[int, Any] = {}

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.interrupted.set()
        raise KeyboardInterrupt

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.preempt.set()

    def __enter__(self) -> SignalHandlers:
        if threading.current_thread() is threading.main_thread():
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
