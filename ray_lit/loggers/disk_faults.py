"""``DiskGuard``: a logger's file writes never end the run.

Loggers write on the driver, on the local disk. A full disk or a directory that turned
read-only must not stop a run whose checkpoints may still be fine, so the CSV and TensorBoard
loggers send their writes through a guard: a write that fails logs one warning (per outage),
the logger keeps what it can (the CSV logger keeps its rows buffered, the TensorBoard logger
drops the scalars of that moment) and the write is tried again later, with a backoff so that a
full disk is not hammered at every step. When a write works again, one line says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("ray_lit")

# seconds between tries while writes fail: from the first to the longest pause
_FIRST_PAUSE_S = 1.0
_LONGEST_PAUSE_S = 60.0


class DiskGuard:
    """Failure state of one logger's writes (driver only).

    Args:
        owner: how messages name the logger and its directory.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.failures = 0  # failed writes over the logger's life
        self._failing_since: float | None = None
        self._pause_s = _FIRST_PAUSE_S
        self._next_try = 0.0

    @property
    def failing(self) -> bool:
        """Whether the last write failed."""
        return self._failing_since is not None

    def ready(self) -> bool:
        """Whether a write may be tried now (always, unless a failure's pause is running)."""
        return self._failing_since is None or time.monotonic() >= self._next_try

    def run(self, write: Callable[[], object], what: str) -> bool:
        """``write()``; an ``OSError`` is recorded instead of raised. Returns success."""
        try:
            write()
        except OSError as err:
            self.failed(err, what)
            return False
        self.succeeded()
        return True

    def failed(self, err: BaseException, what: str) -> None:
        """Record a failed write: one warning per outage, then a growing pause."""
        self.failures += 1
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._pause_s = _FIRST_PAUSE_S
            log.warning("ray_lit: %s could not %s (%s: %s); training goes on, and the logger "
                        "tries again later (free space or fix the directory's permissions)",
                        self.owner, what, type(err).__name__, err)
        else:
            self._pause_s = min(_LONGEST_PAUSE_S, self._pause_s * 2)
        self._next_try = now + self._pause_s

    def succeeded(self) -> None:
        """A write worked: an outage in progress is over."""
        if self._failing_since is not None:
            log.warning("ray_lit: %s writes again after %.0f s", self.owner,
                        time.monotonic() - self._failing_since)
            self._failing_since = None
