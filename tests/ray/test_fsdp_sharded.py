"""``FSDPStrategy(state_dict_type="sharded")`` on 2 Ray workers (issue 16, item 3).

ModelCheckpoint writes ``torch.distributed.checkpoint`` directories with one shard file per
rank; top-k removal, ``last.ckpt`` and ``best_model_path`` work on them; the driver reads them
in a plain process (``load_from_checkpoint``, ``validate(ckpt_path="best")``); a run resumes
from one at 2 workers (exactly: the same final weights as the uninterrupted run) and at 1
worker (resharded on load).
"""

from __future__ import annotations

import os
import sys

import cloudpickle
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.callbacks import Callback, ModelCheckpoint
from ray_lit.storage.sharded_io import DCP_METADATA, META_NAME
from ray_lit.strategies import FSDPStrategy

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class MLP(pl.LightningModule):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.Tanh(), nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class RecordStart(Callback):
    """Rank 0 saves the weights it trains from (after the resume checkpoint loaded)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        state = {k: v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()
                 for k, v in pl_module.state_dict().items()}  # a gather: every rank
        if trainer.is_global_zero:
            torch.save(state, self.path)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)


def _fit(tmp_path, name: str, num_workers: int, max_epochs: int, ckpt_path: str | None = None,
         record: str | None = None):
    pl.seed_everything(5)
    model = MLP()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / name), monitor="val_loss",
                                 save_top_k=2, save_last=True)
    callbacks = [checkpoint] + ([RecordStart(record)] if record else [])
    trainer = pl.Trainer(num_workers=num_workers, max_epochs=max_epochs,
                         strategy=FSDPStrategy(state_dict_type="sharded"),
                         storage_path=str(tmp_path / "runs"), run_name=name, resume="never",
                         callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False, logger=False, num_sanity_val_steps=0)
    trainer.fit(model, _data(), _data(), ckpt_path=ckpt_path)
    return model, trainer, checkpoint


@pytest.fixture(scope="module")
def whole(ray_cluster, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sharded")
    model, trainer, checkpoint = _fit(tmp_path, "whole", num_workers=2, max_epochs=3)
    yield tmp_path, model, trainer, checkpoint
    trainer.teardown()


def test_every_rank_writes_its_shards_and_top_k_and_last_work(whole) -> None:
    tmp_path, model, trainer, checkpoint = whole
    assert trainer.global_step == 12  # 3 epochs x 32 samples per rank / batch 8
    names = sorted(os.listdir(tmp_path / "whole"))
    assert len(names) == 3 and "last.ckpt" in names  # top 2 + last; the third one removed
    assert sorted(checkpoint.best_k_models) == sorted(
        str(tmp_path / "whole" / n) for n in names if n != "last.ckpt")
    for name in names:
        assert sorted(os.listdir(tmp_path / "whole" / name)) == [
            DCP_METADATA, "__0_0.distcp", "__1_0.distcp", META_NAME]
    # the driver reads a directory in a plain process: last.ckpt is the driver's module
    loaded = MLP.load_from_checkpoint(checkpoint.last_model_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert os.path.isdir(checkpoint.best_model_path)
    results = trainer.validate(dataloaders=_data(), ckpt_path="best", verbose=False)
    assert results[0]["val_loss"] == pytest.approx(float(checkpoint.best_model_score), rel=1e-5)


def _epoch_one(checkpoint: ModelCheckpoint) -> str:
    paths = [p for p in checkpoint.saved_paths if "epoch=1-" in os.path.basename(p)]
    assert len(paths) == 1
    return paths[0]


def test_resume_at_two_workers_ends_where_the_uninterrupted_run_ends(whole) -> None:
    tmp_path, model, _, checkpoint = whole
    source = _epoch_one(checkpoint)
    assert os.path.isdir(source)  # val_loss falls: top-k removed epoch 0's, kept this one
    resumed, trainer, resumed_checkpoint = _fit(tmp_path, "resume2", num_workers=2,
                                                max_epochs=3, ckpt_path=source)
    assert trainer.global_step == 12
    # the resumed ModelCheckpoint writes on in the checkpoint's dirpath, where epoch 2's name
    # is taken: rank 0 picks the "-v1" name for every rank (each rank's shards in one place)
    new = resumed_checkpoint.best_model_path
    assert new == str(tmp_path / "whole" / "epoch=2-step=12-v1.ckpt")
    assert sorted(os.listdir(new)) == [DCP_METADATA, "__0_0.distcp", "__1_0.distcp", META_NAME]
    # same seed, same sampler position, same world size: the same steps from the same state
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_resume_at_one_worker_reshards_from_a_two_worker_checkpoint(whole) -> None:
    tmp_path, _, _, checkpoint = whole
    source = _epoch_one(checkpoint)
    start = str(tmp_path / "start.pt")
    resumed, trainer, _ = _fit(tmp_path, "resume1", num_workers=1, max_epochs=3,
                               ckpt_path=source, record=start)
    expected = MLP.load_from_checkpoint(source).state_dict()
    began = torch.load(start, weights_only=True)
    for key, value in expected.items():
        assert torch.equal(began[key], value), key  # it trained on from the checkpoint
    assert trainer.global_step == 8 + 8  # 64 samples / batch 8 on one rank for the last epoch
