"""Issue 15: ``LightningCLI`` with Lightning's own callbacks named on the command line or in a
config (``--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint``, ``+=``, YAML
``class_path``). Real Lightning 2.6's LightningCLI parses the same arguments: the resolved
classes and init args agree, and ray_lit builds its callback of the same name from them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
from ray_lit.errors import MisconfigurationException

pytest.importorskip("jsonargparse")  # the cli extra (and dev) installs it
L = pytest.importorskip("lightning.pytorch")  # the dev extra installs lightning 2.x
from lightning.pytorch.cli import LightningCLI as RealCLI  # noqa: E402

from ray_lit.cli import LightningCLI  # noqa: E402

CALLBACKS = "lightning.pytorch.callbacks"


class Regression(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.layer(x).squeeze(-1), y))

    def train_dataloader(self):
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1)), batch_size=16)

    val_dataloader = train_dataloader

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _both(args: list[str]):
    """Lightning's CLI and ours on the same arguments (``run=False``)."""
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    ref = RealCLI(Regression, run=False, args=args, save_config_callback=None,
                  trainer_defaults={**quiet, "accelerator": "cpu", "devices": 1})
    ours = LightningCLI(Regression, run=False, args=args, save_config_callback=None,
                        trainer_defaults=quiet)
    return ref, ours


def _parsed(cli) -> list[tuple[str, dict]]:
    return [(c.class_path, dict(vars(c.init_args))) for c in cli.config.trainer.callbacks]


def _of(trainer, name: str) -> list:
    cls = getattr(ray_lit.callbacks, name)
    return [c for c in trainer.callbacks if isinstance(c, cls)]


def test_command_line_class_paths_and_append_parse_as_lightning_and_build_twins(tmp_path):
    args = [f"--trainer.callbacks={CALLBACKS}.ModelCheckpoint",
            "--trainer.callbacks.monitor=val_loss", "--trainer.callbacks.save_top_k=2",
            f"--trainer.callbacks.dirpath={tmp_path}",
            f"--trainer.callbacks+={CALLBACKS}.EarlyStopping",
            "--trainer.callbacks.monitor=val_loss", "--trainer.callbacks.patience=2",
            "--trainer.callbacks.min_delta=0.5"]
    ref, ours = _both(args)
    assert _parsed(ours) == _parsed(ref)  # the same classes and init args, defaults included
    assert [p for p, _ in _parsed(ours)] == [f"{CALLBACKS}.ModelCheckpoint",
                                              f"{CALLBACKS}.EarlyStopping"]
    ref_ckpt = next(c for c in ref.trainer.callbacks if type(c).__name__ == "ModelCheckpoint")
    ref_stop = next(c for c in ref.trainer.callbacks if type(c).__name__ == "EarlyStopping")
    [ckpt], [stop] = _of(ours.trainer, "ModelCheckpoint"), _of(ours.trainer, "EarlyStopping")
    assert (ckpt.monitor, ckpt.save_top_k, ckpt.dirpath) == \
        (ref_ckpt.monitor, ref_ckpt.save_top_k, ref_ckpt.dirpath)
    assert (stop.monitor, stop.patience, stop.mode) == \
        (ref_stop.monitor, ref_stop.patience, ref_stop.mode)
    assert stop.min_delta == abs(ref_stop.min_delta) == 0.5  # Lightning stores it signed


def test_yaml_config_class_paths_build_twins_that_train(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"trainer": {
        "max_epochs": 30, "default_root_dir": str(tmp_path), "callbacks": [
        {"class_path": f"{CALLBACKS}.EarlyStopping",
         "init_args": {"monitor": "val_loss", "patience": 1, "min_delta": 100.0}}]}}))
    ref, ours = _both(["--config", str(config)])
    assert _parsed(ours) == _parsed(ref)
    [stop] = _of(ours.trainer, "EarlyStopping")
    assert stop.patience == 1 and stop.min_delta == 100.0
    ours.trainer.fit(ours.model)
    # no epoch improves by 100: stopped after patience, as Lightning's EarlyStopping does
    ref.trainer.fit(ref.model)
    assert ours.trainer.current_epoch == ref.trainer.current_epoch < 30


def test_a_lightning_callback_without_a_ray_lit_twin_names_ray_lits_class():
    with pytest.raises(MisconfigurationException, match=r"ray_lit\.callbacks\.Timer"):
        LightningCLI(Regression, run=False, save_config_callback=None,
                     args=[f"--trainer.callbacks={CALLBACKS}.Timer"])


def test_an_option_ray_lits_callback_cannot_honour_is_refused_by_name():
    with pytest.raises(MisconfigurationException, match=r"save_on_exception"):
        LightningCLI(Regression, run=False, save_config_callback=None,
                     args=[f"--trainer.callbacks={CALLBACKS}.ModelCheckpoint",
                           "--trainer.callbacks.save_on_exception=true"])


def test_a_cli_that_never_names_lightning_does_not_import_it():
    code = ("import sys, torch, ray_lit\n"
            "from ray_lit.cli import LightningCLI\n"
            "class M(ray_lit.LightningModule):\n"
            "    def __init__(self, lr: float = 0.1):\n"
            "        super().__init__(); self.layer = torch.nn.Linear(2, 1)\n"
            "cli = LightningCLI(M, run=False, save_config_callback=None, args=[\n"
            "    '--trainer.callbacks=ray_lit.callbacks.EarlyStopping',\n"
            "    '--trainer.callbacks.monitor=val_loss'])\n"
            "assert cli.trainer.callbacks[0].monitor == 'val_loss'\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
