"""``seed_everything`` and the RNG state that exact resume restores."""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch

_MAX_SEED = np.iinfo(np.uint32).max
SEED_ENV = "PL_GLOBAL_SEED"


def seed_everything(seed: int | None = None, workers: bool = False) -> int:
    """Seed Python, NumPy and torch (CPU and CUDA) and record the seed in the environment.

    The seed travels to every Ray worker (``PL_GLOBAL_SEED``), which reseeds before the module
    is used, so all ranks start identically.

    Args:
        seed: the seed; None reads ``PL_GLOBAL_SEED`` or picks a random one (with a warning).
        workers: also derive distinct dataloader-worker seeds (recorded as ``PL_SEED_WORKERS``).

    Returns:
        The seed used.
    """
    if seed is None:
        env = os.environ.get(SEED_ENV)
        if env is not None:
            seed = int(env)
        else:
            seed = random.randint(0, _MAX_SEED)
            warnings.warn(f"No seed given; seed_everything picked {seed}.", stacklevel=2)
    seed = int(seed)
    if not 0 <= seed <= _MAX_SEED:
        new = random.randint(0, _MAX_SEED)
        warnings.warn(f"Seed {seed} is outside [0, {_MAX_SEED}]; using {new}.", stacklevel=2)
        seed = new
    os.environ[SEED_ENV] = str(seed)
    os.environ["PL_SEED_WORKERS"] = str(int(workers))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed


def global_seed() -> int | None:
    value = os.environ.get(SEED_ENV)
    return int(value) if value is not None else None


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA RNG states as checkpoint-safe values (lists and tensors)."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
