"""``BatchDealer``: one epoch stream of a Ray ``Dataset``, dealt batch by batch to the ranks.

Why a dealer and not ``Dataset.streaming_split``: ``streaming_split`` hands blocks to whichever
rank asks first, so which rows a rank saw is not reproducible and a lost worker's epoch cannot
be resumed exactly. The dealer reads the epoch as ONE ordered stream
(``iter_batches(batch_size)`` with Ray Data's ``preserve_order``, so the same source and
preprocessing give the same order every time) and deals global
batch ``g`` to rank ``g % world_size``: after every rank took ``k`` batches, the group has
consumed exactly the first ``k * world_size`` batches of the stream. A checkpoint stores that
one number (as rows, like ``ResumableDistributedSampler``'s ``start``); a restarted group, of
any size, skips that many batches of the same stream and deals the rest over its own ranks.

Equal shards: a batch is handed out only when its whole round (``world_size`` consecutive
batches) is known to be full, so every rank gets the same number of batches (a rank that
stops early would hang DDP's collectives). The last, incomplete round is split into
``world_size`` equal batches of ``rows // world_size`` rows (``drop_last=False``; fewer than
``world_size`` rows are dropped) or dropped (``drop_last=True``). Prediction (``whole=True``)
runs no collective per batch and must see every row: its batches are dealt as the stream cuts
them, the last one partial, so a rank may run one batch fewer than another.

Where it runs: for a Ray worker group, inside one small actor (``DealerActor``, 0 CPUs, outside
the workers' placement group so Ray Data's tasks get the cluster's CPUs); in process for
``num_workers=0``. The dealer only cuts the stream into Arrow tables (zero-copy slices of Ray
Data's blocks); each rank turns its own into numpy and tensors, so that work runs on all ranks in
parallel. Tables are returned by value: Ray puts large ones in the object store and the rank
reads them zero-copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from ray_lit.errors import MisconfigurationException

Batch = pa.Table


class BatchDealer:
    """The epoch streams of one ``RayDataLoader`` for one group of ``world_size`` ranks.

    Args:
        dataset: the ``ray.data.Dataset`` (this process's copy).
        batch_size: rows per batch.
        world_size: ranks the batches are dealt to.
        shuffle_buffer: ``local_shuffle_buffer_size`` (``None``: no shuffle).
        seed: the local shuffle's seed; epoch ``e`` shuffles with ``seed + e``.
        drop_last: drop the last, incomplete round instead of splitting it.
        prefetch_batches: batches Ray Data prepares ahead of the dealer.
        train: a train loader (a shard smaller than one batch is an error) or an eval loader.
        deterministic: read the data set in its order (Ray Data's ``preserve_order``, set on
            the data set's own context), so a resume can skip exactly what was trained on.
        whole: deal every row as the stream cuts it (prediction), not equal shards.
    """

    def __init__(self, dataset: Any, batch_size: int, world_size: int,
                 shuffle_buffer: int | None, seed: int, drop_last: bool,
                 prefetch_batches: int, train: bool, deterministic: bool = True,
                 whole: bool = False) -> None:
        if deterministic:
            dataset.context.execution_options.preserve_order = True
        self.dataset = dataset
        self.batch_size = batch_size
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_last = drop_last
        self.prefetch_batches = prefetch_batches
        self.train = train
        self.whole = whole
        self._stream: tuple[int, int] | None = None  # (epoch, start_batches) being served
        self._source: Iterator[Batch] | None = None
        self._next_index = 0  # global index (after the skip) of the next batch to deal
        self._pending: dict[int, Batch | None] = {}
        self._rows_seen = 0

    def batch(self, epoch: int, start_batches: int, index: int) -> Batch | None:
        """Global batch ``index`` (counted after the ``start_batches`` skipped) of ``epoch``.

        Rank ``r`` of the group asks for ``r, r + world_size, ...``. Returns ``None`` when the
        epoch has no such batch (it ended), also for a request of an epoch already left behind.
        """
        if self._stream != (epoch, start_batches):
            if self._stream is not None and (epoch, start_batches) < self._stream:
                return None  # a late request (a rank's read-ahead) of an epoch left behind
            self._open(epoch, start_batches)
        round_end = (index // self.world_size + 1) * self.world_size
        while self._next_index < round_end:
            if not self._deal_round():
                break
        return self._pending.pop(index, None)

    def batches(self, epoch: int, start_batches: int, indices: list[int]) -> list[Batch]:
        """Several of one rank's batches in one call (fewer round trips to the dealer
        actor); cut short at the epoch's end."""
        out = []
        for index in indices:
            batch = self.batch(epoch, start_batches, index)
            if batch is None:
                break
            out.append(batch)
        return out

    # --- the stream ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop reading the current stream (its prefetching threads end now, not whenever
        the garbage collector gets to them, which may be after Ray shut down)."""
        source, self._source = self._source, None
        close = getattr(source, "close", None)
        if close is not None:
            close()

    def _open(self, epoch: int, start_batches: int) -> None:
        self.close()
        self._stream = (epoch, start_batches)
        self._pending.clear()
        self._next_index = 0
        self._rows_seen = 0
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "batch_format": "pyarrow",
                                  "drop_last": False, "prefetch_batches": self.prefetch_batches}
        if self.shuffle_buffer:
            kwargs["local_shuffle_buffer_size"] = self.shuffle_buffer
            kwargs["local_shuffle_seed"] = self.seed + epoch
        self._source = iter(self.dataset.iter_batches(**kwargs))
        for _ in range(start_batches):  # resumed: the batches the group already trained on
            if next(self._source, None) is None:
                break

    def _deal_round(self) -> bool:
        """Read the next ``world_size`` batches; False when the epoch is over."""
        batches: list[Batch] = []
        for _ in range(self.world_size):
            batch = next(self._source, None) if self._source is not None else None
            if batch is None:
                break
            batches.append(batch)
            self._rows_seen += _rows(batch)
            if _rows(batch) < self.batch_size:
                break  # the stream's last, partial batch
        first = self._next_index
        if self.whole or (len(batches) == self.world_size
                          and _rows(batches[-1]) == self.batch_size):
            for offset, batch in enumerate(batches):
                self._pending[first + offset] = batch
            self._next_index += self.world_size
            if len(batches) < self.world_size or _rows(batches[-1]) < self.batch_size:
                self.close()
                return False
            return True
        self.close()  # the last round: split equally (or drop)
        rows = sum(_rows(b) for b in batches)
        fresh_epoch = self._stream is not None and self._stream[1] == 0
        if self.train and first == 0 and fresh_epoch and rows < self.world_size * self.batch_size:
            raise MisconfigurationException(
                f"RayDataLoader(batch_size={self.batch_size}): the data set has {rows} rows, "
                f"so each of the {self.world_size} workers' shards ({rows // self.world_size} "
                "rows) is smaller than one batch. Lower batch_size or use fewer workers.")
        per_rank = rows // self.world_size
        if self.drop_last or per_rank == 0:
            return False
        merged = pa.concat_tables(batches)
        for rank in range(self.world_size):
            self._pending[first + rank] = merged.slice(rank * per_rank, per_rank)
        self._next_index += self.world_size
        return False


def _rows(batch: Batch) -> int:
    return batch.num_rows


def dealer_actor_class() -> Any:
    """``BatchDealer`` as a Ray actor class (built lazily: importing this module needs no Ray
    start). 0 CPUs and no placement group: Ray Data's read and map tasks it starts get the
    cluster's free CPUs, not the workers' reserved ones (inside the workers' placement group
    they would see none and wait forever)."""
    import ray

    global _DEALER_ACTOR
    if _DEALER_ACTOR is None:
        _DEALER_ACTOR = ray.remote(num_cpus=0, max_restarts=0)(BatchDealer)
    return _DEALER_ACTOR


_DEALER_ACTOR: Any = None
