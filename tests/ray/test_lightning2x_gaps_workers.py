"""Issue 15's last 2.x gaps on 2 Ray workers: ``log_model`` uploads from the driver the
checkpoints rank 0 wrote, ``LightningCLI(run=False)`` saves its config when the Trainer runs,
and a subclass of the real Lightning ``ModelCheckpoint`` runs rebased on ray_lit's."""

from __future__ import annotations

import os
import sys

import cloudpickle
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.callbacks import ModelCheckpoint

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=batch_size)


class Regression(pl.LightningModule):
    def __init__(self, hidden: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x).squeeze(-1), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02)


QUIET = {"enable_progress_bar": False, "enable_model_summary": False,
         "num_sanity_val_steps": 0, "process_group_timeout_s": 30}


def test_mlflow_log_model_all_uploads_rank0s_checkpoints_from_the_driver(ray_cluster, tmp_path,
                                                                        monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from ray_lit.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger("workers", tracking_uri=store, log_model="all")
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), monitor="val_loss",
                                 filename="{epoch}", save_top_k=1, save_last=True)
    trainer = pl.Trainer(num_workers=2, max_epochs=3, default_root_dir=str(tmp_path),
                         logger=logger, callbacks=[checkpoint], **QUIET)
    trainer.fit(Regression(), _loader(), _loader())
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    folders = {f.path for f in client.list_artifacts(logger.run_id) if f.is_dir}
    # every epoch's checkpoint reached the driver's logger before the next replaced it
    assert folders == {"epoch=0", "epoch=1", "epoch=2", "last"}
    best = os.path.splitext(os.path.basename(trainer.checkpoint_callback.best_model_path))[0]
    local = mlflow.artifacts.download_artifacts(run_id=logger.run_id, artifact_path=best,
                                                dst_path=str(tmp_path / "dl"),
                                                tracking_uri=store)
    uploaded = torch.load(os.path.join(local, f"{best}.ckpt"), weights_only=False)
    written = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert uploaded["global_step"] == written["global_step"]
    assert torch.equal(uploaded["state_dict"]["net.0.weight"],
                       written["state_dict"]["net.0.weight"])
    with open(os.path.join(local, "aliases.txt")) as f:
        assert f.read() == "['latest', 'best']"
    # rank 0's links of the files in flight were removed once uploaded
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["epoch=2.ckpt", "last.ckpt"]


class Data(pl.LightningDataModule):
    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.size = size

    def train_dataloader(self):
        return _loader(self.size)

    def val_dataloader(self):
        return _loader(self.size)


def test_cli_run_false_config_and_a_lightning_checkpoint_subclass_on_two_workers(ray_cluster,
                                                                                 tmp_path):
    pytest.importorskip("jsonargparse")
    L = pytest.importorskip("lightning.pytorch")
    import yaml

    from ray_lit.cli import LightningCLI

    class CountingCheckpoint(L.callbacks.ModelCheckpoint):
        """Real Lightning's ModelCheckpoint, overriding ``on_validation_end``."""

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.checked: list[tuple[int, int]] = []

        def on_validation_end(self, trainer, pl_module):
            self.checked.append((trainer.current_epoch, trainer.global_rank))
            super().on_validation_end(trainer, pl_module)

    checkpoint = CountingCheckpoint(dirpath=str(tmp_path / "ckpts"), monitor="val_loss",
                                    filename="{epoch}", save_top_k=1)

    class WithCheckpoint(LightningCLI):
        def instantiate_trainer(self, **kwargs):
            # the CLI's callbacks type is ray_lit's Callback: a Lightning one comes in here
            return super().instantiate_trainer(callbacks=[checkpoint], **kwargs)

    cli = WithCheckpoint(Regression, Data, run=False, args=[
        "--model.hidden=5", "--trainer.num_workers=2", "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0"])
    assert not (tmp_path / "config.yaml").exists()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # rank 0 wrote the YAML the driver rendered (the parser never left the driver)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"] == {"hidden": 5} and saved["trainer"]["num_workers"] == 2
    # the user's Lightning subclass ran in the workers; rank 0's state came back to it
    running = cli.trainer.checkpoint_callback
    assert isinstance(running, CountingCheckpoint)
    assert running.checked == [(0, 0), (1, 0)]
    assert sorted(os.listdir(tmp_path / "ckpts")) == [os.path.basename(running.best_model_path)]
    assert running.best_model_path.startswith(str(tmp_path / "ckpts"))
