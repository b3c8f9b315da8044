"""Issue 15 on 2 Ray workers: ``LightningCLI`` with Lightning's own ``ModelCheckpoint`` and
``EarlyStopping`` named by class path on the command line trains with ray_lit's callbacks of the
same name; real Lightning 2.6's CLI on the same arguments (one process) stops at the same epoch."""

from __future__ import annotations

import os
import sys

import cloudpickle
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit

pytest.importorskip("jsonargparse")
L = pytest.importorskip("lightning.pytorch")  # the dev extra installs lightning 2.x
from lightning.pytorch.cli import LightningCLI as RealCLI  # noqa: E402

from ray_lit.cli import LightningCLI  # noqa: E402

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CALLBACKS = "lightning.pytorch.callbacks"


class Regression(L.LightningModule):
    def __init__(self, lr: float = 0.05, rows: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.layer(x).squeeze(-1), y), sync_dist=True)

    def train_dataloader(self):
        x = torch.randn(self.hparams.rows, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)

    val_dataloader = train_dataloader

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _args(folder) -> list[str]:
    return ["fit", "--trainer.max_epochs=20", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={folder}",
            f"--trainer.callbacks={CALLBACKS}.ModelCheckpoint",
            "--trainer.callbacks.monitor=val_loss", f"--trainer.callbacks.dirpath={folder}/ck",
            f"--trainer.callbacks+={CALLBACKS}.EarlyStopping",
            "--trainer.callbacks.monitor=val_loss", "--trainer.callbacks.patience=1",
            "--trainer.callbacks.min_delta=100"]


def test_cli_lightning_callbacks_train_on_two_workers(ray_cluster, tmp_path):
    # Lightning in one process on one rank's share of the rows (the same steps per epoch)
    ref = RealCLI(Regression, args=[*_args(tmp_path / "pl"), "--trainer.accelerator=cpu",
                                    "--trainer.devices=1", "--model.rows=16"])
    ours = LightningCLI(Regression, args=[*_args(tmp_path / "ours"),
                                          "--trainer.num_workers=2"])
    assert ours.trainer.world_size == 2
    # no epoch improves val_loss by 100: both stop after patience, at the same epoch
    assert ours.trainer.current_epoch == ref.trainer.current_epoch < 19
    [ckpt] = [c for c in ours.trainer.callbacks
              if isinstance(c, ray_lit.callbacks.ModelCheckpoint)]
    assert ckpt.best_model_path.startswith(str(tmp_path / "ours" / "ck"))
    assert os.path.isfile(ckpt.best_model_path)
    assert sorted(os.listdir(tmp_path / "ours" / "ck")) == \
        sorted(os.listdir(tmp_path / "pl" / "ck"))  # the same file names as Lightning's
