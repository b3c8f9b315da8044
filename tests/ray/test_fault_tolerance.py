"""Fault tolerance on a local Ray cluster (issue 5): a rank killed mid-epoch is recovered from
the latest committed checkpoint and the run ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
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


class DropoutNet(pl.LightningModule):
    """Dropout + Adam + a shuffled loader: exact resume needs RNG, optimizer and sampler."""

    def __init__(self, kill_marker: str = "", kill_rank: int = 1, kill_step: int = 5,
                 kill_signal: int | None = None, step_sleep_s: float = 0.0,
                 pid_log: str = "") -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
        self.kill_marker = kill_marker
        self.kill_rank = kill_rank
        self.kill_step = kill_step
        self.kill_signal = kill_signal
        self.step_sleep_s = step_sleep_s
        self.pid_log = pid_log

    def on_train_start(self):
        if self.pid_log:  # which process hosts which rank, per attempt
            with open(self.pid_log, "a") as f:
                f.write(f"{self.global_rank} {os.getpid()}\n")

    def training_step(self, batch, batch_idx):
        if (self.kill_marker and self.global_rank == self.kill_rank
                and self.global_step == self.kill_step and not os.path.exists(self.kill_marker)):
            open(self.kill_marker, "w").close()
            if self.kill_signal is not None:
                os.kill(os.getpid(), self.kill_signal)  # a notice: the process goes soon
            else:
                os._exit(1)  # the worker process dies: no exception, no cleanup
        time.sleep(self.step_sleep_s)  # time for the driver to act mid-run
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)


def _fit(tmp_path, name: str, max_failures: int = 3, checkpoint_every_n_steps: int | None = 2,
         snapshot_every_n_steps: int | None = None, **extra):
    pl.seed_everything(11)
    model = DropoutNet(**extra)
    trainer = ray_lit.fit(model, _data(), num_workers=2, max_epochs=2, max_failures=max_failures,
                          storage_path=str(tmp_path / "runs"), run_name=name,
                          checkpoint_every_n_steps=checkpoint_every_n_steps,
                          snapshot_every_n_steps=snapshot_every_n_steps,
                          enable_progress_bar=False, enable_model_summary=False, logger=False,
                          enable_checkpointing=False)
    return model, trainer


def test_killed_rank_resumes_exactly(ray_cluster, tmp_path):
    reference, ref_trainer = _fit(tmp_path, "reference")
    assert ref_trainer.num_restarts == 0
    marker = str(tmp_path / "killed")
    pids = tmp_path / "pids.txt"
    model, trainer = _fit(tmp_path, "killed", kill_marker=marker, pid_log=str(pids))
    assert os.path.exists(marker), "the kill did not happen"
    assert trainer.num_restarts == 1
    assert trainer.world_size_history == [2, 2]
    # the surviving worker was kept (same process, new process group); only rank 1 is new
    first, second = (pids.read_text().split("\n")[i:i + 2] for i in (0, 2))
    assert len(set(first) | set(second)) == 3
    assert {line.split()[1] for line in first} & {line.split()[1] for line in second}
    assert trainer.global_step == ref_trainer.global_step == 12
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    # only committed checkpoints remain, and every one of them loads
    manager = CheckpointManager(str(tmp_path / "runs" / "killed"))
    committed = manager.committed()
    assert committed and len(committed) <= 2
    for ckpt in committed:
        for rank in range(ckpt.world_size):
            from ray_lit.storage.checkpoint_io import load_checkpoint

            assert "loops" in load_checkpoint(ckpt.part_uri(rank))


def test_a_lost_rank_0_resumes_exactly_from_a_survivors_memory(ray_cluster, tmp_path, capsys):
    reference, ref_trainer = _fit(tmp_path, "reference")
    marker = str(tmp_path / "killed")
    # storage checkpoints only at epoch ends (step 6); in-memory snapshots every 2 steps. Rank 0
    # dies at step 5: rank 1 holds the parameters and optimizer state of step 4, the driver
    # holds rank 0's own part (buffers, schedulers, RNG, loop and sampler position)
    model, trainer = _fit(tmp_path, "snapshot", kill_marker=marker, kill_rank=0,
                          checkpoint_every_n_steps=None, snapshot_every_n_steps=2,
                          step_sleep_s=0.15)
    assert os.path.exists(marker), "the kill did not happen"
    assert trainer.num_restarts == 1
    out = capsys.readouterr().out
    assert ("restoring from step 4 from a surviving worker's memory, no checkpoint committed "
            "yet") in out
    assert trainer.global_step == ref_trainer.global_step == 12
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_sigterm_to_a_worker_checkpoints_then_continues_exactly(ray_cluster, tmp_path, capsys):
    reference, ref_trainer = _fit(tmp_path, "reference")
    marker = str(tmp_path / "signalled")
    model, trainer = _fit(tmp_path, "sigterm", kill_marker=marker, kill_signal=signal.SIGTERM,
                          kill_step=3, step_sleep_s=0.1, max_failures=0)
    assert os.path.exists(marker), "the signal was not sent"
    # a planned stop: no failure used up (max_failures=0 would have raised), no step redone
    assert trainer.num_restarts == 0
    assert trainer.world_size_history == [2, 2]
    out = capsys.readouterr().out
    assert "SIGTERM to the worker(s) of rank(s) [1]" in out
    assert "restoring from step-" in out  # the new group started from that checkpoint
    assert trainer.global_step == ref_trainer.global_step == 12
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_failures_beyond_max_failures_raise_training_failed(ray_cluster, tmp_path):
    pl.seed_everything(11)

    class AlwaysDies(DropoutNet):
        def training_step(self, batch, batch_idx):
            if self.global_rank == 1 and batch_idx == 1:
                os._exit(3)
            return super().training_step(batch, batch_idx)

    with pytest.raises(pl.TrainingFailedError) as info:
        ray_lit.fit(AlwaysDies(), _data(), num_workers=2, max_epochs=1, max_failures=1,
                    storage_path=str(tmp_path / "runs"), run_name="dies",
                    enable_progress_bar=False, enable_model_summary=False, logger=False,
                    enable_checkpointing=False)
    assert info.value.rank == 1
    assert "rank: 1" in str(info.value)


def test_a_rank_without_progress_is_treated_as_failed(ray_cluster, tmp_path):
    marker = str(tmp_path / "hung")

    class HangsOnce(DropoutNet):
        def training_step(self, batch, batch_idx):
            if self.global_rank == 1 and self.global_step == 3 and not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(3600)  # a silent hang: no exception, no exit
            return super().training_step(batch, batch_idx)

    pl.seed_everything(11)
    start = time.monotonic()
    trainer = ray_lit.fit(HangsOnce(), _data(), num_workers=2, max_epochs=1,
                          worker_hang_timeout_s=4, checkpoint_every_n_steps=2,
                          storage_path=str(tmp_path / "runs"), run_name="hang",
                          enable_progress_bar=False, enable_model_summary=False, logger=False,
                          enable_checkpointing=False)
    assert os.path.exists(marker)
    assert trainer.num_restarts == 1 and trainer.global_step == 6
    assert time.monotonic() - start < 90
