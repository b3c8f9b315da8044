"""ResumableDistributedSampler and shard_dataloader: shards, resume, elastic re-shard, rebuild."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Sampler,
    SequentialSampler,
)

from ray_lit.errors import MisconfigurationException
from ray_lit.loop.sampler import (
    DistributedSamplerWrapper,
    ResumableDistributedSampler,
    loader_batch_size,
    sampler_of,
    shard_dataloader,
)


def shards(n, world, epoch=0, seed=0, shuffle=True, drop_last=False):
    out = []
    for rank in range(world):
        sampler = ResumableDistributedSampler(n, world, rank, shuffle=shuffle, seed=seed,
                                              drop_last=drop_last)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_and_complete(world):
    per_rank = shards(12, world)
    flat = [i for s in per_rank for i in s]
    assert sorted(flat) == list(range(12))
    assert all(len(s) == 12 // world for s in per_rank)


def test_padding_repeats_the_start_and_drop_last_cuts():
    per_rank = shards(10, 3, shuffle=False)
    assert per_rank == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    assert [len(ResumableDistributedSampler(10, 3, r, shuffle=False)) for r in range(3)] == [4] * 3
    cut = shards(10, 3, shuffle=False, drop_last=True)
    assert cut == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert len(ResumableDistributedSampler(10, 3, 0, drop_last=True)) == 3


def test_order_same_on_every_rank_and_changes_per_epoch():
    def order(rank, epoch, seed=0):
        s = ResumableDistributedSampler(20, 2, rank, seed=seed)
        s.set_epoch(epoch)
        return s.epoch_order()

    assert order(0, 1) == order(1, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0, seed=1) != order(0, 0, seed=0)
    assert shards(20, 2, epoch=3) == shards(20, 2, epoch=3)


def test_eval_not_shuffled():
    assert shards(6, 2, shuffle=False) == [[0, 2, 4], [1, 3, 5]]


def test_interleaving_makes_consumed_a_prefix_of_the_order():
    n, world, batch, k = 40, 2, 4, 3
    s0 = ResumableDistributedSampler(n, world, 0)
    order = s0.epoch_order()
    consumed = [i for s in shards(n, world) for i in s[: k * batch]]
    assert sorted(consumed) == sorted(order[: k * batch * world])


def test_resume_same_world_continues_with_the_unseen_remainder():
    n, world, batch, k = 40, 2, 4, 3
    first = shards(n, world, epoch=2)
    state = ResumableDistributedSampler(n, world, 0)
    state.set_epoch(2)
    saved = state.state_dict(k, batch)
    assert saved["start"] == k * batch * world and saved["epoch"] == 2
    assert saved["world_size"] == 2 and saved["shuffle"] is True
    for rank in range(world):
        resumed = ResumableDistributedSampler(n, world, rank)
        resumed.load_state_dict(saved)
        resumed.set_epoch(2)  # the loop calls it after restoring: the position is kept
        assert list(resumed) == first[rank][k * batch:]
        assert len(resumed) == len(first[rank]) - k * batch


def test_second_checkpoint_after_resume_counts_only_new_batches():
    n, world, batch = 40, 2, 4
    sampler = ResumableDistributedSampler(n, world, 0)
    saved = sampler.state_dict(2, batch)  # 16 samples consumed
    resumed = ResumableDistributedSampler(n, world, 0)
    resumed.load_state_dict(saved)
    # the loop's in-epoch counter keeps counting from 2; one more batch -> 24 consumed
    assert resumed.state_dict(3, batch)["start"] == 24


def test_resize_two_to_three_reshards_the_remainder_exactly():
    n, batch, k = 30, 2, 2
    old = shards(n, 2, epoch=1)
    consumed = [i for s in old for i in s[: k * batch]]
    source = ResumableDistributedSampler(n, 2, 0)
    source.set_epoch(1)
    state = source.state_dict(k, batch)
    rest = []
    for rank in range(3):
        sampler = ResumableDistributedSampler(n, 3, rank)
        sampler.load_state_dict(state)
        rest.append(list(sampler))
    remaining = n - len(consumed)  # 22 -> 3 ranks of 8, 2 padded
    pad = (-remaining) % 3
    flat = [i for s in rest for i in s]
    assert len(flat) == remaining + pad
    # drop the padding (the last `pad` positions of the interleaved order) and check exactness
    interleaved = [rest[r][j] for j in range(len(rest[0])) for r in range(3)]
    unique = interleaved[: remaining]
    assert len(set(consumed) | set(unique)) == n
    assert not set(consumed) & set(unique)
    assert len(unique) == len(set(unique))


def test_set_epoch_resets_a_restored_position_for_the_next_epoch():
    sampler = ResumableDistributedSampler(10, 1, 0, shuffle=False)
    sampler.load_state_dict({"epoch": 0, "start": 6, "seed": 0, "shuffle": False})
    assert list(sampler) == [6, 7, 8, 9]
    sampler.set_epoch(1)
    assert list(sampler) == list(range(10))


def test_load_rejects_another_seed():
    sampler = ResumableDistributedSampler(10, 1, 0, seed=1)
    with pytest.raises(MisconfigurationException, match="seed"):
        sampler.load_state_dict({"epoch": 0, "start": 0, "seed": 2, "shuffle": True})
    with pytest.raises(MisconfigurationException, match="rank"):
        ResumableDistributedSampler(10, 2, 2)


# --- shard_dataloader --------------------------------------------------------------------
class Squares(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return i


def collate_as_list(batch):
    return list(batch)


def test_rebuild_keeps_arguments_and_installs_the_sampler():
    loader = DataLoader(Squares(), batch_size=3, shuffle=False, collate_fn=collate_as_list,
                        drop_last=True, num_workers=0, timeout=0)
    sharded = shard_dataloader(loader, world_rank=1, world_size=2, train=False, seed=0)
    assert isinstance(sharded.sampler, ResumableDistributedSampler)
    assert sharded.collate_fn is collate_as_list
    assert sharded.batch_size == 3 and sharded.drop_last
    assert list(sharded) == [[1, 3, 5], [7, 9, 11]]
    assert sampler_of(sharded) is sharded.sampler
    assert loader_batch_size(sharded) == 3


def test_train_is_shuffled_when_distributed_and_user_choice_kept_for_one_worker():
    plain = DataLoader(Squares(), batch_size=2)
    train = shard_dataloader(plain, world_rank=0, world_size=2, train=True, seed=0)
    assert sampler_of(train).shuffle
    evaluated = shard_dataloader(plain, world_rank=0, world_size=2, train=False, seed=0)
    assert not sampler_of(evaluated).shuffle
    single = shard_dataloader(plain, world_rank=0, world_size=1, train=True, seed=0)
    assert not sampler_of(single).shuffle
    shuffled = DataLoader(Squares(), batch_size=2, shuffle=True)
    assert sampler_of(shard_dataloader(shuffled, world_rank=0, world_size=1, train=True,
                                       seed=0)).shuffle


class NamedLoader(DataLoader):
    def __init__(self, dataset, tag, batch_size=1, **kwargs):
        super().__init__(dataset, batch_size=batch_size, **kwargs)
        self.tag = tag


def test_dataloader_subclass_with_an_extra_argument_is_rebuilt():
    loader = NamedLoader(Squares(), "hello", batch_size=4, collate_fn=collate_as_list)
    sharded = shard_dataloader(loader, world_rank=0, world_size=3, train=True, seed=5)
    assert type(sharded) is NamedLoader and sharded.tag == "hello"
    assert sharded.batch_size == 4 and sharded.collate_fn is collate_as_list
    assert sampler_of(sharded).num_replicas == 3 and sampler_of(sharded).seed == 5


class HiddenArgLoader(DataLoader):
    def __init__(self, dataset, secret):
        super().__init__(dataset, batch_size=2)


def test_subclass_without_readable_arguments_is_named():
    with pytest.raises(MisconfigurationException, match="secret"):
        shard_dataloader(HiddenArgLoader(Squares(), 1), world_rank=0, world_size=2,
                         train=True, seed=0)


def test_iterable_and_already_distributed_loaders_untouched():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(4))

    stream = DataLoader(Stream(), batch_size=2)
    assert shard_dataloader(stream, world_rank=0, world_size=2, train=True, seed=0) is stream
    dist = DataLoader(Squares(), sampler=DistributedSampler(Squares(), 2, 0))
    assert shard_dataloader(dist, world_rank=0, world_size=2, train=True, seed=0) is dist


class EvensFirst(Sampler[int]):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(list(range(0, self.n, 2)) + list(range(1, self.n, 2)))

    def __len__(self):
        return self.n


def test_custom_sampler_is_wrapped_and_sharded():
    loader = DataLoader(Squares(), batch_size=2, sampler=EvensFirst(12))
    parts = [shard_dataloader(loader, world_rank=r, world_size=2, train=True, seed=0)
             for r in range(2)]
    assert all(isinstance(p.sampler, DistributedSamplerWrapper) for p in parts)
    assert list(parts[0].sampler) == [0, 4, 8, 1, 5, 9]
    assert sorted(list(parts[0].sampler) + list(parts[1].sampler)) == list(range(12))


def test_custom_sampler_drawing_global_rng_agrees_across_ranks():
    class Shuffled(Sampler[int]):
        def __iter__(self):
            return iter(torch.randperm(12).tolist())

        def __len__(self):
            return 12

    loader = DataLoader(Squares(), batch_size=2, sampler=Shuffled())
    parts = [list(shard_dataloader(loader, world_rank=r, world_size=2, train=True,
                                   seed=0).sampler) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(12))


def test_custom_batch_sampler_with_inner_sampler_keeps_its_batching():
    class Pairs(BatchSampler):
        pass

    loader = DataLoader(Squares(), batch_sampler=Pairs(SequentialSampler(Squares()), 2, False))
    parts = [shard_dataloader(loader, world_rank=r, world_size=2, train=False, seed=0)
             for r in range(2)]
    assert [b.tolist() for b in parts[0]] == [[0, 2], [4, 6], [8, 10]]
    assert sampler_of(parts[1]) is parts[1].batch_sampler.sampler
    assert loader_batch_size(parts[1]) == 2


def test_custom_batch_sampler_without_sampler_is_sharded_by_batches():
    batches = [[0, 1, 2], [3], [4, 5], [6, 7, 8]]
    loader = DataLoader(Squares(), batch_sampler=batches, collate_fn=collate_as_list)
    parts = [list(shard_dataloader(loader, world_rank=r, world_size=2, train=True, seed=0))
             for r in range(2)]
    assert parts == [[[0, 1, 2], [4, 5]], [[3], [6, 7, 8]]]


def test_worker_options_and_unbatched_loaders_are_preserved():
    loader = DataLoader(Squares(), batch_size=2, num_workers=2, persistent_workers=True,
                        prefetch_factor=3, pin_memory=False, timeout=5.0)
    sharded = shard_dataloader(loader, world_rank=0, world_size=2, train=True, seed=0)
    assert (sharded.num_workers, sharded.persistent_workers, sharded.prefetch_factor,
            sharded.timeout) == (2, True, 3, 5.0)
    unbatched = DataLoader(Squares(), batch_size=None)
    sharded = shard_dataloader(unbatched, world_rank=1, world_size=2, train=False, seed=0)
    assert sharded.batch_size is None and list(sharded) == [1, 3, 5, 7, 9, 11]
