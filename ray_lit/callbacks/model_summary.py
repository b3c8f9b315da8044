"""``ModelSummary``: choose the depth of the layer table printed once at the start of ``fit``.

The table is ``ray_lit.core.summary.ModelSummary``; the fit stage prints it on global rank 0
through the trainer's event sink, right after ``on_fit_start``, so it appears once, in the
driver's terminal, also for a distributed fit. Without this callback,
``Trainer(enable_model_summary=True)`` (the default) prints a depth-1 table; with it, its
``max_depth`` decides (2.x: the callback replaces the default table, and ``max_depth=0`` prints
none).
"""

from __future__ import annotations

from typing import Any

from ray_lit.callbacks.base import Callback
from ray_lit.errors import MisconfigurationException


class ModelSummary(Callback):
    """Print the module's layers down to ``max_depth`` when ``fit`` starts (global rank 0).

    Args:
        max_depth: 1 = direct children, 2 = their children too, -1 = every submodule, 0 = no
            table at all.
        **summarize_kwargs: accepted for Lightning compatibility and ignored (2.x passes them
            to its own formatter).

    Raises:
        MisconfigurationException: ``max_depth`` is not an int >= -1.
    """

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            raise MisconfigurationException(
                f"ModelSummary(max_depth={max_depth!r}): use an int >= -1 (-1: every layer, "
                "0: no summary).")
        self._max_depth = max_depth
        self._summarize_kwargs = summarize_kwargs

    @property
    def max_depth(self) -> int:
        """The depth the fit stage prints the table at (read by ``loop.stages``)."""
        return self._max_depth
