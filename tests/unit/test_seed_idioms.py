"""The idioms the seed's (0.9) LightningModule docs teach, written with ``import ray_lit as pl``
and run in process: each test is one documented usage and checks the documented behaviour."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.metrics import functional as FM


def _images(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    return TensorDataset(x, (x.mean(dim=(1, 2, 3)) * 100).long() % 10)


def _trainer(tmp_path, **extra) -> pl.Trainer:
    options = dict(default_root_dir=str(tmp_path), max_epochs=1, enable_progress_bar=False,
                   enable_model_summary=False, logger=False)
    options.update(extra)
    return pl.Trainer(**options)


class Minimal(pl.LightningModule):
    """Only the required methods; TrainResult built positionally from the loss."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(28 * 28, 10)

    def forward(self, x):
        return torch.relu(self.l1(x.view(x.size(0), -1)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return pl.TrainResult(F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def test_minimal_module_trains_and_checkpoints_on_the_loss(tmp_path):
    model = Minimal()
    before = model.l1.weight.clone()
    trainer = _trainer(tmp_path)
    trainer.fit(model, DataLoader(_images(), batch_size=8))
    assert not torch.equal(before, model.l1.weight)
    # TrainResult(loss) alone: checkpoint_on defaults to the loss, ModelCheckpoint uses it
    assert trainer.checkpoint_callback.monitor == "checkpoint_on"
    assert trainer.checkpoint_callback.best_model_path.endswith(".ckpt")


class Autoencoder(pl.LightningModule):
    """A system of two models with a shared step for training and validation."""

    def __init__(self, latent_dim: int = 2):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 32), nn.ReLU(), nn.Linear(32, 28 * 28))

    def forward(self, z):
        return self.decoder(z)

    def shared_step(self, batch):
        x, _ = batch
        x = x.view(x.size(0), -1)
        return F.mse_loss(self.decoder(self.encoder(x)), x)

    def training_step(self, batch, batch_idx):
        return pl.TrainResult(self.shared_step(batch))

    def validation_step(self, batch, batch_idx):
        return pl.EvalResult(checkpoint_on=self.shared_step(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-4)


def test_system_with_shared_step_checkpoints_on_validation_and_reloads(tmp_path):
    model = Autoencoder()
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(model, DataLoader(_images(), batch_size=8), DataLoader(_images(16, 1)))
    assert trainer.checkpoint_callback.monitor == "val_checkpoint_on"
    net = Autoencoder.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    net.freeze()
    z = torch.randn(3, 2)
    assert torch.equal(net(z), model.eval()(z).detach())
    assert not any(p.requires_grad for p in net.parameters())


class ClassificationTask(pl.LightningModule):
    """Any model wrapped in a task; test_step reuses validation_step and renames the keys."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return pl.TrainResult(F.cross_entropy(self.model(x), y))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self.model(x)
        loss = F.cross_entropy(y_hat, y)
        result = pl.EvalResult(checkpoint_on=loss)
        result.log_dict({"val_acc": FM.accuracy(y_hat, y), "val_loss": loss})
        return result

    def test_step(self, batch, batch_idx):
        result = self.validation_step(batch, batch_idx)
        result.rename_keys({"val_acc": "test_acc", "val_loss": "test_loss"})
        return result

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=0.02)


def test_task_wraps_any_model_and_the_model_is_used_alone(tmp_path):
    for model in [nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
                  nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2704, 10))]:
        task = ClassificationTask(model)
        trainer = _trainer(tmp_path)
        trainer.fit(task, DataLoader(_images(), batch_size=8), DataLoader(_images(16, 1)))
        results = trainer.test(test_dataloaders=DataLoader(_images(16, 2)))
        assert set(results[0]) == {"test_acc", "test_loss"}
        model.eval()
        x = torch.rand(2, 1, 28, 28)
        assert torch.equal(model(x), task.model(x))  # the same module, outside the task


def test_epoch_level_metric_and_training_epoch_end_with_predictions(tmp_path):
    seen = {}

    class Epochs(Minimal):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            result = pl.TrainResult(loss)
            result.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                       logger=True)
            result.prediction = self(x).argmax(-1).float()
            return result

        def training_epoch_end(self, outputs):
            seen["predictions"] = outputs.prediction
            result = pl.TrainResult()
            result.log("n_predicted", outputs.prediction.numel() * 1.0, on_epoch=True)
            return result

    trainer = _trainer(tmp_path)
    trainer.fit(Epochs(), DataLoader(_images(), batch_size=8))
    assert seen["predictions"].numel() == 48  # every batch's predictions, gathered
    assert "step_train_loss" in trainer.progress_bar_metrics
    # with training_epoch_end overridden the hook's own Result is what is logged at epoch end
    assert float(trainer.logged_metrics["epoch_n_predicted"]) == 48.0


def test_epoch_mean_without_an_epoch_end_hook(tmp_path):
    class Mean(Minimal):
        def training_step(self, batch, batch_idx):
            x, y = batch
            result = pl.TrainResult(F.cross_entropy(self(x), y))
            result.log("train_loss", result.minimize, on_step=True, on_epoch=True,
                       prog_bar=True)
            return result

    trainer = _trainer(tmp_path)
    trainer.fit(Mean(), DataLoader(_images(), batch_size=8))
    assert {"step_train_loss", "epoch_train_loss"} <= set(trainer.progress_bar_metrics)


def test_validation_epoch_end_sees_gathered_predictions(tmp_path):
    seen = {}

    class Val(Minimal):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            result = pl.EvalResult(F.cross_entropy(self(x), y))  # early_stop_on, positionally
            result.prediction = self(x).argmax(-1)
            return result

        def validation_epoch_end(self, outputs):
            seen["predictions"] = outputs.prediction
            return outputs

    trainer = _trainer(tmp_path, num_sanity_val_steps=0)
    trainer.fit(Val(), DataLoader(_images(), batch_size=8), DataLoader(_images(16, 1),
                                                                      batch_size=4))
    assert seen["predictions"].shape == (16,)
    assert trainer.callback_metrics["val_early_stop_on"] is not None


def test_new_tensors_follow_the_module_with_type_as(tmp_path):
    class TypeAs(Minimal):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            offset = torch.tensor(0.0).type_as(loss)  # no .cuda() / .to(device)
            assert offset.device == loss.device == self.device
            return pl.TrainResult(loss + offset)

    _trainer(tmp_path).fit(TypeAs(), DataLoader(_images(), batch_size=8))
