"""A bounded write probe of a remote ``storage_path``, on the driver before workers start.

A file system that is not there does not always fail: ``gs://`` without credentials on a
machine without Google's metadata server, or an endpoint that drops packets, makes the client
retry for many minutes. ``probe_storage`` runs ``Storage.check_writable`` in a thread and gives
up after ``PROBE_TIMEOUT_S``, so ``fit`` fails in seconds with the option and the fix named.
"""

from __future__ import annotations

import threading
from typing import Any

from ray_lit.errors import MisconfigurationException
from ray_lit.storage.filesystem import Storage

# a healthy object store answers a small write, read and delete in well under a second
PROBE_TIMEOUT_S = 30.0


def probe_storage(uri: str, timeout_s: float | None = None, retry: Any = None) -> None:
    """Create ``uri`` and write, read back and delete a probe file in it (driver, before any
    worker starts), giving up after ``timeout_s`` (default ``PROBE_TIMEOUT_S``).

    A probe that does not return in time is left to finish in its daemon thread: a client
    stuck in its own retries cannot be interrupted from Python.

    Args:
        uri: the storage root.
        timeout_s: how long the probe may take.
        retry: a ``StorageRetry`` that waits out transient errors first (a rerun of a named
            run), or None.

    Raises:
        MisconfigurationException: the storage refused the probe, or did not answer in time;
            both name ``storage_path`` and the fix.
        StorageUnavailableError: with ``retry``, storage kept failing past its bound.
    """
    limit = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    if retry is not None:  # a rerun waits out an outage first (``storage.retry.launch_retry``)
        limit += retry.timeout_s
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            Storage(uri, retry=retry).check_writable()
            outcome["ok"] = True
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=probe, daemon=True, name="ray_lit-storage-probe")
    thread.start()
    thread.join(limit)
    if "error" in outcome:
        raise outcome["error"]
    if "ok" not in outcome:
        raise MisconfigurationException(
            f"storage_path {uri!r} did not answer a small write within {limit:.0f} s (no "
            "credentials, an endpoint that is not reachable, or no network). Pass a "
            "storage_path= this machine can write to: check the credentials (for gs://, "
            "GOOGLE_APPLICATION_CREDENTIALS; for s3://, AWS_ACCESS_KEY_ID or a profile) and "
            "the endpoint, or use a local directory.")
