"""A default ``ray_lit.tune.sweep`` runs warm trials (issue 17): its second trial runs on the
worker actors of its first, and learns bit for bit what it learns on fresh workers."""

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
from ray_lit.tune import sweep

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Tune pickles with Ray's copy


class Net(pl.LightningModule):
    """Dropout, Adam and a shuffled loader (anything left of an earlier trial on a worker
    would change the weights); each rank notes its actor id."""

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


def _build(directory: str):
    def build(config: dict) -> Net:
        gc.collect()
        pl.seed_everything(9)  # in the trial's process: every rank is seeded from it
        return Net(config["lr"], directory)

    return build


def _sweep(lrs: list[float], directory: str, storage: str, name: str, **kwargs):
    return sweep(_build(directory), {"lr": tune.grid_search(lrs)}, metric="train_loss",
                 max_concurrent_trials=1, storage_path=storage, name=name,
                 train_dataloaders=_loader(), num_workers=2, max_epochs=2, logger=False,
                 enable_model_summary=False, enable_checkpointing=False,
                 placement_timeout_s=300, **kwargs)


def _weights(result) -> dict[str, torch.Tensor]:
    directory = result.checkpoint.to_directory()
    return torch.load(os.path.join(directory, "ray_lit.ckpt"), weights_only=False)["state_dict"]


def _actors(directory: str, lr: float) -> list[str]:
    return [open(os.path.join(directory, f"{lr}-rank{r}")).read() for r in range(2)]


def test_a_default_sweep_runs_its_next_trial_on_the_last_trials_workers(ray_cluster, tmp_path):
    warm_dir, fresh_dir = tmp_path / "warm", tmp_path / "fresh"
    warm_dir.mkdir()
    fresh_dir.mkdir()
    results = _sweep([0.01, 0.05], str(warm_dir), str(tmp_path / "tune"), "default")
    assert not results.errors
    assert _actors(str(warm_dir), 0.05) == _actors(str(warm_dir), 0.01)  # the same workers
    # the user's explicit reuse_actors=False: the second trial alone, on fresh workers
    alone = _sweep([0.05], str(fresh_dir), str(tmp_path / "tune"), "cold", reuse_actors=False)
    assert not alone.errors
    assert set(_actors(str(fresh_dir), 0.05)).isdisjoint(_actors(str(warm_dir), 0.05))
    warm = next(r for r in results if r.config["lr"] == 0.05)
    expected, got = _weights(alone[0]), _weights(warm)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
