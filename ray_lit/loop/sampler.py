"""Per-rank data shards that can resume mid-epoch and re-shard onto a new world size.

Every rank computes the same epoch order (a permutation seeded by ``seed + epoch``) and takes
the positions ``world_rank, world_rank + world_size, ...`` of it, like torch's
``DistributedSampler``. The interleaving is what makes resume exact: after every rank took
``k`` batches of ``batch_size`` samples, the samples consumed by the whole group are exactly the
first ``k * batch_size * world_size`` positions of the order. A checkpoint therefore stores one
number (``start``, a global offset into the epoch order) instead of per-rank positions, and a
restarted group, of any size, continues with ``order[start:]`` re-sharded over its ranks
(the idea of Horovod's ``ElasticSampler``).

``shard_dataloader`` rebuilds the user's ``DataLoader`` with such a sampler on every rank
(Lightning 0.9's ``replace_sampler_ddp``, trap 7.9 of the semantics reference).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from ray_lit.errors import MisconfigurationException

__all__ = [
    "DistributedSamplerWrapper",
    "ResumableDistributedSampler",
    "loader_batch_size",
    "sampler_of",
    "shard_dataloader",
]


def _pad_and_shard(order: list[int], num_replicas: int, rank: int, drop_last: bool) -> list[int]:
    """This rank's interleaved share of ``order``, padded (or cut) to a multiple of the size."""
    if drop_last:
        order = order[: len(order) // num_replicas * num_replicas]
    else:
        total = math.ceil(len(order) / num_replicas) * num_replicas
        # repeat from the start of the remainder, as DistributedSampler does, so every rank
        # runs the same number of batches (a rank that stops early would hang a collective)
        while order and len(order) < total:
            order = order + order[: total - len(order)]
    return order[rank::num_replicas]


class ResumableDistributedSampler(Sampler[int]):
    """Rank ``rank``'s share of an epoch order that every rank computes identically.

    Every rank of a worker group holds one, built by ``shard_dataloader``. The loop (on every
    rank) calls ``set_epoch`` at each epoch start and ``state_dict`` when it checkpoints; the
    values are identical on all ranks, so rank 0's copy is enough to restore the whole group.

    Args:
        dataset_len: number of samples in the dataset.
        num_replicas: the world size.
        rank: this worker's world rank.
        shuffle: permute the epoch order (seeded by ``seed + epoch``) or keep ``range(n)``.
        seed: base seed of the permutation; the same on every rank.
        drop_last: cut the remainder to a multiple of ``num_replicas`` instead of padding it.

    Attributes:
        epoch: the epoch whose order is served.
        start: global offset into the epoch order consumed before this (re)start.
        batches_at_start: the loop's in-epoch batch count when the state was saved; subtracted
            from the count handed to ``state_dict`` so a second checkpoint of a resumed epoch
            does not count the first part twice.
    """

    def __init__(self, dataset_len: int, num_replicas: int, rank: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise MisconfigurationException(
                f"ResumableDistributedSampler got rank={rank}, num_replicas={num_replicas}; "
                "the rank must lie in [0, num_replicas).")
        self.dataset_len = int(dataset_len)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        self.batches_at_start = 0

    # --- the order ---------------------------------------------------------------------------
    def epoch_order(self) -> list[int]:
        """The full order of this epoch, identical on every rank."""
        if not self.shuffle:
            return list(range(self.dataset_len))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_len, generator=generator).tolist()

    def _indices(self) -> list[int]:
        return _pad_and_shard(self.epoch_order()[self.start:], self.num_replicas, self.rank,
                              self.drop_last)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        remaining = max(0, self._order_len() - self.start)
        if self.drop_last:
            return remaining // self.num_replicas
        return math.ceil(remaining / self.num_replicas)

    def _order_len(self) -> int:
        return self.dataset_len

    # --- position ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Serve ``epoch``'s order from its beginning (every rank, at each epoch start).

        Calling it again with the epoch already set keeps a position restored by
        ``load_state_dict``: the loop calls ``set_epoch`` after restoring a mid-epoch state.
        """
        if epoch != self.epoch:
            self.epoch = epoch
            self.start = 0
            self.batches_at_start = 0

    def state_dict(self, consumed_batches_per_rank: int, batch_size: int) -> dict[str, Any]:
        """The position after each rank took ``consumed_batches_per_rank`` batches this epoch.

        Args:
            consumed_batches_per_rank: batches each rank took from its loader in this epoch,
                counted as the loop counts them (those before a resume included; the count the
                state was restored at is subtracted).
            batch_size: samples per batch.

        Returns:
            ``{"epoch", "start", "seed", "shuffle", "world_size", "batches_done"}``; ``start``
            is the global offset into the epoch order, valid for any world size.
        """
        fresh = max(0, consumed_batches_per_rank - self.batches_at_start)
        start = min(self._order_len(), self.start + fresh * batch_size * self.num_replicas)
        return {"epoch": self.epoch, "start": start, "seed": self.seed, "shuffle": self.shuffle,
                "world_size": self.num_replicas, "batches_done": consumed_batches_per_rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch with ``order[start:]`` sharded over this world size.

        ``state`` may come from a group of another size (elastic resize): the remainder is
        re-sharded, so within the epoch no sample is skipped or repeated (except padding).
        """
        if state.get("seed", self.seed) != self.seed or \
                state.get("shuffle", self.shuffle) != self.shuffle:
            raise MisconfigurationException(
                f"The sampler state was saved with seed={state.get('seed')}, "
                f"shuffle={state.get('shuffle')} but this run uses seed={self.seed}, "
                f"shuffle={self.shuffle}; resume with the seed (seed_everything) and loader "
                "of the original run.")
        self.epoch = int(state["epoch"])
        self.start = int(state["start"])
        self.batches_at_start = int(state.get("batches_done", 0))


class DistributedSamplerWrapper(ResumableDistributedSampler):
    """Shards a user's own sampler: its indices, materialised each epoch, interleaved by rank.

    The user's sampler is iterated with torch's global RNG forked and seeded by
    ``seed + epoch`` (and its own ``set_epoch`` called when it has one), so a sampler that
    draws from the global RNG yields the same order on every rank and again after a resume.
    A sampler with its own unseeded generator gives each rank a different order: the shards
    then overlap. Note that this iterates the whole user sampler once per epoch on every rank.
    """

    def __init__(self, sampler: Iterable[int], num_replicas: int, rank: int, seed: int = 0,
                 drop_last: bool = False) -> None:
        self.sampler = sampler
        super().__init__(len(sampler) if isinstance(sampler, Sized) else 0, num_replicas, rank,
                         shuffle=False, seed=seed, drop_last=drop_last)
        self._cache: tuple[int, list[int]] | None = None

    def epoch_order(self) -> list[int]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.epoch)
            order = [int(i) for i in self.sampler]
        self._cache = (self.epoch, order)
        return order

    def _order_len(self) -> int:
        return len(self.epoch_order())


class _BatchShard(Sampler[list[int]]):
    """A custom batch sampler without an inner ``sampler``: whole batches, interleaved by rank.

    Not position-resumable (``sampler_of`` does not return it): the loop resumes it by
    skipping batches, which is exact at the same world size.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], num_replicas: int, rank: int,
                 seed: int) -> None:
        self.batch_sampler = batch_sampler
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(self.epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.epoch)
            batches = [list(b) for b in self.batch_sampler]
        picks = _pad_and_shard(list(range(len(batches))), self.num_replicas, self.rank, False)
        return [batches[i] for i in picks]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return math.ceil(len(self.batch_sampler) / self.num_replicas)  # type: ignore[arg-type]


# --- DataLoader surgery ----------------------------------------------------------------------
def sampler_of(loader: Any) -> ResumableDistributedSampler | None:
    """The resumable sampler inside ``loader`` (its sampler or its batch sampler's), if any."""
    for candidate in (getattr(loader, "sampler", None),
                      getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(candidate, ResumableDistributedSampler):
            return candidate
    return None


def loader_batch_size(loader: Any) -> int:
    """Samples per batch of ``loader`` (a custom batch sampler's ``batch_size`` too), else 1."""
    size = getattr(loader, "batch_size", None) or getattr(
        getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size or 1)


def _is_plain(sampler: Any, dataset_len: int) -> bool:
    if type(sampler) is SequentialSampler:
        return True
    return (type(sampler) is RandomSampler and not sampler.replacement
            and sampler.num_samples == dataset_len)


def shard_dataloader(loader: DataLoader, *, world_rank: int, world_size: int, train: bool,
                     seed: int) -> DataLoader:
    """This rank's copy of the user's ``loader``: same class and arguments, a sharded sampler.

    Called on every rank for each loader of the stage. Shuffling follows Lightning 0.9: a train
    loader is shuffled when ``world_size > 1`` whatever the user asked, an eval loader never;
    with one worker the user's choice (a ``RandomSampler``) is kept. ``world_size == 1`` still
    installs the resumable sampler, which is what makes a mid-epoch resume exact.

    Args:
        loader: the user's loader, built on the driver.
        world_rank: this worker's rank.
        world_size: number of workers.
        train: the train loader (shuffled) or an eval loader (not shuffled).
        seed: the sampler seed, identical on every rank (the run's global seed).

    Returns:
        The rebuilt loader; unchanged for an ``IterableDataset``, a loader that already has a
        ``DistributedSampler``, or an iterable of batches that is not a ``DataLoader``.

    Raises:
        MisconfigurationException: a ``DataLoader`` subclass whose ``__init__`` takes an
            argument that is not stored as an attribute of the same name.
    """
    if not isinstance(loader, DataLoader):
        return loader  # any other iterable of batches is used as given (0.9), like below
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return loader  # the user shards iterable datasets themselves
    sampler = loader.sampler
    batch_sampler = loader.batch_sampler
    if isinstance(sampler, DistributedSampler | ResumableDistributedSampler) or isinstance(
            getattr(batch_sampler, "sampler", None),
            DistributedSampler | ResumableDistributedSampler):
        return loader
    user_shuffle = isinstance(sampler, RandomSampler)
    # train: always shuffled across ranks (0.9 rule), the user's choice on one rank; eval: never
    shuffle = train and (world_size > 1 or user_shuffle)
    n = len(dataset)  # type: ignore[arg-type]

    def shard(inner: Any) -> ResumableDistributedSampler:
        if _is_plain(inner, n):
            return ResumableDistributedSampler(n, world_size, world_rank, shuffle=shuffle,
                                               seed=seed)
        return DistributedSamplerWrapper(inner, world_size, world_rank, seed=seed)

    overrides: dict[str, Any]
    if batch_sampler is None or (type(batch_sampler) is BatchSampler
                                 and batch_sampler.sampler is sampler):
        # automatic batching (or none): hand the DataLoader a new sampler
        overrides = {"sampler": shard(sampler), "batch_size": loader.batch_size,
                     "drop_last": loader.drop_last}
    else:
        if hasattr(batch_sampler, "sampler"):
            # a custom batch sampler over a sampler: keep its batching, shard what it batches
            new_batch_sampler = copy.copy(batch_sampler)
            new_batch_sampler.sampler = shard(batch_sampler.sampler)
        else:
            new_batch_sampler = _BatchShard(batch_sampler, world_size, world_rank, seed)
        overrides = {"batch_sampler": new_batch_sampler}
    return _rebuild(loader, overrides)


_EXCLUSIVE_WITH_BATCH_SAMPLER = ("batch_size", "shuffle", "sampler", "drop_last")


def _rebuild(loader: DataLoader, overrides: dict[str, Any]) -> DataLoader:
    """``type(loader)(...)`` with the arguments read back from attributes of the same name."""
    cls = type(loader)
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes_kwargs:
        # a subclass forwarding **kwargs to DataLoader: DataLoader's own arguments apply too
        base = dict(inspect.signature(DataLoader.__init__).parameters)
        base.pop("self", None)
        params = {**base, **params}
    kwargs: dict[str, Any] = {}
    missing = []
    for name, param in params.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in overrides:
            kwargs[name] = overrides[name]
        elif name in _EXCLUSIVE_WITH_BATCH_SAMPLER + ("batch_sampler",):
            continue  # decided by the overrides alone
        elif hasattr(loader, name):
            kwargs[name] = getattr(loader, name)
        elif param.default is param.empty:
            missing.append(name)
    if missing:
        raise MisconfigurationException(
            f"Cannot give each worker its shard of {cls.__name__}: its __init__ takes "
            f"{missing} but the loader has no attribute of that name to read it back from. "
            f"Store each argument as self.<name> in {cls.__name__}.__init__ (or give it a "
            "default).")
    refused = [name for name in overrides if name not in params]
    if refused:
        raise MisconfigurationException(
            f"Cannot give each worker its shard of {cls.__name__}: its __init__ does not take "
            f"{refused}, so the per-rank sampler cannot be passed in. Accept **kwargs (or "
            f"{refused}) in {cls.__name__}.__init__ and forward them to DataLoader.")
    if "batch_sampler" in kwargs:
        for name in _EXCLUSIVE_WITH_BATCH_SAMPLER:
            kwargs.pop(name, None)
    return cls(**kwargs)
