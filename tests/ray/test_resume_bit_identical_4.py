"""A 4-worker run that loses a worker and resumes from a checkpoint ends bit-identical to the
uninterrupted run (issue 19).

With more than two ranks, gloo sums each gradient element in an order set by its offset in DDP's
bucket; the resumed DDP used to reduce its first step with DDP's start layout where the
uninterrupted run used the rebuilt one, and the weights ended 1 ulp apart.
``DDPStrategy.setup_module`` now fixes the layout before the first step of every DDP.
"""

from __future__ import annotations

import gc
import os
import sys
import time

import cloudpickle
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl
from ray_lit.checkpoint.manager import CheckpointManager

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Layers(pl.LightningModule):
    """Layers of different sizes (so a gradient's offset in the bucket depends on the layout)
    trained with Adam; one rank can die once, after a committed checkpoint."""

    def __init__(self, kill_marker: str = "", kill_step: int = 5, run_dir: str = "") -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(13, 96), torch.nn.Tanh(), torch.nn.Linear(96, 40), torch.nn.Tanh(),
            torch.nn.Linear(40, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
        self.kill_marker = kill_marker
        self.kill_step = kill_step
        self.run_dir = run_dir

    def training_step(self, batch, batch_idx):
        if (self.kill_marker and self.global_rank == 2 and self.global_step == self.kill_step
                and not os.path.exists(self.kill_marker)):
            open(self.kill_marker, "w").close()
            _wait_for_a_commit(self.run_dir)  # else the run restarts from step 0
            os._exit(1)  # the worker process dies: no exception, no cleanup
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _wait_for_a_commit(run_dir: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not CheckpointManager(run_dir).committed():
        assert time.monotonic() < deadline, "no checkpoint was committed"
        time.sleep(0.05)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 13, generator=g)
    return DataLoader(TensorDataset(x, x.sin().sum(1, keepdim=True)), batch_size=8, shuffle=True)


def _fit(tmp_path, name: str, **extra) -> tuple[Layers, ray_lit.Trainer]:
    pl.seed_everything(11)
    model = Layers(**extra)
    trainer = ray_lit.fit(model, _data(), num_workers=4, max_epochs=1, max_failures=1,
                          resources_per_worker={"CPU": 0.5},
                          storage_path=str(tmp_path / "runs"), run_name=name,
                          checkpoint_every_n_steps=4, enable_progress_bar=False,
                          enable_model_summary=False, logger=False, enable_checkpointing=False)
    return model, trainer


def test_a_4_worker_run_resumed_after_a_worker_loss_is_bit_identical(ray_cluster, tmp_path,
                                                                      capsys):
    reference, ref_trainer = _fit(tmp_path, "reference")
    assert ref_trainer.num_restarts == 0
    expected = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_steps = ref_trainer.global_step
    # the Trainer goes and its idle workers wait in the warm pool: the next run starts sooner
    del reference, ref_trainer
    gc.collect()
    marker = str(tmp_path / "killed")
    # the checkpoint of step 4 is committed; rank 2 dies at step 5, so the resumed DDP's first
    # step is step 5, where the uninterrupted run had long rebuilt its buckets
    model, trainer = _fit(tmp_path, "killed", kill_marker=marker,
                          run_dir=str(tmp_path / "runs" / "killed"))
    assert os.path.exists(marker), "the kill did not happen"
    assert "(step 4, epoch 0)" in capsys.readouterr().out  # resumed from the checkpoint
    assert trainer.num_restarts == 1
    assert trainer.world_size_history == [4, 4]
    assert trainer.global_step == ref_steps == 8
    for key, value in expected.items():
        assert torch.equal(value, model.state_dict()[key]), (
            key, (value - model.state_dict()[key]).abs().max().item())
