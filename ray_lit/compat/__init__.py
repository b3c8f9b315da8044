"""Run unchanged Lightning code on ray_lit.

While installed, ``import pytorch_lightning`` (and its submodules, ``lightning`` and
``lightning.pytorch``) resolves to ray_lit's stand-ins, and every ``Trainer`` the code builds gets
the run's options on top of its own (``num_workers=2`` turns a script's ``Trainer(...)`` into a
2-worker Ray run)::

    import ray_lit.compat
    ray_lit.compat.install(num_workers=2)        # a notebook: from here on
    import pytorch_lightning as pl               # -> ray_lit

    with ray_lit.compat.lightning_on_ray(num_workers=2):   # or only inside a block
        run_my_lightning_code()

``python -m ray_lit --workers 2 train.py --max_epochs 3`` does the same for a script. Nothing
changes outside such a run: a real Lightning installed alongside is untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ray_lit.compat.finder import install_finder, is_installed, uninstall_finder
from ray_lit.config import run_overrides, set_run_overrides

__all__ = ["install", "is_installed", "lightning_on_ray", "uninstall"]

_previous: list[dict[str, Any]] = []
# read by ray_lit's Ray workers: "module:function" hooks they run before unpickling the run
WORKER_SETUP_ENV = "RAY_LIT_WORKER_SETUP"
_WORKER_HOOK = "ray_lit.compat.finder:install_finder"


def install(**trainer_options: Any) -> None:
    """Resolve Lightning imports to ray_lit and apply ``trainer_options`` to every Trainer.

    Args:
        **trainer_options: Trainer options that override what the code passes (for example
            ``num_workers=2``, ``use_gpu=True``, ``storage_path="s3://bucket/runs"``); they
            are validated when a Trainer is built.
    """
    _previous.append(run_overrides())
    set_run_overrides(trainer_options)
    install_finder()
    # Ray workers of this run install the aliases too, before they unpickle the user's module
    os.environ[WORKER_SETUP_ENV] = _WORKER_HOOK


def uninstall() -> None:
    """Undo ``install``: Lightning imports resolve normally again, Trainers get no overrides."""
    set_run_overrides(_previous.pop() if _previous else {})
    if not _previous:
        uninstall_finder()
        if os.environ.get(WORKER_SETUP_ENV) == _WORKER_HOOK:
            del os.environ[WORKER_SETUP_ENV]


@contextlib.contextmanager
def lightning_on_ray(**trainer_options: Any) -> Iterator[None]:
    """``install(**trainer_options)`` for the duration of a ``with`` block."""
    install(**trainer_options)
    try:
        yield
    finally:
        uninstall()
