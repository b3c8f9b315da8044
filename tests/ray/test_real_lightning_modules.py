"""Issue 15 item 10 on 2 Ray workers: modules written against the REAL Lightning 2.x package
(``import pytorch_lightning as pl`` as the Ray Train Lightning guide writes it,
``lightning.pytorch`` as Lightning 2.6's examples do) train on ray_lit's workers unchanged, and
the user's own instance comes back with the trained weights."""

from __future__ import annotations

import sys

import cloudpickle
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit

pl = pytest.importorskip("pytorch_lightning")  # the dev extra installs lightning 2.x
L = pytest.importorskip("lightning.pytorch")

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False,
             enable_checkpointing=False, num_sanity_val_steps=0)


def _images(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g),
                         torch.randint(0, 4, (n,), generator=g))


class ImageClassifier(pl.LightningModule):
    """The Ray Train guide's module, with a tiny convnet for resnet18."""

    def __init__(self):
        super(ImageClassifier, self).__init__()  # noqa: UP008 (the guide's spelling)
        self.model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
                                         torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 4))
        self.criterion = torch.nn.CrossEntropyLoss()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self.forward(x), y)
        self.log("loss", loss, on_step=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=0.01)


class Regressor(L.LightningModule):
    """Lightning 2.6 basics style: hparams, a shared step, a sync_dist validation metric."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.layer(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Data(L.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(3)
        x = torch.randn(96, 8, generator=g)
        self.data = TensorDataset(x, x @ torch.arange(8.0) / 8)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


class Seen(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.epochs_seen = getattr(pl_module, "epochs_seen", 0) + 1


def test_ray_train_guide_module_on_two_workers(ray_cluster, tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = ray_lit.fit(model, train_dataloaders=DataLoader(_images(), batch_size=8),
                          num_workers=2, max_epochs=2, default_root_dir=str(tmp_path), **QUIET)
    assert trainer.world_size == 2 and trainer.global_step == 8  # 64 / 2 ranks / 8 per batch
    assert type(model) is ImageClassifier  # the user's instance, trained in place
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert float(trainer.callback_metrics["loss"]) > 0


def test_lightning_26_module_on_two_workers_matches_real_lightning_in_one_process(
        ray_cluster, tmp_path):
    torch.manual_seed(0)
    ours = Regressor()
    theirs = Regressor()
    theirs.load_state_dict(ours.state_dict())
    # each rank's whole half of the data in one batch: the DDP average of the two halves'
    # gradients is real Lightning's full-batch gradient in one process, whatever the shuffle
    trainer = ray_lit.Trainer(num_workers=2, max_epochs=4, default_root_dir=str(tmp_path),
                              callbacks=[Seen()], **QUIET)
    trainer.fit(ours, datamodule=Data(batch_size=48))
    L.Trainer(max_epochs=4, accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "pl"),
              **QUIET).fit(theirs, datamodule=Data(batch_size=96))
    assert trainer.global_step == 4
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(
        float(theirs.trainer.callback_metrics["val_loss"]), rel=1e-4)
    assert isinstance(ours, L.LightningModule) and ours.hparams.lr == 0.1
    # evaluation on the same worker group, with the user's instance passed again
    results = trainer.validate(ours, datamodule=Data(batch_size=48), verbose=False)
    assert results[0]["val_loss"] == pytest.approx(
        float(theirs.trainer.callback_metrics["val_loss"]), rel=1e-4)
    trainer.teardown()


def test_lightning_cli_trains_real_lightning_classes_on_two_workers(ray_cluster, tmp_path):
    pytest.importorskip("jsonargparse")
    from ray_lit.cli import LightningCLI

    cli = LightningCLI(Regressor, Data, save_config_kwargs={"overwrite": True}, args=[
        "fit", "--trainer.num_workers=2", "--trainer.max_epochs=2", "--data.batch_size=16",
        "--model.lr=0.05", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false"])
    assert cli.trainer.world_size == 2 and cli.trainer.global_step == 2 * 3  # 96/2/16 a rank
    assert isinstance(cli.model, L.LightningModule) and cli.model.hparams.lr == 0.05
    assert "val_loss" in cli.trainer.callback_metrics
    assert (tmp_path / "config.yaml").exists()
    cli.trainer.teardown()
