"""Around the loop (issue 3) through a real Trainer: exact restore from a checkpoint, loggers
read back with the readers a user would use, datamodules, precision, the LR monitor, reload."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from ray_lit.loggers import CSVLogger, TensorBoardLogger


def _data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))


class Regressor(pl.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.05, dropout: float = 0.2):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def _trainer(tmp_path, **extra):
    options = dict(default_root_dir=str(tmp_path), enable_progress_bar=False,
                   enable_model_summary=False, logger=False)
    options.update(extra)
    return pl.Trainer(**options)


def _loaders():
    return (DataLoader(_data(), batch_size=8, shuffle=True),
            DataLoader(_data(32, 1), batch_size=16))


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    pl.seed_everything(1)
    full = Regressor()
    _trainer(tmp_path / "full", max_epochs=4).fit(full, *_loaders())

    pl.seed_everything(1)
    first = Regressor()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_last=True)
    es = EarlyStopping(monitor="val_loss", patience=100)
    _trainer(tmp_path / "half", max_epochs=2, callbacks=[ckpt, es]).fit(first, *_loaders())
    saved = torch.load(ckpt.last_model_path, weights_only=False)
    assert saved["epoch"] == 1 and saved["global_step"] == 16  # 2.x: the epoch just run
    assert {"state_dict", "optimizer_states", "lr_schedulers", "callbacks", "loops",
            "hyper_parameters", "checkpoint_callback_best_model_path",
            "early_stop_callback_state_dict"} <= set(saved)

    class Probe(EarlyStopping):
        def on_train_start(self, trainer, pl_module):
            self.restored_best = self.best_score

    resumed = Regressor()
    es2 = Probe(monitor="val_loss", patience=100)
    trainer = _trainer(tmp_path / "half", max_epochs=4, callbacks=[es2],
                       resume_from_checkpoint=ckpt.last_model_path)
    trainer.fit(resumed, *_loaders())
    assert trainer.current_epoch == 4 and trainer.global_step == 32
    assert es2.restored_best == pytest.approx(es.best_score)  # callback state came back
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 4)  # scheduler restored
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_2x_ckpt_path_keyword_resumes(tmp_path):
    first = Regressor()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "c"), save_last=True)
    _trainer(tmp_path, max_epochs=1, callbacks=[ckpt]).fit(first, *_loaders())
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(Regressor(), *_loaders(), ckpt_path=ckpt.last_model_path)
    assert trainer.global_step == 16


def test_weights_only_checkpoint_cannot_resume(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "c"), save_weights_only=True)
    _trainer(tmp_path, max_epochs=1, callbacks=[ckpt]).fit(Regressor(), *_loaders())
    with pytest.raises(pl.MisconfigurationException, match="only the model"):
        _trainer(tmp_path, max_epochs=2, resume_from_checkpoint=ckpt.best_model_path).fit(
            Regressor(), *_loaders())


def test_load_from_checkpoint_rebuilds_with_hparams_and_overrides(tmp_path):
    model = Regressor(hidden=12, lr=0.01)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(model, *_loaders())
    path = trainer.checkpoint_callback.best_model_path
    loaded = Regressor.load_from_checkpoint(path)
    assert loaded.hparams.hidden == 12 and loaded.hparams.lr == 0.01
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert Regressor.load_from_checkpoint(path, lr=0.5).hparams.lr == 0.5


def test_tensorboard_and_csv_loggers_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(str(tmp_path), name="tb")
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    trainer = _trainer(tmp_path, max_epochs=2, logger=[tb, csv_logger], log_every_n_steps=2)
    trainer.fit(Regressor(), *_loaders())
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    steps = [e.step for e in events.Scalars("train_loss_step")]
    assert steps == [1, 3, 5, 7, 9, 11, 13, 15]  # every 2nd batch, at the step it was logged
    assert len(events.Scalars("val_loss")) == 2
    assert os.path.exists(os.path.join(tb.log_dir, "hparams.yaml"))
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {"train_loss_step", "train_loss_epoch", "val_loss", "epoch", "step"} <= set(rows[0])
    assert sum(1 for r in rows if r["val_loss"]) == 2


def test_default_logger_dirs_and_checkpoint_dir(tmp_path):
    trainer = pl.Trainer(default_root_dir=str(tmp_path), max_epochs=1,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Regressor(), *_loaders())
    expected = os.path.join(str(tmp_path), "lightning_logs", "version_0", "checkpoints")
    assert os.path.dirname(trainer.checkpoint_callback.best_model_path) == expected


class DataModule(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.calls = []

    def prepare_data(self):
        self.calls.append("prepare_data")

    def setup(self, stage=None):
        self.calls.append(f"setup:{stage}")
        self.train_set, self.val_set = _data(), _data(32, 1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=16)

    def test_dataloader(self):
        return DataLoader(self.val_set, batch_size=16)


def test_datamodule_fit_validate_test(tmp_path):
    class WithTest(Regressor):
        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", torch.nn.functional.mse_loss(self(x), y))

    dm = DataModule()
    trainer = _trainer(tmp_path, max_epochs=1)
    model = WithTest()
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 8
    assert trainer.validate(model, datamodule=dm)[0].keys() == {"val_loss"}
    assert trainer.test(model, datamodule=dm)[0].keys() == {"test_loss"}
    # prepare_data once; setup once per stage
    assert dm.calls == ["prepare_data", "setup:fit", "setup:validate", "setup:test"]
    assert dm.has_prepared_data and dm.has_setup_fit and dm.has_setup_test


def test_bf16_autocast_runs_the_step_in_bfloat16(tmp_path):
    seen = {}

    class Probe(Regressor):
        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self(x)
            seen["dtype"] = out.dtype
            return torch.nn.functional.mse_loss(out.float(), y)

    _trainer(tmp_path, max_epochs=1, precision="bf16").fit(Probe(), *_loaders())
    assert seen["dtype"] == torch.bfloat16


def test_learning_rate_monitor_through_the_trainer(tmp_path):
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    trainer = _trainer(tmp_path, max_epochs=3, logger=csv_logger,
                       callbacks=[LearningRateMonitor()])
    trainer.fit(Regressor(), *_loaders())
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        lrs = [float(r["lr-Adam"]) for r in csv.DictReader(f) if r.get("lr-Adam")]
    assert lrs == pytest.approx([0.05, 0.025, 0.0125])


def test_model_summary_is_printed(tmp_path, capsys):
    pl.Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False,
               enable_progress_bar=False).fit(Regressor(), *_loaders())
    out = capsys.readouterr().out
    assert "Trainable params" in out and "Sequential" in out


def test_progress_bar_lines_when_not_a_terminal(tmp_path, capsys):
    pl.Trainer(default_root_dir=str(tmp_path), max_epochs=2, logger=False,
               enable_model_summary=False).fit(Regressor(), *_loaders())
    out = capsys.readouterr().out
    assert "Epoch 0" in out and "Epoch 1" in out and "val_loss" in out


def test_no_step_metrics_are_logged_inside_an_accumulation_window(tmp_path):
    class Recording(CSVLogger):
        steps: list = []

        def log_metrics(self, metrics, step=None):
            if "train_loss_step" in metrics:
                Recording.steps.append(step)
            super().log_metrics(metrics, step)

    logger = Recording(str(tmp_path), name="acc")
    trainer = _trainer(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1,
                       accumulate_grad_batches=2)
    trainer.fit(Regressor(), *_loaders())
    assert trainer.global_step == 4
    assert Recording.steps == [0, 1, 2, 3]  # one row per optimizer step, none mid-window
