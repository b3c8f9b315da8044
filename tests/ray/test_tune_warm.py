"""Warm workers across Ray Tune trials (issue 17): with ``reuse_actors=True`` the next trial of
the same shape runs on the workers the previous trial left in its trial actor, and learns
exactly what it would have learnt on fresh workers."""

from __future__ import annotations

import gc
import os
import sys

import cloudpickle
import pytest
import torch
from ray import cloudpickle as ray_cloudpickle
from ray import tune
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.tune import trainable

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Tune pickles with Ray's copy


class Net(pl.LightningModule):
    """Dropout, Adam and a shuffled loader: anything of an earlier run left on a worker (RNG,
    optimizer state, sampler) would change the weights. Each rank notes its actor id."""

    def __init__(self, lr: float, directory: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5),
                                       torch.nn.Linear(8, 1))
        self.lr, self.directory = lr, directory

    def on_train_start(self) -> None:
        import ray

        with open(os.path.join(self.directory, f"{self.lr}-rank{self.global_rank}"), "w") as f:
            f.write(ray.get_runtime_context().get_actor_id())

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)


def _seeded(module: Net) -> Net:
    # the earlier trial's Trainer is garbage by now: collected, its workers must already be
    # in the pool (a Trainer in a Tune trial is not parked by its finalizer)
    gc.collect()
    pl.seed_everything(9)  # in the trial's process: every rank is seeded from it
    return module


def _sweep(lrs: list[float], directory: str, storage: str, reuse: bool) -> tune.ResultGrid:
    tuner = tune.Tuner(
        trainable(lambda c: _seeded(Net(c["lr"], directory)), _loader(), num_workers=2,
                  max_epochs=2, logger=False, enable_model_summary=False,
                  enable_checkpointing=False, placement_timeout_s=300),  # cold, on busy CPUs
        param_space={"lr": tune.grid_search(lrs)},
        tune_config=tune.TuneConfig(reuse_actors=reuse, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=storage, name=f"reuse{int(reuse)}"))
    return tuner.fit()


def _weights(result) -> dict[str, torch.Tensor]:
    directory = result.checkpoint.to_directory()
    return torch.load(os.path.join(directory, "ray_lit.ckpt"), weights_only=False)["state_dict"]


def _actors(directory: str, lr: float) -> list[str]:
    return [open(os.path.join(directory, f"{lr}-rank{r}")).read() for r in range(2)]


def test_the_next_trial_runs_on_the_workers_of_the_last(ray_cluster, tmp_path):
    warm_dir, fresh_dir = tmp_path / "warm", tmp_path / "fresh"
    warm_dir.mkdir()
    fresh_dir.mkdir()
    results = _sweep([0.01, 0.05], str(warm_dir), str(tmp_path / "tune"), reuse=True)
    assert not results.errors
    assert _actors(str(warm_dir), 0.05) == _actors(str(warm_dir), 0.01)  # the same workers
    # the second trial alone, on fresh workers: the same weights, bit for bit
    alone = _sweep([0.05], str(fresh_dir), str(tmp_path / "tune"), reuse=False)
    assert not alone.errors
    assert set(_actors(str(fresh_dir), 0.05)).isdisjoint(_actors(str(warm_dir), 0.05))
    warm = next(r for r in results if r.config["lr"] == 0.05)
    expected, got = _weights(alone[0]), _weights(warm)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
