"""ray_lit: Lightning-style modules trained on a Ray cluster with DDP.

The one path every run takes::

    Trainer.fit / ray_lit.fit                       (ray_lit/driver/: the user's process)
      │ validate module + options (fail fast, before any worker starts)
      │ ship module + dataloaders once (cloudpickle -> object store)
      ▼
    controller ── placement group ──▶ worker actor x N (ray_lit/worker/: one DDP replica each)
      │  ◀── metric / progress events (batched) ──  the loop: module hooks in order,
      │  loggers + progress bar + history            per-rank sampler, DDP, accumulation
      │  ◀── "checkpoint written" ─────────────────  rank 0 writes model parts
      │  commit manifest (atomic) ──▶ storage (pyarrow.fs)
      ▼
    rank 0's weights back in the user's module; metrics, epoch, step on the Trainer

``num_workers=0`` (the default) runs the same loop in this process with no Ray at all.

Public names are loaded lazily so ``import ray_lit`` stays cheap (no torch.distributed or Ray
import until they are used).
"""

from __future__ import annotations

import importlib
from typing import Any

from ray_lit._version import __version__ as __version__

_PUBLIC = {
    "LightningModule": "ray_lit.core.module",
    "LightningDataModule": "ray_lit.core.datamodule",
    "TrainResult": "ray_lit.core.results",
    "EvalResult": "ray_lit.core.results",
    "Trainer": "ray_lit.trainer",
    "fit": "ray_lit.trainer",
    "seed_everything": "ray_lit.core.seed",
    "MisconfigurationException": "ray_lit.errors",
    "TrainingFailedError": "ray_lit.errors",
    "Callback": "ray_lit.callbacks.base",
    "TrainerState": "ray_lit.loop.trainer_state",
    "PreemptionStop": "ray_lit.errors",
    "long_phase": "ray_lit.loop.liveness",
}
_SUBMODULES = {"callbacks", "loggers", "metrics", "tune", "core", "loop", "driver", "worker",
               "storage", "checkpoint", "testing", "errors", "trainer", "compat", "strategies",
               "messages"}

__all__ = sorted([*_PUBLIC, "callbacks", "loggers", "metrics", "__version__"])


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"ray_lit.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'ray_lit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
