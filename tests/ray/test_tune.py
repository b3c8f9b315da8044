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


def test_pbt_exploit_puts_the_new_learning_rate_in_the_optimizer(ray_cluster, tmp_path):
    train, val = _loaders()
    pbt = tune.schedulers.PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=1,
        hyperparam_mutations={"lr": [1e-4, 1e-3, 1e-2, 1e-1]}, synch=True)
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
    # and at least one trial was exploited (its lr changed along the way)
    assert any(frame["lr_seen"].nunique() > 1 for frame in histories)


def test_a_metric_the_module_never_logs_fails_with_the_list(ray_cluster, tmp_path):
    train, val = _loaders()
    results = sweep(lambda c: Net(c["lr"]), {"lr": 1e-2}, metric="val_acc", mode="max",
                    train_dataloaders=train, val_dataloaders=val, num_workers=0,
                    max_epochs=1, storage_path=str(tmp_path), **OPTIONS)
    assert len(results.errors) == 1
    text = str(results.errors[0])
    assert "val_acc" in text and "val_loss" in text
