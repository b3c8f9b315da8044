"""A real hang on 2 workers: rank 1 stops in its training step while rank 0 waits for it in
DDP's all-reduce. The driver declares the hang, collects both ranks' stacks, writes them to the
run directory and fails with an error naming rank 1 and its frame."""

from __future__ import annotations

import pathlib
import sys
import time

import cloudpickle
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl
from ray_lit.errors import TrainingFailedError

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class HangsOnRankOne(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 3:
            wait_for_a_file_that_never_comes()
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def wait_for_a_file_that_never_comes() -> None:
    time.sleep(600)


def test_a_hung_rank_is_named_with_its_frame_and_the_stacks_are_kept(ray_cluster, tmp_path):
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    start = time.monotonic()
    with pytest.raises(TrainingFailedError) as info:
        ray_lit.fit(HangsOnRankOne(), loader, num_workers=2, max_epochs=1, max_failures=0,
                    worker_hang_timeout_s=4, storage_path=str(tmp_path / "runs"),
                    run_name="hang", logger=False, enable_progress_bar=False,
                    enable_checkpointing=False)
    elapsed = time.monotonic() - start
    error = info.value
    assert error.rank == 1
    text = error.original_traceback
    assert "not in a collective" in text and "wait_for_a_file_that_never_comes" in text
    assert "rank(s) 0 wait in a collective" in text
    path = text.split("the stacks of every rank: ")[1].strip()
    body = pathlib.Path(path).read_text()
    assert "rank 0, thread ray_lit-loop" in body and "rank 1, thread ray_lit-loop" in body
    assert path.startswith(str(tmp_path / "runs" / "hang" / "hangs"))
    assert elapsed < 120  # the timeout plus the diagnosis, not the 600 s sleep


class HangsOnceOnRankOne(pl.LightningModule):
    """Rank 1 hangs at step 3 of the first attempt only (a marker file says it did)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 3 and \
                not pathlib.Path(self.marker).exists():
            pathlib.Path(self.marker).write_text("hung")
            wait_for_a_file_that_never_comes()
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_ranks_waiting_for_a_hung_one_are_kept_for_the_restart(ray_cluster, tmp_path,
                                                                   capsys):
    """The hung rank is let go first: rank 0, blocked in DDP's all-reduce with it, leaves the
    collective once its peer's sockets close, and is kept instead of being given up as stuck
    after ``abort_timeout_s`` (10 s) and replaced by a fresh process."""
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    trainer = ray_lit.Trainer(num_workers=2, max_epochs=1, max_failures=1,
                              worker_hang_timeout_s=4, storage_path=str(tmp_path / "runs"),
                              run_name="hang-once", logger=False, enable_progress_bar=False,
                              enable_checkpointing=False, checkpoint_every_n_steps=2)
    trainer.fit(HangsOnceOnRankOne(str(tmp_path / "hung")), loader)
    assert trainer.num_restarts == 1 and trainer.global_step == 8
    out = capsys.readouterr().out
    assert "hang diagnosed" in out
    assert "kept 1 worker(s), started 1 new" in out
