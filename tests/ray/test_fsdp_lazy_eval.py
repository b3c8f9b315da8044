"""``validate`` / ``test`` / ``predict(ckpt_path=<sharded ModelCheckpoint directory>)``.

Under ``strategy="fsdp"`` on 2 Ray workers the driver reads only the directory's meta file and
DCP's index, and each worker reads only the chunks of its own shards after sharding (as
``fit(ckpt_path=...)`` does): the module's ``setup`` hook routes every worker's shard reads
through a counting ``pyarrow.fs`` wrapper, and each rank reads about half of the shard files.
Under DDP on 2 workers and in process the directory still loads whole (a plain replica needs
all of it); all of them give the same metrics and predictions as the driver's trained module.
"""

from __future__ import annotations

import json
import os
import sys

import cloudpickle
import pyarrow.fs as pafs
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.callbacks import ModelCheckpoint
from ray_lit.strategies import FSDPStrategy

pytestmark = pytest.mark.ray
HERE = os.path.dirname(os.path.abspath(__file__))
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _count_shard_reads(out_dir: str, rank: int) -> None:
    """On a worker: every ``ShardSource`` read of this process goes through a counting
    filesystem; the counts are written to ``out_dir`` after each read. Installed once per
    process (warm workers serve several tests; this module's globals are fresh in each
    unpickled copy, so the state lives on the class), the counts start again at each stage."""
    from ray_lit.checkpoint.shard_restore import ShardSource

    ShardSource.counting = {"out": os.path.join(out_dir, f"reads_{rank}.json"), "counts": {}}
    if getattr(ShardSource.load_into, "counting", False):
        return
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from test_fsdp_ranged_reads import CountingHandler

    original = ShardSource.load_into

    def counted(self, targets):
        handler = CountingHandler(pafs.LocalFileSystem())
        self.filesystem = pafs.PyFileSystem(handler)
        original(self, targets)
        state = ShardSource.counting
        for name, count in handler.counts.items():
            state["counts"][name] = state["counts"].get(name, 0) + count
        with open(state["out"], "w") as f:
            json.dump(state["counts"], f)

    counted.counting = True
    ShardSource.load_into = counted


class Evaluated(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])

    def setup(self, stage: str) -> None:
        if stage != "fit" and self.trainer.world_size > 1:
            _count_shard_reads(self.out_dir, self.global_rank)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g)
    return DataLoader(TensorDataset(x, x.flip(1)), batch_size=8)


def _trainer(tmp_path, num_workers: int, strategy) -> pl.Trainer:
    return pl.Trainer(num_workers=num_workers, max_epochs=1, logger=False, max_failures=0,
                      strategy=strategy, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), callbacks=[
                          ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_last=True)])


@pytest.fixture(scope="module")
def sharded(ray_cluster, tmp_path_factory):
    """A 2-worker FSDP run's sharded ``last.ckpt`` directory and its trained module."""
    tmp_path = tmp_path_factory.mktemp("sharded")
    pl.seed_everything(2)
    model = Evaluated(str(tmp_path))
    trainer = _trainer(tmp_path, 2, FSDPStrategy(state_dict_type="sharded"))
    trainer.fit(model, _data(), _data())
    last = trainer.checkpoint_callback.last_model_path
    assert os.path.isdir(last)
    with torch.no_grad():
        expected = {"val_loss": float(torch.stack([
            nn.functional.mse_loss(model.net(x), y) for x, y in _data()]).mean())}
        expected["predictions"] = [model.net(x) for x, _ in _data()]
    return last, expected


def _module_bytes(path: str) -> int:
    """The bytes of the module's tensors in the directory's shard files (DCP's index): what
    evaluation needs, without the optimizer state."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(path).read_metadata()
    return sum(info.length for index, info in metadata.storage_data.items()
               if index.fqn.startswith("state_dict."))


def _assert_half_read_by_each_rank(out_dir, path: str) -> None:
    total = _module_bytes(path)  # each rank needs half of it
    for rank in (0, 1):
        with open(os.path.join(out_dir, f"reads_{rank}.json")) as f:
            counts = json.load(f)
        read = sum(v for k, v in counts.items() if k.endswith(".distcp"))
        assert 0.4 * total <= read <= 0.6 * total, (rank, read, total)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_fsdp_evaluation_reads_only_each_ranks_chunks(sharded, tmp_path, stage) -> None:
    last, expected = sharded
    trainer = _trainer(tmp_path, 2, "fsdp")
    model = Evaluated(str(tmp_path))  # fresh weights: everything comes from the directory
    run = trainer.validate if stage == "validate" else trainer.test
    results = run(model, _data(), ckpt_path=last, verbose=False)
    key = "val_loss" if stage == "validate" else "test_loss"
    assert results[0][key] == pytest.approx(expected["val_loss"], rel=1e-5)
    _assert_half_read_by_each_rank(tmp_path, last)


def test_fsdp_predict_reads_only_each_ranks_chunks(sharded, tmp_path) -> None:
    last, expected = sharded
    trainer = _trainer(tmp_path, 2, "fsdp")
    predictions = trainer.predict(Evaluated(str(tmp_path)), _data(), ckpt_path=last)
    torch.testing.assert_close(torch.cat(predictions), torch.cat(expected["predictions"]))
    _assert_half_read_by_each_rank(tmp_path, last)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ddp_and_in_process_still_read_a_sharded_directory_whole(sharded, tmp_path,
                                                                 num_workers) -> None:
    last, expected = sharded
    trainer = _trainer(tmp_path, num_workers, "ddp")
    results = trainer.validate(Evaluated(str(tmp_path)), _data(), ckpt_path=last,
                               verbose=False)
    assert results[0]["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    predictions = trainer.predict(Evaluated(str(tmp_path)), _data(), ckpt_path=last)
    torch.testing.assert_close(torch.cat(predictions), torch.cat(expected["predictions"]))
    assert not os.path.exists(tmp_path / "reads_0.json")  # no lazy shard reads
