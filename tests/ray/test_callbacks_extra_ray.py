"""Issue 15 item 9 on 2 Ray workers: Timer's stop decision and SWA's averaged weights agree
across ranks, and ModelSummary, RichProgressBar and MLFlowLogger work from the driver while the
loop runs in the workers."""

from __future__ import annotations

import io
import os
import sys
import time

import cloudpickle
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.callbacks import ModelSummary, RichProgressBar, StochasticWeightAveraging, Timer

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen) * 2 + 3
    return DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=batch_size)


class Net(pl.LightningModule):
    def __init__(self, out_dir: str, sleep: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters("sleep")
        self.norm = nn.BatchNorm1d(4)
        self.body = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
        self.head = nn.Linear(3, 1)
        self.out_dir = out_dir

    def forward(self, x):
        return self.head(self.body(self.norm(x))).squeeze(-1)

    def on_train_start(self):
        # rank 0's experiment calls are replayed on the driver's MlflowClient
        if self.logger is not None:
            self.logger.experiment.set_tag(self.logger.version, "started_on", "rank0")

    def training_step(self, batch, batch_idx):
        if self.hparams.sleep:
            time.sleep(self.hparams.sleep)
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def on_fit_end(self):
        # what each rank ends with: its step and its parameters
        torch.save({"step": self.global_step,
                    "params": {k: v.detach().clone() for k, v in self.named_parameters()}},
                   os.path.join(self.out_dir, f"end_rank{self.global_rank}.pt"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02)


class SkewedTimer(Timer):
    """Rank 1's clock is 1000 s ahead: alone it would stop at once; rank 0 decides."""

    def on_fit_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            self._offset += 1000.0
        super().on_fit_start(trainer, pl_module)


class EpochStartWeights(pl.Callback):
    """Rank 0's parameters at each training epoch start (what SWA folds in)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})
        if trainer.is_global_zero:
            torch.save(self.seen, os.path.join(self.out_dir, "epoch_starts.pt"))


def _ends(out_dir) -> list[dict]:
    return [torch.load(os.path.join(out_dir, f"end_rank{r}.pt")) for r in (0, 1)]


def test_timer_summary_rich_bar_and_mlflow_on_two_workers(ray_cluster, tmp_path, monkeypatch,
                                                          capfd):
    mlflow = pytest.importorskip("mlflow")
    from ray_lit.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger("workers", tracking_uri=store, run_name="two-ranks")
    stream = io.StringIO()
    timer = SkewedTimer(duration={"seconds": 1.5})
    trainer = pl.Trainer(
        num_workers=2, max_epochs=200, default_root_dir=str(tmp_path), logger=logger,
        callbacks=[timer, ModelSummary(max_depth=2),
                   RichProgressBar(console_kwargs={"file": stream, "width": 200})],
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1,
        process_group_timeout_s=30)
    trainer.fit(Net(str(tmp_path), sleep=0.05), _loader())
    rank0, rank1 = _ends(tmp_path)
    # both ranks stopped after the same batch, when rank 0's budget ran out (not at once)
    assert rank0["step"] == rank1["step"] == trainer.global_step
    assert 10 < trainer.global_step < 200 * 4
    assert 1.5 <= timer.time_elapsed("train") < 30  # rank 0's timer state, back on the driver
    out = capfd.readouterr().out
    assert out.count("| Name") == 1 and "body.0" in out  # rank 0's table, printed once
    assert "Time limit reached" in out
    # the driver's rich bar, fed by rank 0's replayed events: the epoch the timer cut short
    assert f"Epoch {trainer.current_epoch - 1}/199" in stream.getvalue()
    assert "loss: " in stream.getvalue()

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    run = client.get_run(logger.run_id)
    assert run.data.params == {"sleep": "0.05"} and run.info.status == "FINISHED"
    assert run.data.tags["started_on"] == "rank0" and run.data.tags["mlflow.runName"] == \
        "two-ranks"
    history = client.get_metric_history(logger.run_id, "train_loss")
    assert [m.step for m in history] == list(range(trainer.global_step))


def test_swa_averages_agree_across_ranks_and_reach_the_driver(ray_cluster, tmp_path):
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2, annealing_epochs=1)
    model = Net(str(tmp_path))
    trainer = pl.Trainer(
        num_workers=2, max_epochs=4, default_root_dir=str(tmp_path), logger=False,
        callbacks=[EpochStartWeights(str(tmp_path)), swa], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, _loader())
    rank0, rank1 = _ends(tmp_path)
    starts = torch.load(os.path.join(tmp_path, "epoch_starts.pt"))
    for name, param in model.named_parameters():
        expected = torch.stack([s[name] for s in starts[1:4]]).mean(0)  # epochs 1, 2, 3
        torch.testing.assert_close(rank0["params"][name], expected)
        torch.testing.assert_close(rank1["params"][name], rank0["params"][name])
        torch.testing.assert_close(param.detach(), expected)  # the driver's module
        torch.testing.assert_close(swa._average[name], expected)  # the callback's state too
    assert int(swa.n_averaged) == 3
    # BatchNorm statistics were recomputed for the averaged weights on rank 0's shard
    assert model.norm.num_batches_tracked.item() == 4 and model.norm.momentum == 0.1
