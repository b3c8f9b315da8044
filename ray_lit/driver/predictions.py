"""``trainer.predict`` on Ray workers, driver side: the chunks the ranks stream, put in order.

Every rank hands its batch outputs over with its polls (``messages.PredictionChunk``, a
bounded number of bytes per poll); the controller gives each status to ``receive_predictions``,
and ``PredictionCollector.assemble`` returns them in the order ``num_workers=0`` returns them:
by each batch's place in the user's loader (``position``). A loader ray_lit did not shard (an
``IterableDataset``, a user ``DistributedSampler``) has no positions: its outputs come rank by
rank, each rank's in its own order.

A chunk is kept by its place, so the chunks of a failed attempt that a retry predicts again
are replaced, never doubled.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import cloudpickle

from ray_lit.messages import PredictionChunk, WorkerStatus

__all__ = ["PredictionCollector", "receive_predictions"]


class PredictionCollector:
    """The prediction chunks received so far, by dataloader and place.

    Attributes:
        chunks_received: chunks taken from statuses (a retried batch counts again).
        statuses_with_chunks: statuses (poll answers) that carried at least one chunk,
            by rank.
    """

    def __init__(self) -> None:
        # dataloader_idx -> sort key -> pickled output; the key is (position,) for a sharded
        # loader, (rank, batch_idx) otherwise
        self._chunks: dict[int, dict[tuple[int, ...], bytes]] = {}
        self.chunks_received = 0
        self.statuses_with_chunks: dict[int, int] = {}

    def add(self, chunks: Iterable[PredictionChunk]) -> None:
        """Keep the chunks of one status (driver, in the controller's poll)."""
        count = 0
        rank = -1
        for chunk in chunks:
            rank = chunk.rank
            key = (chunk.position,) if chunk.position is not None else (chunk.rank,
                                                                        chunk.batch_idx)
            self._chunks.setdefault(chunk.dataloader_idx, {})[key] = chunk.payload
            count += 1
        if count:
            self.chunks_received += count
            self.statuses_with_chunks[rank] = self.statuses_with_chunks.get(rank, 0) + 1

    def assemble(self, totals: list[int | None]) -> list[Any]:
        """The outputs in dataloader order: one list per predict dataloader, a flat list for
        one (what ``trainer.predict`` returns, as in process).

        Args:
            totals: each dataloader's batch count over all ranks (rank 0's report), None where
                the loader was not sharded.

        Raises:
            RuntimeError: a batch of a sharded loader never arrived (a lost chunk).
        """
        out: list[list[Any]] = []
        for dl_idx, total in enumerate(totals):
            received = self._chunks.pop(dl_idx, {})
            keys = sorted(received)
            if total is not None:
                missing = sorted(set(range(total)) - {k[0] for k in keys})
                if missing:
                    raise RuntimeError(
                        f"ray_lit: trainer.predict lost the outputs of batches {missing[:10]} "
                        f"of predict dataloader {dl_idx} ({len(missing)} of {total}) on their "
                        "way from the workers.")
            # decoded one at a time, each payload dropped as soon as it is an object
            out.append([cloudpickle.loads(received.pop(key)) for key in keys])
        return out[0] if len(out) == 1 else out


def receive_predictions(controller: Any, status: WorkerStatus) -> None:
    """Hand the prediction chunks of a rank's ``status`` to the controller's collector
    (``controller.prediction_collector``, set by ``launch_predict``); no-op otherwise."""
    collector = getattr(controller, "prediction_collector", None)
    if collector is not None and status.predictions:
        collector.add(status.predictions)
