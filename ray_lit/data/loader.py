"""``RayDataLoader``: a Ray ``Dataset`` wherever a ``DataLoader`` goes, and each rank's shard of it.

The user builds a ``RayDataLoader`` (on the driver, or inside a ``*_dataloader`` hook, which
runs on every rank). The host that runs the loop turns it into this rank's ``RayDataShard``
(``shard_for_rank``): an iterable of collated batches, dealt by one ``BatchDealer`` per loader and
attempt (see ``ray_lit.data.dealer``), with a resumable position the loop checkpoints like a
``DataLoader``'s sampler.

Determinism: a mid-epoch resume (lost worker, killed driver, elastic resize) is exact when the
epoch's order is reproducible. ``deterministic=True`` (the default) reads the data set with Ray
Data's ``preserve_order`` (blocks come out in their order, at a small cost in throughput when
tasks finish out of order), which makes it so for a deterministic source and preprocessing
(no ``random_shuffle`` without a seed, no sampling without a seed). ``deterministic=False``
takes blocks as they finish; a resumed epoch then starts again from its first batch (logged),
so no sample of that epoch is skipped, and those before the checkpoint are seen twice.
"""

from __future__ import annotations

import collections
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ray_lit.data.dealer import BatchDealer, dealer_actor_class
from ray_lit.errors import MisconfigurationException
from ray_lit.loop.data import is_ray_dataset
from ray_lit.loop.sampler import ResumableDistributedSampler

log = logging.getLogger(__name__)

CHUNK = 8  # batches a rank takes from the dealer per call (measured: benchmarks/ray_data.py)

__all__ = ["RayDataLoader", "RayDataShard", "default_collate", "is_ray_dataset"]


class RayDataLoader:
    """A ``ray.data.Dataset`` as a training or evaluation source.

    Pass it wherever a ``DataLoader`` goes: ``fit(train_dataloaders=...)``, ``val_dataloaders``,
    or return it from a ``*_dataloader`` hook of a module or ``LightningDataModule``. Each rank
    streams its own equal share of every epoch; the data set is never gathered on the driver.

    Args:
        dataset: a ``ray.data.Dataset`` (lazy; re-executed every epoch).
        batch_size: rows per batch on each rank.
        collate_fn: turns a batch, a ``dict`` of numpy arrays (one per column), into what the
            step receives; by default a ``dict`` of tensors (string columns stay lists).
        local_shuffle_buffer_size: shuffle rows through a buffer of this many rows (train
            loaders only; seeded by the run's seed and the epoch, so it resumes exactly). A
            global shuffle is the data set's own (``ds.random_shuffle()``).
        prefetch_batches: batches prepared ahead of the step, on the cluster and on the rank.
        drop_last: drop the epoch's last, incomplete round of batches instead of splitting it
            equally over the ranks.
        deterministic: read the data set in its order, so a mid-epoch resume is exact (see
            the module docstring); ``False`` trades that for throughput.

    Raises:
        MisconfigurationException: ``dataset`` is not a Ray ``Dataset``, or a size is not a
            positive int.
    """

    def __init__(self, dataset: Any, batch_size: int, collate_fn: Callable[[dict], Any] | None
                 = None, local_shuffle_buffer_size: int | None = None, prefetch_batches: int = 1,
                 drop_last: bool = False, deterministic: bool = True) -> None:
        if not is_ray_dataset(dataset):
            raise MisconfigurationException(
                f"RayDataLoader(dataset=...) takes a ray.data.Dataset, got "
                f"{type(dataset).__name__}. For a torch Dataset use torch's DataLoader.")
        for name, value, low in (("batch_size", batch_size, 1),
                                 ("prefetch_batches", prefetch_batches, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MisconfigurationException(
                    f"RayDataLoader({name}={value!r}) must be an int >= {low}.")
        if local_shuffle_buffer_size is not None and (
                isinstance(local_shuffle_buffer_size, bool)
                or not isinstance(local_shuffle_buffer_size, int)
                or local_shuffle_buffer_size < 1):
            raise MisconfigurationException(
                f"RayDataLoader(local_shuffle_buffer_size={local_shuffle_buffer_size!r}) must "
                "be None (no shuffle) or an int >= 1.")
        if collate_fn is not None and not callable(collate_fn):
            raise MisconfigurationException(
                f"RayDataLoader(collate_fn={collate_fn!r}) must be callable.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.local_shuffle_buffer_size = local_shuffle_buffer_size
        self.prefetch_batches = prefetch_batches
        self.drop_last = drop_last
        self.deterministic = bool(deterministic)

    def __repr__(self) -> str:
        return f"RayDataLoader(batch_size={self.batch_size}, dataset={self.dataset!r})"

    def __len__(self) -> int:
        # a stream: its length is known once read (an IterableDataset to the loop)
        raise TypeError("a RayDataLoader has no length before its epoch is read")

    def __iter__(self) -> Iterator[Any]:
        """Every batch of one epoch, in this process (as a one-rank shard)."""
        return iter(self.shard_for_rank(key=None, world_rank=0, world_size=1, seed=0,
                                        train=False, whole=True))

    def shard_for_rank(self, key: str | None, world_rank: int, world_size: int, seed: int,
                       train: bool, whole: bool = False) -> RayDataShard:
        """This rank's share (called by the host on every rank, in the same order).

        Args:
            key: names the dealer the group's ranks share (unique per loader and attempt);
                ``None`` deals in this process (a world of one, ``num_workers=0``).
            world_rank: this rank.
            world_size: ranks in the group.
            seed: the run's sampler seed (the same on every rank).
            train: a train loader (shuffled with the buffer, if any) or an eval loader.
            whole: a predict loader: every row, batches as the stream cuts them (no equal
                shards), each batch's global position recorded in ``seen``.
        """
        shuffle = self.local_shuffle_buffer_size if train else None
        args = (self.dataset, self.batch_size, world_size, shuffle, seed, self.drop_last,
                self.prefetch_batches, train, self.deterministic, whole)
        if key is None:
            dealer: Any = BatchDealer(*args)
        else:
            dealer = dealer_actor_class().options(
                name=key, get_if_exists=True, scheduling_strategy="DEFAULT").remote(*args)
            _DEALERS.append(dealer)
        position = StreamPosition(world_size, world_rank, seed=seed, shuffle=bool(shuffle),
                                  deterministic=self.deterministic)
        return RayDataShard(self, dealer, key is not None, position)


class StreamPosition(ResumableDistributedSampler):
    """Where the group is in the epoch's stream: the loop checkpoints and restores it like a
    ``DataLoader``'s resumable sampler (``start`` counts rows of whole global batches)."""

    def __init__(self, num_replicas: int, rank: int, seed: int, shuffle: bool,
                 deterministic: bool) -> None:
        super().__init__(0, num_replicas, rank, shuffle=shuffle, seed=seed)
        self.deterministic = deterministic
        self.restarted_epoch = False

    def _order_len(self) -> int:
        return 2**62  # a stream: the position is never clamped to a length

    def __len__(self) -> int:
        raise TypeError("a stream has no length")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.start and not self.deterministic:
            log.warning(
                "RayDataLoader(deterministic=False): the data set's order is not reproducible, "
                "so epoch %d starts again from its first batch instead of its batch %d; the "
                "samples of that epoch before the checkpoint are seen twice. Leave "
                "deterministic=True for an exact resume.", self.epoch,
                int(state.get("batches_done", 0)))
            self.start = 0
            self.batches_at_start = 0
            self.restarted_epoch = True


class RayDataShard:
    """One rank's batches of a ``RayDataLoader`` (every rank iterates its own each epoch).

    ``sampler`` is the stream position (``ray_lit.loop.sampler.sampler_of`` finds it there): the
    loop's ``set_epoch``, checkpoint and resume act on it as on a ``DataLoader``'s sampler.
    ``seen`` and ``total`` make it the predict loop's batch recorder: ``(position, [])`` of each
    batch served, ``position`` its place in the epoch's stream (the driver orders by it).
    """

    total = None  # batches of the whole stream: unknown before it is read

    def __init__(self, loader: RayDataLoader, dealer: Any, remote: bool,
                 position: StreamPosition) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size
        self.sampler = position
        self._dealer = dealer
        self._remote = remote
        self.seen: list[tuple[int, list[int]]] = []

    def __len__(self) -> int:
        raise TypeError("a RayDataShard has no length before its epoch is read")

    def __iter__(self) -> Iterator[Any]:
        position = self.sampler
        epoch, start_batches = position.epoch, position.start // self.batch_size
        indices = _count(position.rank, position.num_replicas)
        collate = self.loader.collate_fn or default_collate
        self.seen = []
        for index, table in self._fetch(epoch, start_batches, indices):
            self.seen.append((index, []))
            yield collate(to_numpy(table))

    def _fetch(self, epoch: int, start_batches: int, indices: Iterator[int]) -> Iterator[Any]:
        if not self._remote:
            try:
                for index in indices:
                    batch = self._dealer.batch(epoch, start_batches, index)
                    if batch is None:
                        break
                    yield index, batch
            finally:  # the loop left the epoch (its end, a limit, an error): stop reading
                self._dealer.close()
            return
        import ray

        # a round trip to the dealer actor costs about as much as cutting a batch: ask for
        # CHUNK batches a call, and keep the next calls in flight (prefetch_batches of them,
        # at least one) while this rank trains on the current ones
        ahead: collections.deque = collections.deque()
        depth = max(1, self.loader.prefetch_batches)
        while True:
            while len(ahead) < depth:
                wanted = [next(indices) for _ in range(CHUNK)]
                ahead.append((wanted, self._dealer.batches.remote(epoch, start_batches, wanted)))
            wanted, ref = ahead.popleft()
            tables = ray.get(ref)
            yield from zip(wanted, tables)
            if len(tables) < CHUNK:
                return


def _count(start: int, step: int) -> Iterator[int]:
    value = start
    while True:
        yield value
        value += step


def to_numpy(table: Any) -> dict[str, np.ndarray]:
    """An Arrow batch -> a dict of numpy columns (Ray Data's tensor columns become arrays)."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(table).to_batch_format("numpy")


def default_collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A dict of numpy columns -> a dict of tensors; text columns stay lists of ``str``.

    Raises:
        MisconfigurationException: a column whose rows differ in shape (ragged), naming it.
    """
    out: dict[str, Any] = {}
    for name, column in batch.items():
        if column.dtype == object:
            if len(column) and isinstance(column[0], (str, bytes)):
                out[name] = list(column)
                continue
            try:
                column = np.stack([np.asarray(v) for v in column])
            except ValueError as err:
                shapes = sorted({np.shape(v) for v in column}, key=str)[:3]
                raise MisconfigurationException(
                    f"RayDataLoader: column {name!r} does not collate into one tensor: its "
                    f"rows have different shapes ({', '.join(map(str, shapes))}, ...). Pad or "
                    "drop it in the data set (ds.map_batches), or pass a collate_fn that "
                    "handles it.") from err
        if column.dtype.kind in "US":
            out[name] = column.tolist()
            continue
        try:
            with warnings.catch_warnings():
                # a read-only view of this rank's own copy in the object store: nobody else
                # reads it, so the step may write into the tensor
                warnings.filterwarnings("ignore", message=".*not writable.*")
                out[name] = torch.as_tensor(column)
        except (TypeError, RuntimeError) as err:
            raise MisconfigurationException(
                f"RayDataLoader: column {name!r} (dtype {column.dtype}) does not convert to a "
                "tensor; convert it in the data set or pass a collate_fn.") from err
    return out


# the dealers this process asked for: a new job releases the previous job's (a kept worker
# group runs several jobs; each job's dealers are named by its attempt's fence)
_DEALERS: list[Any] = []


def release_dealers() -> None:
    """Stop the dealer actors earlier jobs of this process used (every rank, at a job start)."""
    import ray

    while _DEALERS:
        handle = _DEALERS.pop()
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 (already gone: its owner died with the group)
            pass

