"""Hang detection is armed for standalone ``trainer.validate`` / ``test`` / ``predict`` on Ray
workers too, not only for ``fit``: a rank that stops making progress in a standalone validate
is diagnosed like in fit (every rank's stacks in a file, the rank and its frame named), and is
restarted like a lost worker while ``max_failures`` allows."""

from __future__ import annotations

import os
import pathlib
import sys
import time

import cloudpickle
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.errors import TrainingFailedError
from ray_lit.messages import WorkerState, WorkerStatus
from ray_lit.testing import FakeWorkerGroups, ScriptedAttempt, controller_for

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class HangsInValidation(pl.LightningModule):
    """Rank 1 stops at its third validation batch, the first time only (``marker``)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.marker = marker

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == 2 and not os.path.exists(self.marker):
            pathlib.Path(self.marker).touch()
            wait_for_a_file_that_never_comes()
        x, y = batch
        self.log("val_loss", F.mse_loss(self.layer(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def wait_for_a_file_that_never_comes() -> None:
    time.sleep(600)


def _loader() -> DataLoader:
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(tmp_path, **options) -> pl.Trainer:
    return pl.Trainer(num_workers=2, max_epochs=1, worker_hang_timeout_s=4, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, default_root_dir=str(tmp_path), **options)


def test_a_rank_hung_in_a_standalone_validate_is_named_with_its_frame(ray_cluster, tmp_path):
    trainer = _trainer(tmp_path, max_failures=0)
    start = time.monotonic()
    with pytest.raises(TrainingFailedError) as info:
        trainer.validate(HangsInValidation(str(tmp_path / "hung-once")), _loader(),
                         verbose=False)
    elapsed = time.monotonic() - start
    error = info.value
    assert error.rank == 1
    text = error.original_traceback
    assert "worker_hang_timeout_s=4" in text
    assert "not in a collective" in text and "wait_for_a_file_that_never_comes" in text
    path = text.split("the stacks of every rank: ")[1].strip()
    body = pathlib.Path(path).read_text()
    assert "rank 0, thread ray_lit-loop" in body and "rank 1, thread ray_lit-loop" in body
    assert path.startswith(str(tmp_path / "ray_lit_hangs"))  # no fit: no run directory
    assert elapsed < 60  # the timeout plus the diagnosis, not the 600 s sleep
    trainer.teardown()


def test_after_fit_a_hung_validate_restarts_and_keeps_the_stacks_in_the_run(ray_cluster,
                                                                             tmp_path):
    trainer = _trainer(tmp_path, max_failures=1, storage_path=str(tmp_path / "runs"),
                       run_name="hang-eval")
    model = HangsInValidation(str(tmp_path / "hung-once"))
    trainer.fit(model, _loader())  # no validation data: validation_step runs only below
    results = trainer.validate(model, _loader(), verbose=False)
    assert trainer.num_restarts == 1  # hung once, diagnosed, run again to the end
    assert len(results) == 1 and "val_loss" in results[0]
    hangs = list((tmp_path / "runs" / "hang-eval" / "hangs").iterdir())
    assert len(hangs) == 1 and "wait_for_a_file_that_never_comes" in hangs[0].read_text()
    trainer.teardown()


def _status(**fields) -> WorkerStatus:
    return WorkerStatus(WorkerState.RUNNING, **fields)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_auto_is_armed_in_evaluation_once_batches_went_by(stage, tmp_path) -> None:
    """Evaluation counts no optimizer steps: "auto" arms once a slowest batch was measured."""
    trainer = pl.Trainer(num_workers=2, logger=False, default_root_dir=str(tmp_path))
    controller = controller_for(trainer, FakeWorkerGroups([ScriptedAttempt()]), stage=stage,
                                hang_timeout_s="auto", hang_floor_s=60.0)
    assert controller._is_hung(_status(idle_s=61, steps=0, slowest_step_s=0.5))
    assert not controller._is_hung(_status(idle_s=59, steps=0, slowest_step_s=0.5))
    assert not controller._is_hung(_status(idle_s=1e6, steps=0))  # the first batch: not yet
    assert not controller._is_hung(_status(idle_s=1e6, slowest_step_s=0.5, long_phase=True))
    fit = controller_for(trainer, FakeWorkerGroups([ScriptedAttempt()]), stage="fit",
                         hang_timeout_s="auto", hang_floor_s=60.0)
    assert not fit._is_hung(_status(idle_s=1e6, steps=0, slowest_step_s=0.5))  # sanity check
