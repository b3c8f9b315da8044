"""``LightningCLI`` (issue 15 item 9): Lightning 2.x's command line on jsonargparse, building a
module, a datamodule and a ray_lit Trainer from ``__init__`` signatures, the command line and
YAML configs. In process, tiny models."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
from ray_lit.errors import MisconfigurationException

pytest.importorskip("jsonargparse")  # the cli extra (and dev) installs it

from ray_lit.cli import LightningCLI, SaveConfigCallback  # noqa: E402


class TinyModel(ray_lit.LightningModule):
    def __init__(self, hidden: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TinyData(ray_lit.LightningDataModule):
    def __init__(self, batch_size: int = 8, size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(size, 3, generator=g)
        self.data = TensorDataset(x, x.sum(1))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(TensorDataset(self.data.tensors[0]), batch_size=self.batch_size)


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.logger=false"]


def test_run_false_builds_model_data_and_trainer_from_the_command_line(tmp_path):
    cli = LightningCLI(TinyModel, TinyData, run=False, args=[
        "--model.hidden=7", "--data.batch_size=4", "--trainer.max_epochs=3",
        "--trainer.num_workers=0", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert isinstance(cli.model, TinyModel) and cli.model.hparams.hidden == 7
    assert cli.model.net[0].out_features == 7
    assert isinstance(cli.datamodule, TinyData) and cli.datamodule.batch_size == 4
    assert isinstance(cli.trainer, ray_lit.Trainer)
    assert cli.trainer.config.max_epochs == 3 and cli.trainer.config.num_workers == 0
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3 * 8


def test_fit_subcommand_trains_and_saves_its_config(tmp_path):
    cli = LightningCLI(TinyModel, TinyData, args=[
        "fit", "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.limit_train_batches=2", "--model.lr=0.05", "--seed_everything=7", *QUIET])
    assert cli.subcommand == "fit"
    assert cli.trainer.global_step == 4 and cli.trainer.current_epoch == 2
    assert cli.model.hparams.lr == 0.05
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 2 and saved["trainer"]["num_workers"] == 0
    assert saved["model"] == {"hidden": 4, "lr": 0.05} and saved["seed_everything"] == 7
    # the saved config reproduces the run; a second fit into the same folder refuses to
    # overwrite it unless told to
    with pytest.raises(MisconfigurationException, match="overwrite"):
        LightningCLI(TinyModel, TinyData, args=["fit", "--config", str(tmp_path / "config.yaml")])
    LightningCLI(TinyModel, TinyData, save_config_kwargs={"overwrite": True},
                 args=["fit", "--config", str(tmp_path / "config.yaml")])


def test_config_file_and_command_line_precedence_and_callbacks_by_class_path(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 5, "num_workers": 0, "default_root_dir": str(tmp_path),
                    "enable_progress_bar": False, "logger": False,
                    "callbacks": [{"class_path": "ray_lit.callbacks.EarlyStopping",
                                   "init_args": {"monitor": "val_loss", "patience": 1}}]},
        "model": {"hidden": 5},
        "data": {"size": 16},
    }))
    cli = LightningCLI(TinyModel, TinyData, run=False,
                       args=["--config", str(config), "--trainer.max_epochs=1"])
    assert cli.trainer.config.max_epochs == 1  # the command line after the file wins
    assert cli.model.hparams.hidden == 5 and len(cli.datamodule.data) == 16
    stops = [c for c in cli.trainer.callbacks if isinstance(c, ray_lit.callbacks.EarlyStopping)]
    assert len(stops) == 1 and stops[0].monitor == "val_loss" and stops[0].patience == 1


def test_print_config_shows_trainer_options_including_num_workers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(TinyModel, TinyData, args=["fit", "--trainer.num_workers=2",
                                               "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["num_workers"] == 2
    assert printed["model"] == {"hidden": 4, "lr": 0.1}
    assert printed["data"] == {"batch_size": 8, "size": 32}


def test_test_and_validate_subcommands_read_a_checkpoint(tmp_path):
    fit = LightningCLI(TinyModel, TinyData, save_config_callback=None, args=[
        "fit", "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_checkpointing=true", *QUIET])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    assert ckpt
    test = LightningCLI(TinyModel, TinyData, args=[
        "test", f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert test.result[0]["test_loss"] == pytest.approx(
        float(fit.trainer.callback_metrics["val_loss"]), rel=1e-5)
    # test wrote config.yaml into the same folder (every subcommand saves, as in 2.x)
    assert (tmp_path / "config.yaml").is_file()
    validate = LightningCLI(TinyModel, TinyData, save_config_kwargs={"overwrite": True}, args=[
        "validate", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert "val_loss" in validate.result[0]


def test_unknown_option_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        LightningCLI(TinyModel, TinyData, args=["fit", "--trainer.max_epochz=1"])
    assert "max_epochz" in capsys.readouterr().err


def test_compat_alias_serves_the_cli():
    from ray_lit import compat

    with compat.lightning_on_ray():
        from lightning.pytorch.cli import LightningCLI as FromLightning
        from pytorch_lightning.cli import LightningCLI as FromPL
    assert FromLightning is LightningCLI and FromPL is LightningCLI


def test_missing_jsonargparse_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonargparse", None)
    with pytest.raises(MisconfigurationException, match=r"ray_lit\[cli\]"):
        LightningCLI(TinyModel, args=[])


def test_predict_subcommand_returns_the_predictions(tmp_path):
    cli = LightningCLI(TinyModel, TinyData, args=[
        "predict", "--data.size=12", "--data.batch_size=5",
        f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert [tuple(p.shape) for p in cli.result] == [(5,), (5,), (2,)]


def test_subclass_mode_picks_the_model_by_class_path(tmp_path):
    cli = LightningCLI(ray_lit.LightningModule, TinyData, subclass_mode_model=True, run=False,
                       args=[f"--model.class_path={TinyModel.__module__}.TinyModel",
                             "--model.init_args.hidden=6", *QUIET])
    assert type(cli.model) is TinyModel and cli.model.hparams.hidden == 6


class LinkedCLI(LightningCLI):
    """A subclass using the documented extension points."""

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--note", default="none")
        parser.link_arguments("data.size", "model.hidden")

    def before_fit(self):
        self.order = ["before_fit"]

    def after_fit(self):
        self.order.append(f"after_fit@{self.trainer.global_step}")


def test_parser_extension_points_and_subcommand_hooks(tmp_path):
    cli = LinkedCLI(TinyModel, TinyData, save_config_callback=None, args=[
        "fit", "--data.size=16", "--note=hi", "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert cli.model.hparams.hidden == 16  # linked from data.size
    assert cli.config["fit"]["note"] == "hi"
    assert cli.order == ["before_fit", "after_fit@2"]


# --- the config saved with run=False (when the Trainer runs, as Lightning's callback does) -----
def test_run_false_saves_the_config_when_the_trainer_first_runs(tmp_path):
    cli = LightningCLI(TinyModel, TinyData, run=False, args=[
        "--model.hidden=6", "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
        "--seed_everything=3", *QUIET])
    config = tmp_path / "config.yaml"
    assert not config.exists()  # building the Trainer writes nothing
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    saved = yaml.safe_load(config.read_text())
    assert saved["model"] == {"hidden": 6, "lr": 0.1} and saved["seed_everything"] == 3
    assert saved["trainer"]["max_epochs"] == 1 and "default_root_dir" in saved["trainer"]
    assert "subcommand" not in saved
    # the same Trainer running again (a second stage) neither rewrites nor refuses
    config.write_text("kept")
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert config.read_text() == "kept"


def test_run_false_config_goes_to_the_loggers_log_dir_and_refuses_to_overwrite(tmp_path):
    args = ["--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli = LightningCLI(TinyModel, TinyData, run=False, args=args)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)  # any stage saves, not only fit
    log_dir = cli.trainer.log_dir
    assert log_dir.startswith(str(tmp_path / "lightning_logs" / "version_"))
    with open(f"{log_dir}/config.yaml") as f:
        assert yaml.safe_load(f)["trainer"]["max_epochs"] == 1
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # saved once per callback
    plain = LightningCLI(TinyModel, TinyData, run=False, args=[*args[:2], *QUIET])
    (tmp_path / "config.yaml").write_text("an earlier run's")
    with pytest.raises(MisconfigurationException, match=r"config.yaml already exists"):
        plain.trainer.fit(plain.model, datamodule=plain.datamodule)
    assert (tmp_path / "config.yaml").read_text() == "an earlier run's"


class NotingSave(SaveConfigCallback):
    def save_config(self, trainer, pl_module, stage):
        self.noted = (stage, trainer.is_global_zero)


def test_save_config_hook_save_to_log_dir_and_fast_dev_run(tmp_path):
    cli = LightningCLI(TinyModel, TinyData, run=False, save_config_callback=NotingSave,
                       save_config_kwargs={"save_to_log_dir": False}, args=[
                           "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
                           *QUIET])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (saver,) = [c for c in cli.trainer.callbacks if isinstance(c, NotingSave)]
    assert saver.noted == ("fit", True) and not (tmp_path / "config.yaml").exists()
    dev = LightningCLI(TinyModel, TinyData, run=False, args=[
        "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert not any(isinstance(c, SaveConfigCallback) for c in dev.trainer.callbacks)


def test_a_pickled_save_config_callback_writes_the_drivers_yaml(tmp_path):
    """What a Ray worker gets: the rendered text, not the parser."""
    import cloudpickle

    cli = LightningCLI(TinyModel, TinyData, run=False, args=[
        "--model.hidden=9", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    (saver,) = [c for c in cli.trainer.callbacks if isinstance(c, SaveConfigCallback)]
    copy = cloudpickle.loads(cloudpickle.dumps(saver))
    assert copy.parser is None and saver.parser is not None
    copy._write(str(tmp_path / "copy.yaml"))
    saver._write(str(tmp_path / "driver.yaml"))
    assert yaml.safe_load((tmp_path / "copy.yaml").read_text()) == \
        yaml.safe_load((tmp_path / "driver.yaml").read_text())
    assert yaml.safe_load((tmp_path / "copy.yaml").read_text())["model"]["hidden"] == 9


def test_the_config_is_written_through_a_storage_uri_log_dir(tmp_path):
    from types import SimpleNamespace

    cli = LightningCLI(TinyModel, TinyData, run=False, args=["--model.hidden=3", *QUIET])
    (saver,) = [c for c in cli.trainer.callbacks if isinstance(c, SaveConfigCallback)]
    rank0 = SimpleNamespace(log_dir=f"file://{tmp_path}/run", is_global_zero=True,
                            strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))
    saver.setup(rank0, None, "fit")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["hidden"] == 3
    again = LightningCLI(TinyModel, TinyData, run=False, args=[*QUIET])
    (second,) = [c for c in again.trainer.callbacks if isinstance(c, SaveConfigCallback)]
    with pytest.raises(MisconfigurationException, match="already exists"):
        second.setup(rank0, None, "fit")
