"""Real Lightning 0.9 code unchanged (issue 14): the import aliases, ``python -m ray_lit``, the
0.9 command line, the 0.9 module/datamodule/trainer attributes, process-count options and
optimizer wrappers without a closure. All in process; no Ray starts."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import types
import warnings
from typing import Any

import pytest
import torch
from doubles import DeterministicModel, constant_loader
from torch.utils.data import DataLoader

import ray_lit
import ray_lit.compat
from ray_lit.config import TrainerConfig, run_overrides
from ray_lit.errors import MisconfigurationException

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def aliases():
    """The Lightning aliases for one test, removed afterwards whatever happens."""
    ray_lit.compat.install()
    try:
        yield
    finally:
        ray_lit.compat.uninstall()
    assert not ray_lit.compat.is_installed()


# --- 1. the aliases ------------------------------------------------------------------------------
def test_09_import_paths_resolve_to_ray_lit_objects(aliases):
    import pytorch_lightning as pl
    from pytorch_lightning import _logger, seed_everything
    from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
    from pytorch_lightning.core import LightningModule
    from pytorch_lightning.core.decorators import auto_move_data
    from pytorch_lightning.core.lightning import LightningModule as LightningModule2
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger  # noqa: F401
    from pytorch_lightning.metrics.classification import accuracy
    from pytorch_lightning.metrics.functional import accuracy as accuracy2
    from pytorch_lightning.trainer import Trainer
    from pytorch_lightning.utilities import (
        AttributeDict,
        rank_zero_info,
        rank_zero_only,
        rank_zero_warn,
    )
    from pytorch_lightning.utilities.seed import seed_everything as seed2

    assert pl.LightningModule is LightningModule is LightningModule2 is ray_lit.LightningModule
    assert pl.Trainer is Trainer is ray_lit.Trainer
    assert pl.TrainResult is ray_lit.TrainResult and pl.EvalResult is ray_lit.EvalResult
    assert pl.LightningDataModule is ray_lit.LightningDataModule
    assert pl.Callback is Callback is ray_lit.Callback
    assert ModelCheckpoint is ray_lit.callbacks.ModelCheckpoint
    assert EarlyStopping is ray_lit.callbacks.EarlyStopping
    assert accuracy is accuracy2 is ray_lit.metrics.functional.accuracy
    assert pl.metrics.functional.accuracy is accuracy  # submodules reachable as attributes
    assert seed_everything is seed2 is ray_lit.seed_everything
    assert _logger.name == "lightning"
    assert AttributeDict(a=1).a == 1
    assert callable(rank_zero_info) and callable(rank_zero_warn) and callable(rank_zero_only)

    def forward(x: Any) -> Any:
        return x

    assert auto_move_data(forward) is forward  # ray_lit moves batches already


def test_2x_import_paths_resolve_too(aliases):
    import lightning as L
    import lightning.pytorch as lp
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.rank_zero import rank_zero_only  # noqa: F401

    assert L.LightningModule is lp.LightningModule is ray_lit.LightningModule
    assert L.pytorch is lp and lp.Trainer is ray_lit.Trainer
    assert ModelCheckpoint is ray_lit.callbacks.ModelCheckpoint


def test_a_module_ray_lit_lacks_fails_naming_ray_lit(aliases):
    with pytest.raises(ModuleNotFoundError, match="resolves Lightning to ray_lit"):
        import pytorch_lightning.accelerators  # noqa: F401
    with pytest.raises(ModuleNotFoundError, match="resolves Lightning to ray_lit"):
        import lightning.fabric  # noqa: F401


def test_a_real_lightning_is_never_shadowed_outside_a_run():
    """A Lightning imported before ``install`` is set aside during the run and comes back
    after it; with nothing installed, ray_lit puts no hook on ``sys.meta_path``."""
    real = types.ModuleType("pytorch_lightning")
    previous = sys.modules.get("pytorch_lightning")
    sys.modules["pytorch_lightning"] = real
    try:
        assert not ray_lit.compat.is_installed()
        with ray_lit.compat.lightning_on_ray():
            import pytorch_lightning

            assert pytorch_lightning is not real
            assert pytorch_lightning.LightningModule is ray_lit.LightningModule
        import pytorch_lightning as again

        assert again is real
        assert not any(type(f).__name__ == "LightningAliasFinder" for f in sys.meta_path)
    finally:
        if previous is None:
            sys.modules.pop("pytorch_lightning", None)
        else:
            sys.modules["pytorch_lightning"] = previous


def test_ray_workers_of_the_run_are_told_to_install_the_aliases():
    """The driver forwards RAY_LIT_WORKER_SETUP to its workers, which run the hook before they
    unpickle the run (tests/corpus runs bolts on 2 workers through it)."""
    from ray_lit.compat.finder import install_finder

    with ray_lit.compat.lightning_on_ray():
        hook = os.environ["RAY_LIT_WORKER_SETUP"]
        module_name, _, function = hook.partition(":")
        assert getattr(__import__(module_name, fromlist=["x"]), function) is install_finder
    assert "RAY_LIT_WORKER_SETUP" not in os.environ


def test_run_options_override_every_trainer_and_end_with_the_run(tmp_path):
    with ray_lit.compat.lightning_on_ray(max_epochs=2, storage_path=str(tmp_path)):
        import pytorch_lightning as pl

        trainer = pl.Trainer(max_epochs=50, logger=False)
        assert trainer.config.max_epochs == 2
        assert trainer.config.storage_path == str(tmp_path)
    assert run_overrides() == {}
    assert ray_lit.Trainer(max_epochs=50, logger=False).config.max_epochs == 50


def test_run_workers_replace_the_scripts_gpus():
    """``--workers 2 --gpus-per-worker 0``: the script's ``gpus=2`` does not turn GPUs on."""
    with ray_lit.compat.lightning_on_ray(num_workers=2, use_gpu=False):
        config = TrainerConfig.from_options({"gpus": 2, "distributed_backend": "ddp"})
    assert (config.num_workers, config.use_gpu) == (2, False)


SCRIPT = """
import argparse, json, os, sys
import pytorch_lightning as pl
from pytorch_lightning.core.lightning import LightningModule
import torch
from torch.utils.data import DataLoader, TensorDataset

class Model(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": torch.nn.functional.mse_loss(self.layer(x), y)}
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

parser = argparse.ArgumentParser()
parser.add_argument("--num_workers", type=int, default=3)   # the script's DataLoader workers
parser = pl.Trainer.add_argparse_args(parser)
args = parser.parse_args()
trainer = pl.Trainer.from_argparse_args(args, logger=False, enable_progress_bar=False)
data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
trainer.fit(Model(), data)
print("RESULT " + json.dumps({
    "argv": sys.argv, "main": __name__, "num_workers": trainer.config.num_workers,
    "storage_path": trainer.config.storage_path, "max_epochs": trainer.config.max_epochs,
    "steps": trainer.global_step, "dataloader_workers": args.num_workers,
    "module": type(pl).__name__, "is_ray_lit": pl.LightningModule.__module__}))
"""


def test_python_m_ray_lit_runs_an_unchanged_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-m", "ray_lit", "--workers", "0", "--storage-path",
         str(tmp_path / "runs"), str(script), "--max_epochs", "2", "--num_workers", "5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["argv"] == [str(script), "--max_epochs", "2", "--num_workers", "5"]
    assert result["main"] == "__main__"
    assert result["num_workers"] == 0  # the run's --workers, not the script's --num_workers
    assert result["dataloader_workers"] == 5
    assert result["storage_path"] == str(tmp_path / "runs")
    assert result["max_epochs"] == 2 and result["steps"] == 4
    assert result["is_ray_lit"] == "ray_lit.core.module"


def test_python_m_ray_lit_options_become_trainer_options():
    from ray_lit.__main__ import _parser, trainer_options

    args = _parser().parse_args(["--workers", "2", "--gpus-per-worker", "0", "--storage-path",
                                 "s3://b/runs", "--trainer-options", '{"max_failures": 1}',
                                 "train.py", "--workers", "7"])
    assert trainer_options(args) == {"num_workers": 2, "use_gpu": False,
                                     "storage_path": "s3://b/runs", "max_failures": 1}
    assert args.script_args == ["--workers", "7"]  # after the script: the script's own


# --- 2. utilities ---------------------------------------------------------------------------------
def test_rank_zero_only_reads_the_rank_when_called(monkeypatch):
    from ray_lit.compat.utilities import rank_zero_only

    calls = []

    @rank_zero_only
    def record() -> str:
        calls.append(1)
        return "ran"

    monkeypatch.setenv("RANK", "1")
    assert record() is None and calls == []
    monkeypatch.setenv("RANK", "0")
    assert record() == "ran" and calls == [1]


def test_wandb_logger_is_ray_lits_own(aliases):
    from pytorch_lightning.loggers import WandbLogger

    import ray_lit.loggers

    # a real logger now (tests/unit/test_loggers_extra.py)
    assert WandbLogger is ray_lit.loggers.WandbLogger


# --- 3. the 0.9 command line ----------------------------------------------------------------------
def test_add_argparse_args_keeps_the_scripts_num_workers_and_starts_no_ray():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_workers", type=int, default=4)
    parser = ray_lit.Trainer.add_argparse_args(parser)
    args = parser.parse_args(["--num_workers", "8", "--max_epochs", "3", "--fast_dev_run",
                              "--limit_val_batches", "0.5", "--deterministic", "false"])
    assert args.num_workers == 8 and args.fast_dev_run is True and args.deterministic is False
    assert args.limit_val_batches == 0.5
    trainer = ray_lit.Trainer.from_argparse_args(args, logger=False)
    assert trainer.config.num_workers == 0  # a DataLoader setting, never Ray workers
    assert trainer.config.fast_dev_run is True


def test_ray_workers_is_the_command_line_worker_count():
    parser = ray_lit.Trainer.add_argparse_args(argparse.ArgumentParser())
    args = parser.parse_args(["--ray_workers", "2", "--limit_train_batches", "3"])
    config = TrainerConfig.from_options(
        __import__("ray_lit.config", fromlist=["x"]).options_from_argparse(args, {}))
    assert config.num_workers == 2 and config.limit_train_batches == 3


def test_from_argparse_args_kwargs_win_and_defaults_are_not_passed():
    args = ray_lit.Trainer.add_argparse_args(argparse.ArgumentParser()).parse_args([])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "has no effect" warning for untouched options
        trainer = ray_lit.Trainer.from_argparse_args(args, max_epochs=4, logger=False)
    assert trainer.config.max_epochs == 4


def test_datamodule_argparse_round_trip():
    class Data(ray_lit.LightningDataModule):
        def __init__(self, data_dir: str = "./d", batch_size: int = 32, num_workers: int = 2,
                     shuffle: bool = True, **kwargs: Any) -> None:
            super().__init__()
            self.data_dir, self.batch_size = data_dir, batch_size
            self.num_workers, self.shuffle = num_workers, shuffle

    parser = Data.add_argparse_args(argparse.ArgumentParser())
    args = parser.parse_args(["--batch_size", "8", "--shuffle", "false", "--num_workers", "0"])
    dm = Data.from_argparse_args(args, data_dir="/x")
    assert (dm.data_dir, dm.batch_size, dm.num_workers, dm.shuffle) == ("/x", 8, 0, False)


# --- 4. the 0.9 datamodule ------------------------------------------------------------------------
def test_datamodule_dims_size_and_transforms():
    class Data(ray_lit.LightningDataModule):
        def __init__(self) -> None:
            super().__init__(train_transforms="t", val_transforms="v")
            self.dims = (1, 28, 28)

    dm = Data()
    assert dm.size() == (1, 28, 28) and dm.size(1) == 28
    assert (dm.train_transforms, dm.val_transforms, dm.test_transforms) == ("t", "v", None)
    dm.test_transforms = "x"
    assert dm.test_transforms == "x"
    assert not dm.has_prepared_data and not dm.has_setup_fit and not dm.has_setup_test


def test_fit_uses_the_modules_own_datamodule():
    class Data(ray_lit.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return constant_loader(6)

    model = DeterministicModel()
    model.train_dataloader = None  # type: ignore[assignment]  # only the datamodule has data
    del model.train_dataloader
    model.datamodule = Data()
    trainer = ray_lit.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                              limit_val_batches=0, enable_progress_bar=False)
    trainer.fit(model)
    assert trainer.global_step == 2
    assert model.datamodule.has_setup_fit


# --- 5. 0.9 flags ---------------------------------------------------------------------------------
def test_09_flags_on_module_and_trainer():
    seen = {}

    class Flags(DeterministicModel):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            seen.update(use_ddp=self.use_ddp, use_ddp2=self.use_ddp2, use_dp=self.use_dp,
                        use_amp=self.use_amp, testing=self.testing, on_gpu=self.on_gpu)
            return super().training_step(batch, batch_idx)

        def test_step(self, batch: Any, batch_idx: int) -> Any:
            seen["testing_in_test"] = self.testing

    trainer = ray_lit.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                              limit_train_batches=1, limit_val_batches=0,
                              enable_progress_bar=False)
    model = Flags()
    trainer.fit(model)
    trainer.test(model, constant_loader(3), verbose=False)
    assert seen == {"use_ddp": False, "use_ddp2": False, "use_dp": False, "use_amp": False,
                    "testing": False, "on_gpu": False, "testing_in_test": True}
    assert not trainer.use_ddp and not trainer.on_gpu and not trainer.use_amp
    assert ray_lit.Trainer(num_workers=2, logger=False).use_ddp
    assert ray_lit.Trainer(precision="bf16", logger=False).use_amp


# --- 9. several processes become Ray workers ------------------------------------------------------
@pytest.mark.parametrize(("options", "workers", "gpu"), [
    ({"distributed_backend": "ddp_cpu", "num_processes": 2}, 2, False),
    ({"gpus": 2, "distributed_backend": "ddp"}, 2, True),
    ({"devices": 2, "strategy": "ddp"}, 2, False),
    ({"accelerator": "cpu", "devices": 2}, 2, False),
    ({"accelerator": "gpu", "devices": [0, 1, 2]}, 3, True),
    ({"accelerator": "ddp_cpu", "num_processes": 3}, 3, False),  # 1.x spelling
    ({"gpus": 2, "num_nodes": 2, "distributed_backend": "ddp"}, 4, True),
    ({"devices": 1}, 0, False),
])
def test_several_processes_map_onto_ray_workers(options, workers, gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mapped, so nothing "has no effect"
        config = TrainerConfig.from_options(options)
    assert (config.num_workers, config.use_gpu) == (workers, gpu)


def test_ddp_find_unused_parameters_true_strategy_turns_it_on():
    config = TrainerConfig.from_options({"strategy": "ddp_find_unused_parameters_true",
                                         "devices": 2})
    assert config.find_unused_parameters and config.num_workers == 2


@pytest.mark.parametrize(("options", "match"), [
    ({"devices": -1}, "say how many"),
    ({"distributed_backend": "horovod"}, "Horovod"),
    ({"devices": 2, "num_workers": 3}, "disagrees"),
])
def test_unmappable_process_requests_are_refused(options, match):
    with pytest.raises(MisconfigurationException, match=match):
        TrainerConfig.from_options(options)


def test_dp_maps_to_workers_with_a_warning():
    with pytest.warns(UserWarning, match="DDP worker per GPU"):
        config = TrainerConfig.from_options({"gpus": 2, "distributed_backend": "dp"})
    assert config.num_workers == 2


# --- 6. optimizers whose step takes no closure ----------------------------------------------------
class NoClosureWrapper:
    """An optimizer wrapper in the style of bolts' ``LARSWrapper``: ``step(self)`` only, no
    ``register_step_pre_hook``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optim = optimizer
        self.steps = 0

    @property
    def __class__(self) -> type:  # type: ignore[override]
        # as LARSWrapper does: isinstance(wrapper, Optimizer) holds
        return self.optim.__class__

    @property
    def param_groups(self) -> list[dict]:
        return self.optim.param_groups

    @property
    def state(self) -> Any:
        return self.optim.state

    def state_dict(self) -> dict:
        return self.optim.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.steps += 1
        self.optim.step()


def test_optimizer_wrapper_without_closure_argument_trains():
    class Wrapped(DeterministicModel):
        def configure_optimizers(self) -> Any:
            self.wrapper = NoClosureWrapper(torch.optim.SGD(self.parameters(), lr=0.1))
            return self.wrapper

    model = Wrapped()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = ray_lit.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                              limit_val_batches=0, enable_progress_bar=False)
    trainer.fit(model, constant_loader(6))
    assert model.wrapper.steps == 2 and trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_snapshot_of_a_wrapper_without_step_hooks_copies_at_once():
    from ray_lit.checkpoint.host_copy import HostSnapshot

    layer = torch.nn.Linear(2, 2)
    wrapper = NoClosureWrapper(torch.optim.SGD(layer.parameters(), lr=0.1))
    snapshot = HostSnapshot()
    copied = snapshot.capture({"w": layer.weight}, [wrapper])
    snapshot.fence()
    assert torch.equal(copied["w"], layer.weight.detach())


def test_step_optimizer_passes_the_closure_when_step_takes_one():
    from ray_lit.core.module import step_optimizer

    layer = torch.nn.Linear(1, 1)
    lbfgs = torch.optim.LBFGS(layer.parameters(), max_iter=2)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        lbfgs.zero_grad()
        loss = layer(torch.ones(1, 1)).pow(2).sum()
        loss.backward()
        return loss

    step_optimizer(lbfgs, closure)
    assert calls  # LBFGS evaluated it



# --- 8. class and function hyperparameters --------------------------------------------------------
class WithOptimizerClass(DeterministicModel):
    """bolts' pattern: ``LinearRegression(optimizer=SGD)`` keeps a class in its hparams."""

    def __init__(self, optimizer: type = torch.optim.Adam, act: Any = torch.tanh,
                 lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_cls = optimizer

    def configure_optimizers(self) -> Any:
        return self.optimizer_cls(self.parameters(), lr=self.hparams.lr)


def _fit_and_save(model: Any, path: Any) -> str:
    trainer = ray_lit.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                              limit_val_batches=0, enable_progress_bar=False)
    trainer.fit(model, constant_loader(6))
    trainer.save_checkpoint(str(path))
    return str(path)


def test_class_and_function_hparams_survive_the_checkpoint(tmp_path):
    model = WithOptimizerClass(optimizer=torch.optim.SGD, act=torch.sigmoid)
    path = _fit_and_save(model, tmp_path / "m.ckpt")
    assert "optimizer" not in model.hparams  # 0.9: fit removes callables from hparams
    loaded = WithOptimizerClass.load_from_checkpoint(path)
    assert loaded.optimizer_cls is torch.optim.SGD  # not the constructor's default Adam
    assert loaded.hparams.act is torch.sigmoid
    stored = torch.load(path, weights_only=True)["hyper_parameters"]
    assert stored["optimizer"] == {"__import__": "torch.optim.sgd.SGD"}


def test_an_unsaveable_function_hparam_is_refused_not_replaced(tmp_path):
    model = WithOptimizerClass(act=lambda x: x * 2)
    path = _fit_and_save(model, tmp_path / "m.ckpt")
    with pytest.raises(MisconfigurationException, match=r"'act'.*load_from_checkpoint\(path, act="):
        WithOptimizerClass.load_from_checkpoint(path)
    loaded = WithOptimizerClass.load_from_checkpoint(path, act=torch.relu)
    assert loaded.hparams.act is torch.relu


def test_import_path_hparams_import_named_attributes_only():
    from ray_lit.core.hparams import resolve_import_path

    assert resolve_import_path("torch.optim.sgd.SGD") is torch.optim.SGD
    with pytest.raises(ImportError, match="not a class or function"):
        resolve_import_path("os.sep")


# --- 7. DDP's unused-parameter error names ray_lit's option ---------------------------------------
def test_ddp_unused_parameter_error_names_the_trainer_option(tmp_path):
    import torch.distributed as dist

    from ray_lit.strategies.ddp import DDPStrategy, _StepModule

    class HalfUsed(DeterministicModel):
        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Linear(2, 2)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        module = HalfUsed()
        strategy = DDPStrategy()
        strategy.module = module
        strategy._ddp = torch.nn.parallel.DistributedDataParallel(_StepModule(module))
        batch = next(iter(constant_loader(3)))
        strategy.call_step("training_step", batch, 0).backward()
        with pytest.raises(RuntimeError, match=r"Trainer\(find_unused_parameters=True\)"):
            strategy.call_step("training_step", batch, 1)
    finally:
        dist.destroy_process_group()


# --- 8. OmegaConf hyperparameters -----------------------------------------------------------------
class FromConfig(DeterministicModel):
    def __init__(self, conf: Any) -> None:
        super().__init__()
        self.save_hyperparameters(conf)


class ConfigInsideDict(DeterministicModel):
    def __init__(self, lr: float = 0.1, model: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_dict_config_hparams_stay_dict_config_and_reload(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    conf = omegaconf.OmegaConf.create({"lr": 0.1, "model": {"width": 3}, "w2": "${model.width}"})
    model = FromConfig(conf)
    assert isinstance(model.hparams, omegaconf.DictConfig) and model.hparams.model.width == 3
    trainer = ray_lit.Trainer(max_epochs=1, default_root_dir=str(tmp_path),
                              enable_checkpointing=False, limit_val_batches=0,
                              enable_progress_bar=False)
    trainer.fit(model, constant_loader(6))
    trainer.save_checkpoint(str(tmp_path / "m.ckpt"))
    loaded = FromConfig.load_from_checkpoint(str(tmp_path / "m.ckpt"))
    assert isinstance(loaded.hparams, omegaconf.DictConfig)
    assert loaded.hparams.model.width == 3 and loaded.hparams.w2 == 3


def test_dict_config_inside_hparams_does_not_block_loading(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    model = ConfigInsideDict(model=omegaconf.OmegaConf.create({"width": 4}))
    path = _fit_and_save(model, tmp_path / "m.ckpt")
    loaded = ConfigInsideDict.load_from_checkpoint(path)
    assert loaded.hparams.model == {"width": 4}


def test_compat_is_reachable_from_the_package():
    """``import ray_lit; ray_lit.compat.install(...)`` (a notebook's spelling) works."""
    code = "import ray_lit; print(ray_lit.compat.install.__module__)"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ray_lit.compat", out.stderr[-2000:]
