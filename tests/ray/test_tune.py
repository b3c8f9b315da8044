"""Sweeps with Ray Tune over ray_lit runs (issue 7)."""

from __future__ import annotations

import sys

import cloudpickle
import pytest
import torch
from ray import cloudpickle as ray_cloudpickle
from ray import tune
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.tune import sweep, trainable, trial_resources

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Tune pickles with Ray's copy


class Net(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))
        self.log("lr_seen", self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    data = TensorDataset(x, x @ torch.tensor([[1.0], [2.0], [-1.0], [0.5]]))
    return DataLoader(data, batch_size=32), DataLoader(data, batch_size=64)


OPTIONS = dict(logger=False, enable_model_summary=False, enable_checkpointing=False)


def test_trial_asks_for_its_driver_and_every_worker():
    factory = trial_resources(2, {"CPU": 1})
    assert factory.bundles == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert trial_resources(0).bundles == [{"CPU": 1.0}]


def test_grid_over_learning_rates_picks_the_best_with_multi_worker_trials(ray_cluster,
                                                                          tmp_path):
    train, val = _loaders()
    results = sweep(lambda c: Net(c["lr"]), {"lr": tune.grid_search([1e-4, 1e-1])},
                    metric="val_loss", mode="min", train_dataloaders=train,
                    val_dataloaders=val, num_workers=1, max_epochs=2,
                    storage_path=str(tmp_path), **OPTIONS)
    assert not results.errors
    best = results.get_best_result()
    assert best.config["lr"] == 1e-1
    assert best.metrics["training_iteration"] == 2  # one report per validation epoch
    assert best.checkpoint is not None
    ckpt = best.checkpoint.to_directory(str(tmp_path / "best"))
    state = torch.load(f"{ckpt}/ray_lit.ckpt", weights_only=False)
    assert state["global_step"] == 16  # 8 batches x 2 epochs


def test_asha_stops_trials_early(ray_cluster, tmp_path):
    train, val = _loaders()
    results = sweep(lambda c: Net(c["lr"]),
                    {"lr": tune.grid_search([1e-1, 1e-2, 1e-4, 1e-5])}, metric="val_loss",
                    mode="min", scheduler=tune.schedulers.ASHAScheduler(
                        max_t=4, grace_period=1, reduction_factor=2),
                    max_concurrent_trials=1, train_dataloaders=train, val_dataloaders=val,
                    num_workers=0, max_epochs=4, storage_path=str(tmp_path), **OPTIONS)
    iterations = sorted(r.metrics["training_iteration"] for r in results)
    assert iterations[0] < 4 and iterations[-1] == 4


def _halve_lr(config: dict) -> dict:
    return {**config, "lr": config["lr"] / 2}


def test_pbt_exploit_puts_the_new_learning_rate_in_the_optimizer(ray_cluster, tmp_path):
    train, val = _loaders()
    # the explore step halves the cloned lr: every exploited trial then trains with an lr that
    # is in neither grid point, whatever Tune's random choices (a list mutation may pick the
    # same value again, and a restored trial's dataframe keeps only the rows since the restore)
    pbt = tune.schedulers.PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=1,
        custom_explore_fn=_halve_lr, synch=True)
    tuner = tune.Tuner(
        trainable(lambda c: Net(c["lr"]), train, val, num_workers=0, max_epochs=4, **OPTIONS),
        param_space={"lr": tune.grid_search([1e-4, 1e-1])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=pbt),
        run_config=tune.RunConfig(storage_path=str(tmp_path)),
    )
    results = tuner.fit()
    assert not results.errors
    histories = [r.metrics_dataframe for r in results]
    # every report: the optimizer used the lr of the trial's config at that time (Tune records
    # the config of each report as ``config/lr``)
    for frame in histories:
        assert (frame["lr_seen"] - frame["config/lr"]).abs().max() < 1e-6
    # and at least one trial was exploited: it trained with a halved lr, not a grid point
    seen = {round(v, 10) for frame in histories for v in frame["lr_seen"]}
    assert seen - {1e-4, 1e-1}


def test_a_metric_the_module_never_logs_fails_with_the_list(ray_cluster, tmp_path):
    train, val = _loaders()
    results = sweep(lambda c: Net(c["lr"]), {"lr": 1e-2}, metric="val_acc", mode="max",
                    train_dataloaders=train, val_dataloaders=val, num_workers=0,
                    max_epochs=1, storage_path=str(tmp_path), **OPTIONS)
    assert len(results.errors) == 1
    text = str(results.errors[0])
    assert "val_acc" in text and "val_loss" in text


class DiesOnce(Net):
    """Its worker process dies once (os._exit) mid-trial."""

    def __init__(self, lr: float, marker: str) -> None:
        super().__init__(lr)
        self.marker = marker

    def training_step(self, batch, batch_idx):
        import os

        if self.global_step == 5 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().training_step(batch, batch_idx)


def test_a_worker_crash_inside_a_trial_is_recovered_inside_the_trial(ray_cluster, tmp_path):
    train, val = _loaders()
    marker = str(tmp_path / "died")
    results = sweep(lambda c: DiesOnce(c["lr"], marker), {"lr": 1e-1}, metric="val_loss",
                    mode="min", train_dataloaders=train, val_dataloaders=val, num_workers=1,
                    max_epochs=2, checkpoint_every_n_steps=2, storage_path=str(tmp_path),
                    **OPTIONS)
    import os

    assert os.path.exists(marker)
    assert not results.errors
    result = results.get_best_result()
    assert result.metrics["training_iteration"] == 2 and result.metrics["global_step"] == 16


SWEEP_SCRIPT = '''
import json, os, sys, time
import ray, torch
from ray import tune
from torch.utils.data import DataLoader, TensorDataset
import ray_lit as pl
from ray_lit.tune import trainable

class Net(pl.LightningModule):
    def __init__(self, lr):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.lr = lr
    def training_step(self, batch, batch_idx):
        time.sleep(0.05)
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

mode, storage, out = sys.argv[1], sys.argv[2], sys.argv[3]
ray.init(address="local", num_cpus=2, include_dashboard=False)
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 4, generator=g)
data = TensorDataset(x, x @ torch.tensor([[1.0], [2.0], [-1.0], [0.5]]))
fn = trainable(lambda c: Net(c["lr"]), DataLoader(data, batch_size=32),
               DataLoader(data, batch_size=64), num_workers=0, max_epochs=4, logger=False,
               enable_model_summary=False, enable_checkpointing=False)
if mode == "start":
    tuner = tune.Tuner(fn, param_space={"lr": tune.grid_search([0.1, 0.01])},
                       tune_config=tune.TuneConfig(metric="val_loss", mode="min",
                                                   max_concurrent_trials=1),
                       run_config=tune.RunConfig(storage_path=storage, name="sweep"))
else:
    tuner = tune.Tuner.restore(os.path.join(storage, "sweep"), trainable=fn,
                               resume_unfinished=True)
results = tuner.fit()
with open(out, "w") as f:
    json.dump({"errors": len(results.errors),
               "iterations": sorted(r.metrics["training_iteration"] for r in results),
               "steps": sorted(r.metrics["global_step"] for r in results)}, f)
'''


def test_sweep_restored_after_its_driver_is_killed_completes(tmp_path):
    import glob
    import json
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    storage = str(tmp_path / "tune")
    first = subprocess.Popen([sys.executable, str(script), "start", storage,
                              str(tmp_path / "first.json")], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if glob.glob(f"{storage}/sweep/*/checkpoint_000001"):
                break
            assert first.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert not (tmp_path / "first.json").exists()
    second = subprocess.run([sys.executable, str(script), "restore", storage,
                             str(tmp_path / "second.json")], env=env, timeout=300,
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((tmp_path / "second.json").read_text())
    assert summary == {"errors": 0, "iterations": [4, 4], "steps": [32, 32]}


def test_a_trial_larger_than_the_cluster_fails_fast(ray_cluster, tmp_path):
    import time

    train, val = _loaders()
    start = time.monotonic()
    with pytest.raises(pl.MisconfigurationException, match="One trial needs"):
        sweep(lambda c: Net(c["lr"]), {"lr": 1e-2}, metric="val_loss", mode="min",
              train_dataloaders=train, val_dataloaders=val, num_workers=8, max_epochs=1,
              storage_path=str(tmp_path), **OPTIONS)
    assert time.monotonic() - start < 10
