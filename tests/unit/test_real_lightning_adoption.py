"""Issue 15 item 10, in process: modules, datamodules and callbacks written against the REAL
``lightning.pytorch`` (the idioms of Lightning 2.6's examples/pytorch/basics) train with
ray_lit's Trainer with their import line unchanged, and match real Lightning's own result."""

from __future__ import annotations

import subprocess
import sys

import cloudpickle
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
from ray_lit.errors import MisconfigurationException

L = pytest.importorskip("lightning.pytorch")  # the dev extra installs it

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False,
             enable_checkpointing=False, num_sanity_val_steps=0)


def _data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x.sum(1) > 0).long())


class Counting:
    """A user mixin (not a LightningModule): it stays in the adopted class's order."""

    def count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1


class LitAutoEncoder(Counting, L.LightningModule):
    """The shape of examples/pytorch/basics/autoencoder.py, on 8 features."""

    def __init__(self, hidden_dim: int = 16, learning_rate: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, hidden_dim), torch.nn.ReLU(),
                                           torch.nn.Linear(hidden_dim, 3))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(3, hidden_dim), torch.nn.ReLU(),
                                           torch.nn.Linear(hidden_dim, 8))
        self.calls: dict[str, int] = {}
        self.last_loss = None

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def _common_step(self, batch, stage: str):
        x, _ = batch
        loss = F.mse_loss(x, self(x))
        self.log(f"{stage}_loss", loss, on_step=True)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._common_step(batch, "train")
        self.last_loss = float(loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._common_step(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=None):
        return self(batch[0])

    def on_train_epoch_end(self):
        super().on_train_epoch_end()  # reaches ray_lit's hook through the user's class
        self.count("on_train_epoch_end")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate)


class SyntheticDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.train, self.val = _data(64, 0), _data(16, 1)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)


class EpochRecorder(L.Callback):
    """A user callback on Lightning's Callback, with Lightning's rank_zero_only decorator."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    @L.utilities.rank_zero_only
    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)


def _model(seed: int = 0) -> LitAutoEncoder:
    torch.manual_seed(seed)
    return LitAutoEncoder()


def test_real_lightning_module_trains_like_real_lightning(tmp_path):
    ours, theirs = _model(), _model()
    cb = EpochRecorder()
    trainer = ray_lit.Trainer(max_epochs=2, default_root_dir=str(tmp_path), callbacks=[cb],
                              **QUIET)
    trainer.fit(ours, datamodule=SyntheticDataModule())
    L.Trainer(max_epochs=2, accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "pl"),
              **QUIET).fit(theirs, datamodule=SyntheticDataModule())
    # the user's own instance holds the weights, and they are real Lightning's to 1e-6
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert ours.last_loss == pytest.approx(theirs.last_loss, rel=1e-5)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(
        float(theirs.trainer.callback_metrics["val_loss"]), rel=1e-5)
    # the user's class, mixin and super() are intact; the hook's attribute writes are visible
    assert type(ours) is LitAutoEncoder and isinstance(ours, L.LightningModule)
    assert ours.calls == {"on_train_epoch_end": 2}
    assert cb.epochs == [0, 1]
    assert dict(ours.hparams) == {"hidden_dim": 16, "learning_rate": 0.05}


def test_validate_test_predict_and_checkpoint_of_real_lightning_module(tmp_path):
    model, dm = _model(), SyntheticDataModule()
    trainer = ray_lit.Trainer(max_epochs=1, default_root_dir=str(tmp_path),
                              **{**QUIET, "enable_checkpointing": True})
    trainer.fit(model, dm)  # a datamodule passed positionally, as 2.x allows
    # on_step=True in an eval step: the epoch value is "val_loss_epoch", as in Lightning
    assert trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss_epoch"] > 0
    assert "test_loss_epoch" in trainer.test(model, datamodule=dm, verbose=False)[0]
    predictions = trainer.predict(model, datamodule=dm)
    assert [tuple(p.shape) for p in predictions] == [(8, 8), (8, 8)]
    with torch.no_grad():
        assert torch.allclose(predictions[0], model(dm.val.tensors[0][:8]))
    # ray_lit's checkpoint loads through the user's (real Lightning) class
    path = trainer.checkpoint_callback.best_model_path
    restored = LitAutoEncoder.load_from_checkpoint(path)
    assert isinstance(restored, L.LightningModule)
    assert restored.hparams.learning_rate == 0.05
    for a, b in zip(restored.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_adopted_class_is_cached_pickles_and_drops_lightning_from_its_order():
    from ray_lit.adoption import adopt_module, is_lightning_class

    model = _model()
    adopted = adopt_module(model)
    assert adopt_module(model) is adopted
    assert type(adopt_module(_model())) is type(adopted)  # one class per user class
    order = type(adopted).__mro__
    assert not any(is_lightning_class(c) for c in order)
    assert order[1:3] == (LitAutoEncoder, Counting)
    assert isinstance(adopted, ray_lit.LightningModule) and isinstance(adopted, LitAutoEncoder)
    adopted.__dict__["marker"] = 1
    assert model.marker == 1  # one state for both
    clone = cloudpickle.loads(cloudpickle.dumps(adopted))
    assert isinstance(clone, ray_lit.LightningModule) and clone.trainer is None
    assert torch.equal(clone.encoder[0].weight, model.encoder[0].weight)


def test_lightning_callbacks_without_twins_and_loggers_are_refused_naming_ours(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint, Timer
    from lightning.pytorch.loggers import CSVLogger

    # Lightning's own ModelCheckpoint runs as ray_lit's (test_lightning_callback_subclasses.py)
    built = ModelCheckpoint(monitor="val_loss")
    assert ray_lit.Trainer(callbacks=[built]).checkpoint_callback.__dict__ is built.__dict__
    with pytest.raises(MisconfigurationException, match=r"ray_lit\.callbacks\.Timer"):
        ray_lit.Trainer(callbacks=[Timer()])

    class MyTimer(Timer):  # no twin: subclasses of ModelCheckpoint, EarlyStopping, ... are
        pass              # rebased (test_lightning_callback_subclasses.py)

    with pytest.raises(MisconfigurationException,
                       match=r"subclass of Timer.*ray_lit\.callbacks\.Timer"):
        ray_lit.Trainer(callbacks=[MyTimer()])
    trainer = ray_lit.Trainer(max_epochs=1, **{**QUIET, "logger": CSVLogger(str(tmp_path))})
    with pytest.raises(MisconfigurationException, match=r"ray_lit\.loggers\.CSVLogger"):
        trainer.fit(_model(), datamodule=SyntheticDataModule())


def test_override_of_a_lightning_hook_ray_lit_never_calls_is_refused_naming_it():
    class EvalHook(LitAutoEncoder):
        def on_validation_model_eval(self):
            self.eval()

    with pytest.raises(MisconfigurationException, match=r"on_validation_model_eval"):
        ray_lit.Trainer(max_epochs=1, **QUIET).fit(EvalHook(), datamodule=SyntheticDataModule())


def test_lightning_is_never_imported_unless_the_user_did():
    code = ("import sys, torch, ray_lit\n"
            "from torch.utils.data import DataLoader, TensorDataset\n"
            "class M(ray_lit.LightningModule):\n"
            "    def __init__(self):\n"
            "        super().__init__(); self.l = torch.nn.Linear(2, 1)\n"
            "    def training_step(self, b, i): return self.l(b[0]).sum()\n"
            "    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), 0.1)\n"
            "dl = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)\n"
            "ray_lit.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,\n"
            "                enable_progress_bar=False).fit(M(), dl)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in\n"
            "       ('lightning', 'pytorch_lightning', 'lightning_fabric')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_lightning_callbacks_from_configure_callbacks_are_adopted(tmp_path):
    recorder = EpochRecorder()

    class WithCallbacks(LitAutoEncoder):
        def configure_callbacks(self):
            return recorder  # 2.x allows one callback or a list

    ray_lit.Trainer(max_epochs=2, default_root_dir=str(tmp_path), **QUIET).fit(
        WithCallbacks(), datamodule=SyntheticDataModule())
    assert recorder.epochs == [0, 1]


class ManualModel(L.LightningModule):
    """2.x manual optimisation as Lightning's docs write it."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.mse_loss(self.layer(x).squeeze(-1), y.float())
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        opt.step()

    def train_dataloader(self):
        return DataLoader(_data(32, 2), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)


def test_manual_optimisation_of_a_real_lightning_module_matches_real_lightning(tmp_path):
    torch.manual_seed(0)
    ours, theirs = ManualModel(), ManualModel()
    theirs.load_state_dict(ours.state_dict())
    trainer = ray_lit.Trainer(max_epochs=2, default_root_dir=str(tmp_path), **QUIET)
    trainer.fit(ours)
    L.Trainer(max_epochs=2, accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "pl"),
              **QUIET).fit(theirs)
    assert trainer.global_step == theirs.trainer.global_step == 8
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_autoencoder_example_flow_through_lightning_cli(tmp_path, monkeypatch):
    """examples/pytorch/basics/autoencoder.py's cli_main with ray_lit's LightningCLI: real
    Lightning classes, a Lightning callback in trainer_defaults, run=False, then fit, test and
    predict on the best checkpoint."""
    pytest.importorskip("jsonargparse")
    from ray_lit.cli import LightningCLI

    monkeypatch.chdir(tmp_path)
    recorder = EpochRecorder()
    cli = LightningCLI(LitAutoEncoder, SyntheticDataModule, seed_everything_default=1234,
                       run=False, save_config_kwargs={"overwrite": True},
                       trainer_defaults={"callbacks": recorder, "max_epochs": 2},
                       args=["--trainer.enable_progress_bar=false", "--trainer.logger=false",
                             "--model.hidden_dim=8"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert recorder.epochs == [0, 1] and cli.model.hparams.hidden_dim == 8
    tested = cli.trainer.test(ckpt_path="best", datamodule=cli.datamodule, verbose=False)
    assert tested[0]["test_loss_epoch"] > 0
    predictions = cli.trainer.predict(ckpt_path="best", datamodule=cli.datamodule)
    assert tuple(predictions[0].shape) == (8, 8)
