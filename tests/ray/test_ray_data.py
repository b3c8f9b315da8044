"""Ray Data as a training source on a local cluster (issue 20): each rank streams its own equal
shard, 2 workers train as 1 worker on the union, a killed worker resumes mid-epoch with every
sample of the epoch seen once, validation is not shuffled, bad input is named."""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time
from collections import defaultdict

import cloudpickle
import numpy as np
import pytest
import ray.cloudpickle
import torch

import ray_lit as pl
from ray_lit.data import RayDataLoader

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])
# Ray Data's tasks started from this process pickle with Ray's own copy of cloudpickle
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROWS = 96  # 6 rounds of 2 x 8: every rank gets whole batches


@pytest.fixture(autouse=True)
def _deadline():
    """A broken data path hangs rather than fails: give each test a bound."""
    def expire(signum, frame):
        raise TimeoutError("a Ray Data test ran past 240 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def data_context(ray_cluster):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    yield ctx
    ctx.enable_progress_bars = saved


def _features(batch: dict) -> dict:
    ids = batch["id"].astype(np.float32)
    x = np.stack([np.sin(ids * k) for k in (0.1, 0.2, 0.3, 0.4)], axis=1).astype(np.float32)
    return {"id": batch["id"], "x": x, "y": x.sum(1, keepdims=True) * 0.5}


def _dataset(rows: int = ROWS):
    import ray.data

    return ray.data.range(rows, override_num_blocks=4).map_batches(_features)


class Recorder(pl.LightningModule):
    """Writes the ids of every batch it trains on: ``<dir>/train<rank>.txt`` holds
    ``epoch step id,id,...`` lines in order, across attempts."""

    def __init__(self, log_dir: str = "", kill_marker: str = "", kill_step: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 1))
        self.log_dir = log_dir
        self.kill_marker = kill_marker
        self.kill_step = kill_step

    def _record(self, kind: str, batch: dict) -> None:
        if self.log_dir:
            with open(os.path.join(self.log_dir, f"{kind}{self.global_rank}.txt"), "a") as f:
                ids = ",".join(str(int(i)) for i in batch["id"])
                f.write(f"{self.current_epoch} {self.global_step} {ids}\n")

    def training_step(self, batch, batch_idx):
        assert batch["x"].device == self.device
        if (self.kill_marker and self.global_rank == 1 and self.global_step == self.kill_step
                and not os.path.exists(self.kill_marker)):
            open(self.kill_marker, "w").close()
            os._exit(1)
        self._record("train", batch)
        return torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        self._record("val", batch)
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RayDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return RayDataLoader(_dataset(), batch_size=self.batch_size)

    def val_dataloader(self):
        # a shuffle buffer on an evaluation loader is ignored: validation is never shuffled
        return RayDataLoader(_dataset(40), batch_size=4, local_shuffle_buffer_size=16)


def _options(tmp_path, name: str, **extra) -> dict:
    options = dict(max_epochs=2, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False,
                   storage_path=str(tmp_path / "runs"), run_name=name,
                   num_sanity_val_steps=0)
    options.update(extra)
    return options


def _lines(path) -> list[tuple[int, int, list[int]]]:
    out = []
    if os.path.exists(path):
        for line in pathlib.Path(path).read_text().split("\n"):
            if line:
                epoch, step, ids = line.split(" ")
                out.append((int(epoch), int(step), [int(i) for i in ids.split(",")]))
    return out


def _effective(lines):
    """A rank's history without the steps a restart rolled back (a step recorded again)."""
    kept: list[tuple[int, int, list[int]]] = []
    for epoch, step, ids in lines:
        while kept and (kept[-1][0], kept[-1][1]) >= (epoch, step):
            kept.pop()
        kept.append((epoch, step, ids))
    return kept


def _seen_per_epoch(log_dir, kind: str, ranks: int) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = defaultdict(list)
    for rank in range(ranks):
        lines = _lines(log_dir / f"{kind}{rank}.txt")
        for epoch, _, ids in (_effective(lines) if kind == "train" else lines):
            seen[epoch].extend(ids)
    return seen


@pytest.fixture(scope="module")
def reference(data_context, tmp_path_factory):
    """An uninterrupted 2-worker run, from a datamodule, with validation."""
    tmp_path = tmp_path_factory.mktemp("reference")
    pl.seed_everything(3)
    model = Recorder(str(tmp_path))
    trainer = pl.Trainer(num_workers=2, **_options(tmp_path, "reference"))
    trainer.fit(model, datamodule=RayDataModule(batch_size=8))
    return model, trainer, tmp_path


def test_each_rank_streams_a_disjoint_equal_shard_and_together_the_whole_epoch(reference):
    model, trainer, log_dir = reference
    assert trainer.global_step == 2 * ROWS // 16
    for rank in range(2):
        assert len(_lines(log_dir / f"train{rank}.txt")) == 12  # equal: 6 a rank and epoch
    seen = _seen_per_epoch(log_dir, "train", 2)
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(ROWS)), epoch


def test_validation_is_dealt_in_order_and_not_shuffled(reference):
    _, _, log_dir = reference
    for rank in range(2):
        lines = _lines(log_dir / f"val{rank}.txt")
        per_epoch = defaultdict(list)
        for epoch, _, ids in lines:
            per_epoch[epoch].extend(ids)
        for ids in per_epoch.values():
            assert ids == sorted(ids)  # the data set's order: no shuffle buffer applied
    seen = _seen_per_epoch(log_dir, "val", 2)
    assert sorted(seen[0]) == list(range(40))


def test_two_workers_train_like_one_process_on_the_union_of_their_batches(reference,
                                                                          tmp_path):
    two, _, _ = reference
    pl.seed_everything(3)
    one = Recorder()
    pl.fit(one, RayDataLoader(_dataset(), batch_size=16), num_workers=0,
           **_options(tmp_path, "one"))
    for key, value in two.state_dict().items():
        torch.testing.assert_close(value, one.state_dict()[key], rtol=1e-5, atol=1e-6)


def test_a_killed_worker_resumes_mid_epoch_seeing_every_sample_once(reference, tmp_path):
    expected, _, _ = reference
    pl.seed_everything(3)
    model = Recorder(str(tmp_path), kill_marker=str(tmp_path / "killed"), kill_step=8)
    trainer = pl.Trainer(num_workers=2, checkpoint_every_n_steps=2, max_failures=2,
                         **_options(tmp_path, "killed"))
    trainer.fit(model, datamodule=RayDataModule(batch_size=8))
    assert os.path.exists(tmp_path / "killed") and trainer.num_restarts == 1
    seen = _seen_per_epoch(tmp_path, "train", 2)
    for epoch in (0, 1):  # step 8 is mid-epoch 1: the resume continues at its batch 2
        assert sorted(seen[epoch]) == list(range(ROWS)), epoch
    for key, value in expected.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


class FailsAfterACommit(Recorder):
    """Rank 0 fails the run at step 3, once the checkpoint after step 3 is committed (a
    killed driver's run ends like this: its latest committed checkpoint is mid-epoch)."""

    def __init__(self, log_dir: str, run_dir: str) -> None:
        super().__init__(log_dir)
        self.run_dir = run_dir

    def training_step(self, batch, batch_idx):
        if self.global_step == 3 and self.global_rank == 0 and self.run_dir:
            from ray_lit.checkpoint.manager import CheckpointManager

            deadline = time.time() + 60
            while time.time() < deadline:
                latest = CheckpointManager(self.run_dir).latest()
                if latest is not None and latest.global_step == 3:
                    raise RuntimeError("the run stops here")
                time.sleep(0.2)
        return super().training_step(batch, batch_idx)


def test_a_rerun_at_three_workers_deals_the_unseen_rest_of_a_two_worker_epoch(data_context,
                                                                             tmp_path):
    """The rest of an epoch a 2-worker run left mid-way is re-split over 3 ranks by a rerun."""
    options = _options(tmp_path, "rerun", checkpoint_every_n_steps=1, max_failures=0)
    run_dir = str(tmp_path / "runs" / "rerun")
    pl.seed_everything(3)
    with pytest.raises(Exception, match="the run stops here"):
        pl.Trainer(num_workers=2, **options).fit(FailsAfterACommit(str(tmp_path), run_dir),
                                                 datamodule=RayDataModule(batch_size=8))
    pl.seed_everything(3)
    second = pl.Trainer(num_workers=3, **options)
    second.fit(Recorder(str(tmp_path)), datamodule=RayDataModule(batch_size=8))
    assert second.world_size_history == [3]
    # 3 steps of 2 ranks took 48 of the 96 rows; 3 ranks take the other 48 in 2 steps
    assert second.global_step == 3 + 2 + 4
    seen = _seen_per_epoch(tmp_path, "train", 3)
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(ROWS)), epoch


def test_a_later_validate_on_the_kept_group_reads_the_data_again(reference):
    model, trainer, _ = reference
    results = trainer.validate(model, RayDataLoader(_dataset(40), batch_size=4))
    assert set(results[0]) == {"val_loss"}


def test_predict_on_two_workers_returns_every_row_in_order(reference):
    model, trainer, _ = reference

    class Predictor(Recorder):
        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            return batch["id"]

    predictor = Predictor()
    predictor.load_state_dict(model.state_dict())
    loader = RayDataLoader(_dataset(45), batch_size=4)
    got = trainer.predict(predictor, loader)
    assert torch.cat(got).tolist() == list(range(45))  # 12 batches, the last of 1 row
    assert [len(b) for b in got] == [4] * 11 + [1]


def test_loop_options_count_ray_data_batches_as_dataloader_batches(data_context, tmp_path):
    class Counting(Recorder):
        def __init__(self):
            super().__init__()
            self.val_at: list[int] = []

        def on_validation_start(self):
            self.val_at.append(self.trainer.global_step)

    model = Counting()
    trainer = pl.fit(model, RayDataLoader(_dataset(), batch_size=8),
                     val_dataloaders=RayDataLoader(_dataset(16), batch_size=8), num_workers=0,
                     **_options(tmp_path, "options", max_epochs=1, limit_train_batches=8,
                                accumulate_grad_batches=2, val_check_interval=4))
    assert trainer.global_step == 4  # 8 batches, a step every 2
    assert model.val_at == [2, 4]  # after batches 4 and 8


def test_a_ragged_column_and_a_too_small_shard_are_named(data_context, tmp_path):
    import ray.data

    ragged = ray.data.from_items([{"tokens": np.zeros(n, dtype=np.int64)} for n in (2, 3)] * 8)
    with pytest.raises(Exception, match="column 'tokens'.*different shapes"):
        pl.fit(Recorder(), RayDataLoader(ragged, batch_size=4), num_workers=0,
               **_options(tmp_path, "ragged"))
    with pytest.raises(Exception, match="batch_size=64.*smaller than one batch"):
        pl.fit(Recorder(), RayDataLoader(_dataset(), batch_size=64), num_workers=2,
               **_options(tmp_path, "small"))
