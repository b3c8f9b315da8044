"""Sharded model checkpoints of a run: ``FSDPStrategy(state_dict_type="sharded")``.

``save_sharded`` is what ``ModelCheckpoint`` calls on every rank instead of
``trainer.save_checkpoint``; ``consolidate`` turns such a directory into one ordinary file
(``python -m ray_lit consolidate SRC_DIR DST_FILE`` runs it). The directory format, reading and
storage are ``ray_lit.storage.sharded_io``'s.

Fault-tolerance checkpoints of an FSDP run (``checkpoint.writer``) are sharded the same way
(standard DCP directories beside the rank parts), but written by each rank's background thread
without collectives (``storage.dcp_plan``) and restored lazily (``checkpoint.shard_restore``).
"""

from __future__ import annotations

import os
from typing import Any

from ray_lit.storage.sharded_io import consolidate_checkpoint

__all__ = ["consolidate", "load_lazily", "save_sharded"]


def save_sharded(trainer: Any, path: str | os.PathLike, weights_only: bool = False) -> None:
    """Write the run's checkpoint as a sharded checkpoint directory at ``path``.

    COLLECTIVE: every rank calls it at the same point (``ModelCheckpoint`` does), with the same
    ``path``. Nothing is gathered: each rank writes its own shards of the module and optimizer
    state, rank 0 the rest (epoch, global_step, callbacks, hparams, loops).

    Args:
        trainer: the rank's trainer (its strategy holds the shards).
        path: the checkpoint directory (local path shared by every rank, or a storage URI).
        weights_only: keep only the module's state (no optimizer, scheduler, callback state).
    """
    from ray_lit.loop.checkpoint_state import dump_checkpoint
    from ray_lit.loop.liveness import long_phase
    from ray_lit.storage.sharded_io import save_sharded_checkpoint
    from ray_lit.strategies.fsdp import sharded_state_dicts

    strategy = trainer.strategy
    # a large model to slow storage can take longer than the hang timeout: not a hang
    with long_phase("sharded checkpoint save"):
        with sharded_state_dicts(strategy):
            # on_device: the shards stay where they are; DCP copies them to host as it writes
            checkpoint = dump_checkpoint(trainer._ctx, weights_only, on_device=True)
        save_sharded_checkpoint(checkpoint, path, strategy)


def consolidate(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Write the sharded checkpoint directory ``src`` as one ordinary checkpoint file ``dst``
    (any process, no process group); see ``storage.sharded_io.consolidate_checkpoint``.

    Returns:
        ``dst`` as a string.
    """
    return consolidate_checkpoint(src, dst)


def load_lazily(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at ``path`` as a lazy checkpoint dict when it is a sharded checkpoint
    directory (``checkpoint.shard_restore.lazy_checkpoint``: only its meta file and DCP's
    index are read; each rank later reads the chunks of its own shards), else None (a file:
    the caller reads it as usual).

    Called on the driver (or in process) by ``Trainer.fit(ckpt_path=...)`` / ``resume=``
    when the strategy shards state; only ``FSDPStrategy`` can load the result.

    Raises:
        CheckpointLoadError: a directory that is not a complete sharded checkpoint, or a
            run directory.
    """
    from ray_lit.checkpoint.shard_restore import lazy_checkpoint
    from ray_lit.storage.checkpoint_io import _refuse_run_directory
    from ray_lit.storage.filesystem import Storage
    from ray_lit.storage.retry import DEFAULT_TIMEOUT_S, StorageRetry
    from ray_lit.storage.sharded_io import is_sharded_checkpoint

    name = os.fspath(path)
    if not is_sharded_checkpoint(name):
        return None
    _refuse_run_directory(Storage(name), name)
    return lazy_checkpoint(name, retry=StorageRetry(DEFAULT_TIMEOUT_S))
