"""Liveness: what tells a slow rank from a hung one.

The loop counts every batch it starts, in every stage (``Liveness.beat``); the worker's poll
reports how long the count has not moved. A phase the user knows is long and shows no batches
(loading shards, a big compile, an evaluation outside the loop) is marked with
``ray_lit.long_phase()``: while it lasts the rank is never declared hung.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_long_phases = 0


@contextlib.contextmanager
def long_phase(name: str = "") -> Iterator[None]:
    """Mark a phase without batches that may take long (any rank, any thread)::

        with ray_lit.long_phase("loading the embedding table"):
            self.table = load_table(path)

    The driver's hang detection (``worker_hang_timeout_s``) does not count it. Nested phases
    are fine. ``name`` is for the reader.
    """
    global _long_phases
    with _lock:
        _long_phases += 1
    try:
        yield
    finally:
        with _lock:
            _long_phases -= 1


def in_long_phase() -> bool:
    """Whether a long phase is marked in this process now."""
    return _long_phases > 0
