"""Real Lightning 0.9-era code, unchanged, on ray_lit (issue 14).

bolts 0.2.2 (written against pytorch-lightning 0.9.0) imports ``pytorch_lightning``; with
``ray_lit.compat`` those imports resolve to ray_lit. The models are bolts' own; only the data is
generated here (no downloads).

The wheels come from PyPI at test time (``corpus_wheels.py``). The other bolts models, with the
real torchvision, are in ``test_bolts_models_09.py``.

bolts 0.2.2's package ``__init__`` files import every model, and with them torchvision datasets
and ``torch._six`` (gone since torch 2.0); torchvision has no build for this CPU-only torch. So
the harness unpacks ``pl_bolts`` and empties those three aggregate ``__init__`` files: the
model and datamodule modules the tests import run exactly as shipped.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile
from typing import Any

import numpy as np
import pytest
import torch
from corpus_wheels import corpus_wheel
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit.compat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (the fixtures live here, not in a conftest.py, so the corpus modules share them explicitly)
# aggregate __init__s that import torchvision-only models; emptied, see the module docstring
_EMPTIED = ("pl_bolts/__init__.py", "pl_bolts/models/__init__.py",
            "pl_bolts/datamodules/__init__.py")


@pytest.fixture(scope="session")
def bolts_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A folder holding bolts 0.2.2's ``pl_bolts`` package (put it on ``sys.path``)."""
    root = tmp_path_factory.mktemp("bolts022")
    with zipfile.ZipFile(corpus_wheel("bolts")) as wheel:
        wheel.extractall(root, [n for n in wheel.namelist() if n.startswith("pl_bolts/")])
    for name in _EMPTIED:
        (root / name).write_text("")
    return root


@pytest.fixture(scope="session")
def pl_examples_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A folder holding Lightning 0.9.0's ``pl_examples`` (from the 0.9.0 wheel)."""
    root = tmp_path_factory.mktemp("lightning090")
    with zipfile.ZipFile(corpus_wheel("lightning09")) as wheel:
        wheel.extractall(root, [n for n in wheel.namelist() if n.startswith("pl_examples/")])
    return root


@pytest.fixture
def bolts(bolts_root):
    """bolts' regression models and sklearn datamodule, imported with Lightning -> ray_lit."""
    sys.path.insert(0, str(bolts_root))
    ray_lit.compat.install()
    try:
        yield (importlib.import_module("pl_bolts.models.regression"),
               importlib.import_module("pl_bolts.datamodules.sklearn_datamodule"))
    finally:
        ray_lit.compat.uninstall()
        sys.path.remove(str(bolts_root))
        for name in [n for n in sys.modules if n == "pl_bolts" or n.startswith("pl_bolts.")]:
            del sys.modules[name]


class ValLosses(ray_lit.Callback):
    """Records ``val_loss`` after every validation run (sanity check excluded)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if not trainer.running_sanity_check:
            self.values.append(float(trainer.callback_metrics["val_loss"]))


def _regression_data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = x @ np.array([1.0, -2.0, 3.0, 0.5]) + 0.1 * rng.normal(size=n)
    return x, y[:, None]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                   b.state_dict().values()))


def test_bolts_linear_regression_with_sklearn_datamodule(bolts, tmp_path):
    regression, sklearn_dm = bolts
    import pytorch_lightning as pl

    pl.seed_everything(1234)
    x, y = _regression_data()
    loaders = sklearn_dm.SklearnDataModule(x, y, num_workers=0)
    model = regression.LinearRegression(input_dim=4, learning_rate=0.05,
                                        optimizer=torch.optim.SGD)
    losses = ValLosses()
    trainer = pl.Trainer(max_epochs=4, default_root_dir=str(tmp_path), callbacks=[losses],
                         enable_progress_bar=False)
    assert trainer.fit(model, loaders.train_dataloader(32), loaders.val_dataloader(32)) == 1
    assert len(losses.values) == 4 and losses.values[-1] < losses.values[0] / 2
    # the 0.9 dict-return keys: 'log' and 'progress_bar' entries, the epoch-end 'val_loss'
    assert {"train_mse_loss", "val_loss", "val_mse_loss"} <= set(trainer.callback_metrics)
    assert "val_mse_loss" in trainer.logged_metrics  # train rows: every 50 batches (0.9)
    results = trainer.test(test_dataloaders=loaders.test_dataloader(16), verbose=False)
    assert set(results[0]) >= {"test_loss", "test_mse_loss"}
    best = trainer.checkpoint_callback.best_model_path
    assert best and os.path.exists(best)
    reloaded = regression.LinearRegression.load_from_checkpoint(best)
    trainer.test(model, loaders.test_dataloader(16), ckpt_path=best, verbose=False)
    assert _same_weights(reloaded, model) or reloaded.hparams.input_dim == 4
    assert reloaded.optimizer is torch.optim.SGD  # the class hparam came back by import path


def test_bolts_logistic_regression_learns_and_reloads(bolts, tmp_path):
    regression, _ = bolts
    import pytorch_lightning as pl

    pl.seed_everything(7)
    x = torch.randn(480, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=32)
    model = regression.LogisticRegression(input_dim=4, num_classes=3, learning_rate=0.05)
    trainer = pl.Trainer(max_epochs=5, default_root_dir=str(tmp_path), enable_progress_bar=False)
    trainer.fit(model, train, val)
    assert trainer.callback_metrics["val_acc"] > 0.7  # from bolts' accuracy via pl.metrics
    trainer.save_checkpoint(str(tmp_path / "final.ckpt"))
    reloaded = regression.LogisticRegression.load_from_checkpoint(str(tmp_path / "final.ckpt"))
    assert _same_weights(reloaded, model)
    assert reloaded.hparams.num_classes == 3 and reloaded.optimizer is torch.optim.Adam
    results = trainer.test(model, val, ckpt_path=None, verbose=False)
    assert results[0]["test_acc"] > 0.7 and "test_loss" in results[0]


CLI = """
# bolts 0.2.2's LinearRegression cli_main, with generated data instead of load_boston (gone
# from scikit-learn) and the script's own --num_workers for its DataLoaders
import json
from argparse import ArgumentParser
import numpy as np
import pytorch_lightning as pl
from pl_bolts.datamodules.sklearn_datamodule import SklearnDataModule
from pl_bolts.models.regression import LinearRegression

pl.seed_everything(1234)
rng = np.random.default_rng(0)
X = rng.normal(size=(300, 13))
y = X @ rng.normal(size=13) + 0.1 * rng.normal(size=300)
parser = ArgumentParser()
parser.add_argument("--num_workers", type=int, default=2)
parser = LinearRegression.add_model_specific_args(parser)
parser = pl.Trainer.add_argparse_args(parser)
args = parser.parse_args()
loaders = SklearnDataModule(X, y[:, None], num_workers=args.num_workers)
model = LinearRegression(input_dim=13, l1_strength=1, l2_strength=1)
trainer = pl.Trainer.from_argparse_args(args)
trainer.fit(model, loaders.train_dataloader(args.batch_size),
            loaders.val_dataloader(args.batch_size))
print("RESULT " + json.dumps({"epoch": trainer.current_epoch, "steps": trainer.global_step,
                              "workers": trainer.config.num_workers,
                              "val_loss": float(trainer.callback_metrics["val_loss"])}))
"""


def _run_cli(bolts_root: Any, tmp_path: Any, ray_lit_args: list[str],
             script_args: list[str], timeout: int) -> dict[str, Any]:
    script = tmp_path / "bolts_linear_cli.py"
    script.write_text(textwrap.dedent(CLI))
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONPATH=os.pathsep.join(
        [REPO, str(bolts_root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "ray_lit", *ray_lit_args, str(script),
                          *script_args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_bolts_cli_through_python_m_ray_lit_in_process(bolts_root, tmp_path):
    result = _run_cli(bolts_root, tmp_path, ["--workers", "0"],
                      ["--max_epochs", "2", "--batch_size", "16", "--num_workers", "0",
                       "--progress_bar_refresh_rate", "0"], timeout=300)
    assert result["workers"] == 0
    assert result["steps"] == 2 * (210 // 16)  # drop_last loaders: 210 training rows


@pytest.mark.ray
def test_bolts_cli_on_two_ray_workers(bolts_root, tmp_path):
    result = _run_cli(bolts_root, tmp_path,
                      ["--workers", "2", "--gpus-per-worker", "0", "--storage-path",
                       str(tmp_path / "runs")],
                      ["--max_epochs", "2", "--batch_size", "16", "--num_workers", "0",
                       "--progress_bar_refresh_rate", "0"], timeout=600)
    assert result["workers"] == 2
    assert result["steps"] == 2 * ((210 // 16) // 2)  # each rank takes half the batches


def _torchvision_works() -> bool:
    """torchvision imports with its operators (it fails at import where no build matches the
    installed torch, as with a CPU-only torch 2.13 here)."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision.datasets"],
                           capture_output=True, timeout=120)
    return probe.returncode == 0


# torchvision cannot be installed for this torch: the scripts then import our test double of
# the few names they use (tests/corpus/torchvision_double, see its docstring)
TORCHVISION_DOUBLE = os.path.join(os.path.dirname(__file__), "torchvision_double")


def _write_idx(path: Any, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header, uint8 data), as torchvision's MNIST reads it."""
    dims = array.shape
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _tiny_mnist(root: pathlib.Path) -> None:
    """A generated MNIST in torchvision's layout (so ``download=True`` finds it, fetches
    nothing)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))


def _run_example(pl_examples_root: pathlib.Path, tmp_path: pathlib.Path, script: str,
                 ray_lit_args: list[str], script_args: list[str]) -> str:
    paths = [REPO, str(pl_examples_root)]
    if not _torchvision_works():
        paths.append(TORCHVISION_DOUBLE)
    # RAY_ADDRESS=local: the script starts its own Ray, never joins one left running here
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONPATH=os.pathsep.join(
        paths + [os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "ray_lit", *ray_lit_args,
         str(pl_examples_root / "pl_examples" / script), *script_args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.ray)])
def test_pl_examples_cpu_template_through_python_m_ray_lit(pl_examples_root, tmp_path,
                                                          workers):
    """Lightning 0.9.0's ``pl_examples/basic_examples/cpu_template.py``, unchanged, on a tiny
    generated MNIST, in process and on 2 Ray workers."""
    _tiny_mnist(tmp_path / "mnist")
    _run_example(pl_examples_root, tmp_path, "basic_examples/cpu_template.py",
                 ["--workers", str(workers)],
                 ["--data_root", str(tmp_path / "mnist"), "--hidden_dim", "16",
                  "--batch_size", "8", "--num_workers", "0", "--max_epochs", "1",
                  "--limit_train_batches", "3", "--limit_val_batches", "2",
                  "--default_root_dir", str(tmp_path / "logs")])
    assert list((tmp_path / "logs").rglob("*.ckpt"))


@pytest.mark.ray
def test_pl_examples_gan_on_two_workers(pl_examples_root, tmp_path):
    """0.9.0's ``domain_templates/generative_adversarial_net.py`` (two optimizers with
    ``optimizer_idx``, dict returns with ``progress_bar``/``log``, ``self.logger.experiment
    .add_image`` in a worker, ``on_epoch_end``), unchanged; its bare ``Trainer()`` gets the run's
    limits from ``python -m ray_lit --trainer-options``."""
    _tiny_mnist(tmp_path)  # the script reads MNIST from its working directory
    options = {"max_epochs": 1, "limit_train_batches": 3, "enable_progress_bar": False,
               "log_every_n_steps": 1}
    _run_example(pl_examples_root, tmp_path, "domain_templates/generative_adversarial_net.py",
                 ["--workers", "2", "--trainer-options", json.dumps(options)],
                 ["--batch_size", "8", "--latent_dim", "16"])
    events = list((tmp_path / "lightning_logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["images"]) | set(accumulator.Tags()["scalars"])
    assert {"generated_images", "g_loss", "d_loss"} <= tags, tags
