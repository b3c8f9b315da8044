"""Retrying storage operations: which errors are worth another try, and how long to keep trying.

Storage fails in ways that heal on their own: an S3 endpoint throttles (``SlowDown``, 503) or
restarts (connection refused, a reset mid-upload), a disk fills up until an operator frees
space, a mount turns read-only for a while. ``StorageRetry`` retries such failures with
exponential backoff and jitter until the storage has been failing for ``timeout_s`` (the
``storage_retry_timeout_s`` Trainer option), then raises ``StorageUnavailableError`` naming the
URI and the option.

The clock is per outage, not per call: it starts at the first failure and stops at the next
success, so a checkpoint write that gives way to a newer one continues the same outage instead
of restarting the bound. A full disk or a read-only directory is retried as well (an operator
may fix it) but logged as a warning at once, because it rarely heals without help.

Answers that are not faults (a file that does not exist, a path that is a directory) and
errors that are not I/O (``ValueError`` from a bad URI) are raised at once.
"""

from __future__ import annotations

import errno
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("ray_lit")

T = TypeVar("T")

__all__ = ["DEFAULT_TIMEOUT_S", "StorageRetry", "StorageUnavailableError", "is_transient",
           "launch_retry",
           "needs_operator"]

DEFAULT_TIMEOUT_S = 300.0
# first pause and the ceiling of the exponential backoff (seconds): a throttling S3 asks for a
# slower client within a second, and an outage is polled at least every 10 s once it lasts
_BASE_DELAY_S = 0.2
_MAX_DELAY_S = 10.0

# answers, not faults: retrying cannot change them
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)
# errors that need someone to act (free space, make the directory writable, fix credentials)
_OPERATOR_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_OPERATOR_TEXT = ("No space left", "Read-only file system", "Permission denied",
                  "AccessDenied", "Disk quota")


class StorageUnavailableError(RuntimeError):
    """Storage kept failing for longer than ``storage_retry_timeout_s``.

    Raised on the rank whose write gave up (a worker's checkpoint part, the driver's manifest),
    so ``fit`` raises it as itself. Everything committed before the outage is intact: run the
    same script again (same ``storage_path`` and ``run_name``) once the storage is back.

    Attributes:
        uri: the file or directory the operation was about.
    """

    def __init__(self, message: str, uri: str = "") -> None:
        super().__init__(message)
        self.uri = uri

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.uri))


def is_transient(err: BaseException) -> bool:
    """Whether another try of the operation that raised ``err`` may succeed.

    Every ``OSError`` (pyarrow raises ``OSError`` for S3 throttling, refused connections,
    truncated uploads and HTTP 5xx) except a missing file or a wrong file type. Torch's
    archive writer reports a failed write as ``RuntimeError`` and is recognised by its text.
    """
    if isinstance(err, _PERMANENT):
        return False
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and "file write failed" in str(err)


def needs_operator(err: BaseException) -> bool:
    """A full disk, a read-only directory or missing permissions: retried, but worth a warning
    at the first failure (it rarely heals by itself)."""
    if isinstance(err, OSError) and err.errno in _OPERATOR_ERRNOS:
        return True
    return any(text in str(err) for text in _OPERATOR_TEXT)


class StorageRetry:
    """Retry policy and outage clock for the storage operations of one process-side user
    (the driver's ``CheckpointManager``, one worker's ``CheckpointWriter``).

    Picklable: it travels to the workers with the writer (the clock does not).

    Args:
        timeout_s: how long storage may keep failing before ``StorageUnavailableError``; 0
            tries once.
        base_delay_s: the first pause; each further one doubles, up to ``max_delay_s``, and a
            random part (half of it) keeps many ranks from retrying in lockstep.
        max_delay_s: the longest pause between two tries.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, base_delay_s: float = _BASE_DELAY_S,
                 max_delay_s: float = _MAX_DELAY_S) -> None:
        self.timeout_s = float(timeout_s)
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._failing_since: float | None = None
        self._failures = 0
        self.retries = 0  # failed tries over this object's life (benchmarks read it)
        self.outages = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_failing_since"], state["_failures"] = None, 0
        return state

    @property
    def failing_for_s(self) -> float:
        """Seconds since the current outage began (0 when storage works)."""
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    def call(self, fn: Callable[[], T], *, what: str, uri: str,
             cancel: threading.Event | None = None) -> T | None:
        """``fn()``, tried again after transient errors until the outage lasts ``timeout_s``.

        Args:
            fn: the storage operation (it must be safe to repeat: whole-file writes are).
            what: a few words for messages ("write", "list", ...).
            uri: the full path or URI the operation is about (for messages).
            cancel: set it to stop retrying (a newer checkpoint replaced this write); the
                call then returns None without raising.

        Returns:
            What ``fn`` returned, or None when ``cancel`` was set.

        Raises:
            StorageUnavailableError: storage failed for longer than ``timeout_s``.
            Exception: a non-transient error of ``fn``, at once.
        """
        while True:
            if cancel is not None and cancel.is_set():
                return None
            try:
                result = fn()
            except Exception as err:  # classified right below
                if not is_transient(err):
                    raise
                delay = self.failed(err, what=what, uri=uri)
                if cancel is not None:
                    if cancel.wait(delay):
                        return None
                else:
                    time.sleep(delay)
                continue
            self.succeeded(uri)
            return result

    def failed(self, err: BaseException, *, what: str, uri: str) -> float:
        """Record a transient failure; the pause before the next try.

        Raises:
            StorageUnavailableError: the outage has lasted ``timeout_s``.
        """
        now = time.monotonic()
        self.retries += 1
        if self._failing_since is None:
            self._failing_since = now
            self._failures = 0
            self.outages += 1
            hint = (" (a full disk, a read-only directory or missing permissions: it needs "
                    "someone to free space or fix access)" if needs_operator(err) else "")
            log.warning("ray_lit: storage %s of %s failed: %s%s; retrying with backoff for up "
                        "to storage_retry_timeout_s=%g s while training goes on", what, uri,
                        _short(err), hint, self.timeout_s)
        self._failures += 1
        elapsed = now - self._failing_since
        if elapsed >= self.timeout_s:
            raise StorageUnavailableError(
                f"ray_lit: storage {uri} kept failing for {elapsed:.0f} s ({what}: "
                f"{_short(err)}), longer than storage_retry_timeout_s={self.timeout_s:g}. "
                "Checkpoints committed before the outage are intact: fix the storage (free "
                "space, permissions, the endpoint) and run again with the same storage_path "
                "and run_name to resume, or raise storage_retry_timeout_s to wait longer.",
                uri=uri) from err
        step = min(self.max_delay_s, self.base_delay_s * 2 ** min(self._failures - 1, 30))
        delay = step / 2 + random.uniform(0, step / 2)
        return max(0.0, min(delay, self.timeout_s - elapsed))

    def succeeded(self, uri: str) -> None:
        """An operation worked: an outage in progress is over."""
        if self._failing_since is not None:
            log.warning("ray_lit: storage %s works again after %.1f s (%d failed tries)", uri,
                        time.monotonic() - self._failing_since, self._failures)
            self._failing_since = None
            self._failures = 0


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def launch_retry(run_name: str | None, resume: Any, timeout_s: float | None) -> StorageRetry | None:
    """How the driver's write probe before a launch treats a storage outage (driver only).

    A rerun that continues a named run (``run_name=`` given, ``resume="auto"``: a restarted
    driver, a resubmitted job) waits for its storage as a running run does, up to
    ``storage_retry_timeout_s``: the storage was there before and an outage is the likely
    cause. A new run (no ``run_name``) or one that does not resume tries once, so a mistyped
    endpoint fails in seconds.
    """
    if run_name is None or resume != "auto":
        return None
    return StorageRetry(DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
