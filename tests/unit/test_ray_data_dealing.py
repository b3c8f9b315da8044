"""How a Ray ``Dataset``'s epoch is dealt to the ranks (issue 20), on a stand-in data set: the
same ``iter_batches`` contract as Ray Data, no Ray start. The real data sets run in
tests/ray/test_ray_data.py."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from ray_lit.data.dealer import BatchDealer
from ray_lit.data.loader import RayDataLoader, StreamPosition, default_collate
from ray_lit.errors import MisconfigurationException
from ray_lit.loop.data import as_loader_list


class FakeDataset:
    """``rows`` ids in order; ``iter_batches`` like Ray Data's (numpy format, local shuffle)."""

    def __init__(self, rows: int, preserve_order: bool = False) -> None:
        self.rows = rows
        self.context = types.SimpleNamespace(
            execution_options=types.SimpleNamespace(preserve_order=preserve_order))
        self.opened = 0

    def iter_batches(self, batch_size, batch_format, drop_last, prefetch_batches,
                     local_shuffle_buffer_size=None, local_shuffle_seed=None):
        assert batch_format == "pyarrow" and not drop_last
        self.opened += 1
        ids = np.arange(self.rows)
        if local_shuffle_buffer_size:
            ids = np.random.default_rng(local_shuffle_seed).permutation(ids)
        for start in range(0, self.rows, batch_size):
            yield pa.table({"id": ids[start:start + batch_size]})


def _dealer(rows=100, batch_size=8, world_size=2, shuffle=None, drop_last=False, train=True,
            seed=0, whole=False):
    return BatchDealer(FakeDataset(rows), batch_size, world_size, shuffle, seed, drop_last, 1,
                       train, whole=whole)


def _take(dealer, epoch, start_batches, rank, world_size, count=None):
    out, index = [], rank
    while count is None or len(out) < count:
        batch = dealer.batch(epoch, start_batches, index)
        if batch is None:
            break
        out.append(batch["id"].to_pylist())
        index += world_size
    return out


def _interleaved(dealer, world_size, epoch=0, start=0):
    """Every rank's batches, asked in lock-step as DDP ranks do."""
    per_rank = [[] for _ in range(world_size)]
    index = 0
    while True:
        batches = [dealer.batch(epoch, start, index + r) for r in range(world_size)]
        if any(b is None for b in batches):
            assert all(b is None for b in batches), "ranks got different numbers of batches"
            return per_rank
        for r, b in enumerate(batches):
            per_rank[r].append(b["id"].to_pylist())
        index += world_size


def test_shards_are_disjoint_equal_and_cover_the_epoch_but_a_remainder_below_world_size():
    per_rank = _interleaved(_dealer(rows=101, batch_size=8, world_size=3), 3)
    assert len({len(batches) for batches in per_rank}) == 1  # equal: DDP never waits
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen))
    # 96 rows in 4 full rounds; the last 5 split 1 + 1 + 1, 2 rows dropped (< world size)
    assert len(seen) == 99 and set(seen) <= set(range(101))
    assert per_rank[0][0] == list(range(8)) and per_rank[1][0] == list(range(8, 16))


def test_global_batch_g_goes_to_rank_g_mod_world_size_in_stream_order():
    per_rank = _interleaved(_dealer(rows=96, batch_size=8, world_size=2), 2)
    flat = [b for pair in zip(*per_rank) for b in pair]
    assert [i for b in flat for i in b] == list(range(96))


def test_prediction_gets_every_row_in_the_streams_batches():
    dealer = _dealer(rows=45, batch_size=8, world_size=2, train=False, whole=True)
    per_rank = [_take(dealer, 0, 0, r, 2) for r in range(2)]
    assert [len(b) for b in per_rank] == [3, 3]  # batches 0, 2, 4 and 1, 3, 5
    flat = [b for pair in zip(*per_rank) for b in pair]
    assert [i for b in flat for i in b] == list(range(45))  # the last batch holds 5 rows
    dealer = _dealer(rows=40, batch_size=8, world_size=2, train=False, whole=True)
    assert [len(_take(dealer, 0, 0, r, 2)) for r in range(2)] == [3, 2]  # one batch more


def test_drop_last_drops_the_incomplete_round():
    per_rank = _interleaved(_dealer(rows=100, batch_size=8, world_size=2, drop_last=True), 2)
    assert [len(b) for b in per_rank] == [6, 6]
    assert all(len(b) == 8 for batches in per_rank for b in batches)


@pytest.mark.parametrize("new_world", [1, 2, 3])
def test_a_resume_deals_exactly_the_unseen_rest_over_any_world_size(new_world):
    dealer = _dealer(rows=96, batch_size=4, world_size=2, shuffle=10, seed=5)
    taken = [_take(dealer, 0, 0, r, 2, count=3) for r in range(2)]  # 3 batches each
    position = StreamPosition(2, 0, seed=5, shuffle=True, deterministic=True)
    state = position.state_dict(consumed_batches_per_rank=3, batch_size=4)
    assert state["start"] == 3 * 4 * 2  # rows of whole global batches, any world size
    resumed = StreamPosition(new_world, 0, seed=5, shuffle=True, deterministic=True)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the loop sets the epoch after restoring: the position stays
    again = _dealer(rows=96, batch_size=4, world_size=new_world, shuffle=10, seed=5)
    rest = _interleaved(again, new_world, start=resumed.start // 4)
    before = [i for batches in taken for b in batches for i in b]
    after = [i for batches in rest for b in batches for i in b]
    assert sorted(before + after) == list(range(96))  # nothing twice, nothing skipped


def test_the_local_shuffle_changes_with_the_epoch_and_repeats_with_the_seed():
    a = _interleaved(_dealer(rows=64, shuffle=16, seed=1), 2, epoch=0)
    b = _interleaved(_dealer(rows=64, shuffle=16, seed=1), 2, epoch=0)
    c = _interleaved(_dealer(rows=64, shuffle=16, seed=1), 2, epoch=1)
    assert a == b and a != c


def test_a_train_shard_smaller_than_one_batch_is_named():
    with pytest.raises(MisconfigurationException, match="batch_size=64.*smaller than one batch"):
        _dealer(rows=100, batch_size=64, world_size=2).batch(0, 0, 0)
    # an evaluation set that small is split equally instead (50 rows each)
    per_rank = _interleaved(_dealer(rows=100, batch_size=64, world_size=2, train=False), 2)
    assert [len(b[0]) for b in per_rank] == [50, 50]


def test_a_deterministic_dealer_reads_the_data_set_in_order():
    dealer = _dealer()
    assert dealer.dataset.context.execution_options.preserve_order is True
    fast = BatchDealer(FakeDataset(8), 4, 1, None, 0, False, 1, True, deterministic=False)
    assert fast.dataset.context.execution_options.preserve_order is False


def test_a_late_request_of_an_epoch_left_behind_ends_instead_of_restarting_it():
    dealer = _dealer(rows=64)
    _take(dealer, 1, 0, 0, 2, count=1)
    assert dealer.batch(0, 0, 2) is None
    assert dealer.dataset.opened == 1


def test_an_order_that_is_not_reproducible_restarts_the_epoch_with_a_log_line(caplog):
    position = StreamPosition(2, 1, seed=0, shuffle=False, deterministic=False)
    with caplog.at_level("WARNING"):
        position.load_state_dict({"epoch": 2, "start": 48, "seed": 0, "shuffle": False,
                                  "batches_done": 3})
    assert position.start == 0 and position.restarted_epoch and position.epoch == 2
    assert "deterministic=True" in caplog.text


def test_default_collate_makes_tensors_keeps_text_and_names_a_ragged_column():
    batch = {"x": np.ones((2, 3), dtype=np.float32), "name": np.array(["a", "b"], dtype=object),
             "img": np.array([np.zeros((2, 2)), np.ones((2, 2))] + [None], dtype=object)[:2]}
    out = default_collate(batch)
    assert out["x"].shape == (2, 3) and out["x"].dtype == torch.float32
    assert out["name"] == ["a", "b"] and out["img"].shape == (2, 2, 2)
    readonly = np.arange(4)
    readonly.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Ray's read-only buffers convert without a warning
        assert default_collate({"r": readonly})["r"].tolist() == [0, 1, 2, 3]
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros(3), np.zeros(5)
    with pytest.raises(MisconfigurationException, match="column 'tokens'.*different shapes"):
        default_collate({"tokens": ragged})


def test_bad_loader_arguments_are_named():
    with pytest.raises(MisconfigurationException, match="takes a ray.data.Dataset"):
        RayDataLoader([1, 2, 3], batch_size=2)
    fake = type("Dataset", (), {"__module__": "ray.data.dataset"})()
    for kwargs, match in (({"batch_size": 0}, "batch_size=0"),
                          ({"batch_size": 2, "prefetch_batches": -1}, "prefetch_batches"),
                          ({"batch_size": 2, "local_shuffle_buffer_size": 0}, "shuffle_buffer"),
                          ({"batch_size": 2, "collate_fn": 3}, "collate_fn")):
        with pytest.raises(MisconfigurationException, match=match):
            RayDataLoader(fake, **kwargs)


def test_a_bare_ray_dataset_is_refused_with_the_wrapper_named():
    fake = type("Dataset", (), {"__module__": "ray.data.dataset"})()
    with pytest.raises(MisconfigurationException, match="RayDataLoader"):
        as_loader_list([fake])
    import ray_lit as pl

    class Model(pl.LightningModule):
        def training_step(self, batch, batch_idx): ...

        def configure_optimizers(self): ...

    with pytest.raises(MisconfigurationException, match="RayDataLoader"):
        pl.Trainer(logger=False, num_workers=2).fit(Model(), fake)
