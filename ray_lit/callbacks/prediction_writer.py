"""``BasePredictionWriter``: write ``trainer.predict`` outputs as they come (2.x callback).

Runs where the loop runs: in process for ``num_workers=0``, on **every rank** of a worker group
otherwise, each rank writing its own shard (name files by ``trainer.global_rank``). The batch
indices handed over are the dataset indices of the samples of that rank's batch, so the shards
of all ranks together cover the dataset once (ray_lit does not pad predict loaders).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from ray_lit.callbacks.base import Callback
from ray_lit.errors import MisconfigurationException

__all__ = ["BasePredictionWriter", "WriteInterval"]


class WriteInterval(str, enum.Enum):
    """When a ``BasePredictionWriter`` writes."""

    BATCH = "batch"
    EPOCH = "epoch"
    BATCH_AND_EPOCH = "batch_and_epoch"

    @property
    def on_batch(self) -> bool:
        return self in (WriteInterval.BATCH, WriteInterval.BATCH_AND_EPOCH)

    @property
    def on_epoch(self) -> bool:
        return self in (WriteInterval.EPOCH, WriteInterval.BATCH_AND_EPOCH)


class BasePredictionWriter(Callback):
    """Subclass it and override ``write_on_batch_end`` and/or ``write_on_epoch_end``.

    Args:
        write_interval: ``"batch"`` (after each batch), ``"epoch"`` (once, with every output
            of the rank) or ``"batch_and_epoch"``.

    Raises:
        MisconfigurationException: another ``write_interval``.
    """

    def __init__(self, write_interval: str = "batch") -> None:
        values = [i.value for i in WriteInterval]
        if write_interval not in values:
            raise MisconfigurationException(
                f"BasePredictionWriter(write_interval={write_interval!r}): use one of {values}.")
        self.interval = WriteInterval(write_interval)

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        """Write one batch's ``prediction`` (every rank, for each of its batches).

        ``batch_indices``: the dataset indices of the batch's samples (empty when the loader
        is not a ``DataLoader`` over a map-style dataset).
        """
        raise NotImplementedError

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        """Write every output of this rank (every rank, once at the end of predict).

        ``predictions``: this rank's outputs, one list per dataloader (a flat list for one);
        ``batch_indices``: per dataloader, per batch, the dataset indices.
        """
        raise NotImplementedError

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.interval.on_batch:
            return
        indices = trainer.predict_loop.current_batch_indices
        self.write_on_batch_end(trainer, pl_module, outputs, indices, batch, batch_idx,
                                dataloader_idx)

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.interval.on_epoch:
            return
        loop = trainer.predict_loop
        self.write_on_epoch_end(trainer, pl_module, loop.predictions, loop.epoch_batch_indices)
