"""``fit(ckpt_path=<sharded ModelCheckpoint directory>)`` with ``strategy="fsdp"`` on 2 Ray
workers: the driver sends a lazy checkpoint (meta file and DCP index only), and each worker
reads only its own chunks. The module's ``on_load_checkpoint`` (it runs on each worker before
the weights load) routes the reads through a counting ``pyarrow.fs`` wrapper; each rank then
reports the bytes it read from the shard files: about half each."""

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


class Counted(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])

    def on_load_checkpoint(self, checkpoint) -> None:
        if HERE not in sys.path:  # on a worker: the counting wrapper's module
            sys.path.insert(0, HERE)
        from test_fsdp_ranged_reads import CountingHandler

        state = checkpoint["state_dict"]
        handler = CountingHandler(pafs.LocalFileSystem())
        state.source.filesystem = pafs.PyFileSystem(handler)  # shared by the optimizer states
        self.__dict__["_reads"] = (type(state).__name__, handler)

    def on_train_start(self) -> None:
        kind, handler = self.__dict__.get("_reads", (None, None))
        with open(os.path.join(self.out_dir, f"reads_{self.global_rank}.json"), "w") as f:
            json.dump({"kind": kind, "counts": handler.counts if handler else {}}, f)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _fit(tmp_path, epochs: int, ckpt_path=None):
    pl.seed_everything(2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g)
    model = Counted(str(tmp_path))
    trainer = pl.Trainer(num_workers=2, max_epochs=epochs, logger=False, max_failures=0,
                         strategy=FSDPStrategy(state_dict_type="sharded"),
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), storage_path=str(tmp_path / "runs"),
                         run_name=f"e{epochs}", resume="never", callbacks=[
                             ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_last=True)])
    trainer.fit(model, DataLoader(TensorDataset(x, x[:, :64]), batch_size=8),
                ckpt_path=ckpt_path)
    return trainer


def test_each_worker_reads_only_its_chunks_of_a_ckpt_path_directory(ray_cluster,
                                                                     tmp_path) -> None:
    last = _fit(tmp_path, 1).checkpoint_callback.last_model_path
    assert os.path.isdir(last)
    trainer = _fit(tmp_path, 2, ckpt_path=last)
    assert trainer.global_step == 8  # 4 steps per epoch per rank: it resumed after epoch 0
    total = sum(os.path.getsize(os.path.join(last, n)) for n in os.listdir(last)
                if n.endswith(".distcp"))
    for rank in (0, 1):
        with open(tmp_path / f"reads_{rank}.json") as f:
            report = json.load(f)
        assert report["kind"] == "ShardedModuleState"  # the driver sent a lazy checkpoint
        read = sum(v for k, v in report["counts"].items() if k.endswith(".distcp"))
        assert 0.4 * total <= read <= 0.6 * total, (rank, read, total)
