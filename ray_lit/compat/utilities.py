"""What 0.9 code imports from ``pytorch_lightning.utilities`` / ``.core.decorators``.

``rank_zero_only`` and friends read the process's global rank when called (``torch.distributed``
if a group is up, else the ``RANK`` environment variable a ray_lit worker sets), so a function
decorated at import time on the driver still knows its rank inside a worker.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from ray_lit.core.cli_args import str_to_bool as str_to_bool

F = TypeVar("F", bound=Callable[..., Any])

# 0.9 ``pytorch_lightning._logger``: the package's logger, named as Lightning named it
log = logging.getLogger("lightning")


def _global_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # a half-torn-down group: fall back to the environment
        pass
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def rank_zero_only(fn: F) -> F:
    """Run ``fn`` on global rank 0 only (elsewhere it returns None).

    Example:
        >>> @rank_zero_only
        ... def hello():
        ...     return "hi"
        >>> hello()
        'hi'
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        rank = getattr(rank_zero_only, "rank", None)
        if (_global_rank() if rank is None else rank) == 0:
            return fn(*args, **kwargs)
        return None

    return wrapped  # type: ignore[return-value]


# 0.9 let trainers pin the rank here; None means "ask the process"
rank_zero_only.rank = None  # type: ignore[attr-defined]


@rank_zero_only
def rank_zero_warn(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """``warnings.warn`` on global rank 0 only."""
    warnings.warn(*args, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_info(*args: Any, **kwargs: Any) -> None:
    """``log.info`` on global rank 0 only."""
    log.info(*args, **kwargs)


@rank_zero_only
def rank_zero_debug(*args: Any, **kwargs: Any) -> None:
    """``log.debug`` on global rank 0 only."""
    log.debug(*args, **kwargs)


def auto_move_data(fn: F) -> F:
    """0.9's decorator that moved ``forward``'s inputs to the module's device.

    ray_lit already moves every batch to the module's device before a step, so this returns
    ``fn`` unchanged.
    """
    return fn


def move_data_to_device(batch: Any, device: Any) -> Any:
    """Move every tensor in a nested batch to ``device`` (0.9 ``utilities.apply_func``)."""
    from ray_lit.core.batch import move_to_device

    return move_to_device(batch, device)


def _version() -> str:
    from ray_lit._version import __version__ as version

    return version


# ``pytorch_lightning.__version__`` inside a ray_lit run: ray_lit's own version
__version__ = _version()
