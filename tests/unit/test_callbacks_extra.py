"""The 2.x callbacks users import: ModelSummary, Timer, StochasticWeightAveraging and
RichProgressBar, in process (``num_workers=0``). Their 2-worker behaviour is in
``tests/ray/test_callbacks_extra_ray.py``."""

from __future__ import annotations

import io
import sys
import time
from datetime import timedelta

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.callbacks import (
    ModelSummary,
    ProgressBar,
    RichProgressBar,
    StochasticWeightAveraging,
    Timer,
)
from ray_lit.errors import MisconfigurationException


def _loader(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen) * 2 + 3  # mean 3: BatchNorm statistics are visible
    return DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=batch_size)


class Net(pl.LightningModule):
    """Linear regression, optionally behind a BatchNorm layer; ``sleep`` slows each step."""

    def __init__(self, batch_norm: bool = False, sleep: float = 0.0, lr: float = 0.05) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4) if batch_norm else nn.Identity()
        self.body = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
        self.head = nn.Linear(3, 1)
        self.sleep = sleep
        self.lr = lr

    def forward(self, x):
        return self.head(self.body(self.norm(x))).squeeze(-1)

    def training_step(self, batch, batch_idx):
        if self.sleep:
            time.sleep(self.sleep)
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _trainer(tmp_path, **options) -> pl.Trainer:
    defaults = dict(max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, default_root_dir=str(tmp_path), logger=False,
                    num_sanity_val_steps=0)
    defaults.update(options)
    return pl.Trainer(**defaults)


# --- ModelSummary ---------------------------------------------------------------------------------
def test_model_summary_callback_prints_its_depth_once(tmp_path, capsys):
    _trainer(tmp_path, callbacks=[ModelSummary(max_depth=2)],
             enable_model_summary=True).fit(Net(), _loader())
    out = capsys.readouterr().out
    assert out.count("| Name") == 1  # the callback's table replaces the default one
    assert "body.0" in out and "Linear" in out and "Total params" in out


def test_default_summary_is_depth_one_and_max_depth_zero_prints_nothing(tmp_path, capsys):
    _trainer(tmp_path, enable_model_summary=True).fit(Net(), _loader())
    out = capsys.readouterr().out
    assert out.count("| Name") == 1 and "body.0" not in out
    _trainer(tmp_path, callbacks=[ModelSummary(max_depth=0)],
             enable_model_summary=True).fit(Net(), _loader())
    assert "| Name" not in capsys.readouterr().out


def test_model_summary_refuses_a_bad_depth():
    with pytest.raises(MisconfigurationException, match="max_depth"):
        ModelSummary(max_depth=-2)


# --- Timer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("duration, seconds", [
    ("00:01:02:03", 3723.0), ({"minutes": 2}, 120.0), (timedelta(seconds=5), 5.0), (None, None),
])
def test_timer_reads_every_duration_form(duration, seconds):
    timer = Timer(duration=duration)
    assert timer.time_remaining() == seconds
    assert timer.start_time() is None and timer.end_time() is None


@pytest.mark.parametrize("kwargs, match", [
    ({"duration": "1:00:00"}, "DD:HH:MM:SS"), ({"duration": 5}, "timedelta"),
    ({"interval": "batch"}, "interval"),
])
def test_timer_refuses_bad_options(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        Timer(**kwargs)


def test_timer_stops_training_after_the_duration(tmp_path, capsys):
    timer = Timer(duration=timedelta(seconds=0.4), interval="step")
    trainer = _trainer(tmp_path, max_epochs=100, callbacks=[timer])
    trainer.fit(Net(sleep=0.05), _loader())
    # 4 batches per epoch at >= 50 ms each: the budget runs out in the 2nd or 3rd epoch
    assert 0 < trainer.global_step < 20
    assert timer.time_elapsed("train") >= 0.4
    assert timer.time_remaining() <= 0
    assert timer.end_time("train") > timer.start_time("train")
    assert "Time limit reached" in capsys.readouterr().out


def test_timer_interval_epoch_stops_at_an_epoch_end(tmp_path):
    timer = Timer(duration=timedelta(seconds=0.1), interval="epoch", verbose=False)
    trainer = _trainer(tmp_path, max_epochs=100, callbacks=[timer])
    trainer.fit(Net(sleep=0.05), _loader())
    assert trainer.global_step == 4  # the whole first epoch, then the check
    assert trainer.current_epoch == 1


def test_timer_times_validation_and_test(tmp_path):
    class WithEval(Net):
        def validation_step(self, batch, batch_idx):
            time.sleep(0.02)

        def test_step(self, batch, batch_idx):
            time.sleep(0.02)

    timer = Timer()
    trainer = _trainer(tmp_path, callbacks=[timer])
    trainer.fit(WithEval(), _loader(), _loader(8))
    trainer.test(test_dataloaders=_loader(8), ckpt_path=None)
    assert timer.time_elapsed("validate") >= 0.02 and timer.time_elapsed("test") >= 0.02
    assert timer.time_remaining() is None
    with pytest.raises(ValueError, match="stage"):
        timer.time_elapsed("training")


def test_timer_state_carries_the_elapsed_time_into_a_resumed_run(tmp_path):
    spent = Timer(duration="00:00:00:10")
    spent.load_state_dict({"time_elapsed": {"train": 10.0}})
    assert spent.time_elapsed() == 10.0 and spent.time_remaining() == 0.0
    trainer = _trainer(tmp_path, max_epochs=5, callbacks=[spent])
    trainer.fit(Net(), _loader())
    # the budget was spent before the run: it stops at the first check, not after 5 epochs
    assert trainer.global_step <= 1
    assert spent.state_dict()["time_elapsed"]["train"] >= 10.0


def test_timer_resumes_from_a_checkpoint_with_the_elapsed_time(tmp_path):
    first = Timer(duration="00:00:01:00")
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[first], enable_checkpointing=True)
    trainer.fit(Net(sleep=0.02), _loader())
    elapsed = first.time_elapsed()
    path = trainer.checkpoint_callback.best_model_path
    second = Timer(duration="00:00:01:00")
    resumed = _trainer(tmp_path, max_epochs=2, callbacks=[second])
    resumed.fit(Net(sleep=0.02), _loader(), ckpt_path=path)
    # the checkpoint was written at the epoch end (after its 4 batches of 20 ms), a little
    # before training ended; bounds that hold however loaded the machine is
    assert 0.08 <= second._offset <= elapsed
    assert second.time_elapsed() > second._offset + 0.08  # the offset plus 4 more batches


# --- StochasticWeightAveraging --------------------------------------------------------------------
class WeightRecorder(pl.Callback):
    """The module's parameters at each training epoch start (when SWA folds them in)."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights.append([p.detach().clone() for p in pl_module.parameters()])


@pytest.mark.parametrize("kwargs", [
    {"swa_lrs": -0.1}, {"swa_lrs": 1}, {"swa_lrs": [0.1, -1.0]}, {"swa_lrs": 0.1,
                                                                    "swa_epoch_start": 0},
    {"swa_lrs": 0.1, "swa_epoch_start": 1.5}, {"swa_lrs": 0.1, "annealing_strategy": "exp"},
    {"swa_lrs": 0.1, "avg_fn": 3}, {"swa_lrs": 0.1, "device": 0},
])
def test_swa_refuses_bad_options(kwargs):
    with pytest.raises(MisconfigurationException, match="StochasticWeightAveraging"):
        StochasticWeightAveraging(**kwargs)


def test_swa_module_ends_with_the_average_of_the_swa_epochs(tmp_path):
    recorder = WeightRecorder()
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2, annealing_epochs=1)
    trainer = _trainer(tmp_path, max_epochs=4, callbacks=[recorder, swa])
    model = Net()
    trainer.fit(model, _loader())
    # swa_epoch_start=2 (1-based): the starts of epochs 1, 2 and 3 are averaged
    expected = [torch.stack(ws).mean(0) for ws in zip(*recorder.weights[1:4])]
    for param, average in zip(model.parameters(), expected):
        torch.testing.assert_close(param.detach(), average)
    assert int(swa.n_averaged) == 3
    # SWALR, stepped every epoch end, took the optimizer's rate to swa_lrs
    assert type(swa._swa_scheduler).__name__ == "SWALR"
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


def test_swa_fraction_start_and_custom_avg_fn(tmp_path):
    recorder = WeightRecorder()
    swa = StochasticWeightAveraging(swa_lrs=[0.01], swa_epoch_start=0.5,
                                    avg_fn=lambda avg, cur, n: cur)  # keep the latest
    trainer = _trainer(tmp_path, max_epochs=4, callbacks=[recorder, swa])
    model = Net()
    trainer.fit(model, _loader())
    assert swa.swa_start == 1  # int(0.5 * 4) = 2 (1-based)
    for param, last in zip(model.parameters(), recorder.weights[3]):
        torch.testing.assert_close(param.detach(), last)


def test_swa_recomputes_batch_norm_statistics_for_the_average(tmp_path):
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    model = Net(batch_norm=True)
    loader = _loader()
    _trainer(tmp_path, max_epochs=2, callbacks=[swa]).fit(model, loader)
    x = torch.cat([b[0] for b in loader])
    # one cumulative pass over the data: the running mean is the data's mean (the EMA of
    # training with momentum 0.1 would still be far from it after 8 batches)
    torch.testing.assert_close(model.norm.running_mean, x.mean(0), rtol=1e-4, atol=1e-4)
    assert model.norm.momentum == 0.1  # put back after the pass
    assert model.norm.num_batches_tracked.item() == 4


def test_swa_replaces_the_modules_scheduler_and_refuses_two_optimizers(tmp_path):
    class WithScheduler(Net):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1)]

    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=2, annealing_epochs=2,
                                    annealing_strategy="linear")
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[swa])
    with pytest.warns(UserWarning, match="SWALR replaces the module's StepLR"):
        trainer.fit(WithScheduler(), _loader())
    assert trainer.lr_scheduler_configs == []  # StepLR (x0.1 per epoch) stepped once only
    # epoch 0 at 0.05, StepLR -> 0.005; SWALR anneals linearly from 0.005 to 0.02 in 2 epochs
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02)
    assert swa._swa_scheduler.state_dict()["_step_count"] == 3

    class TwoOptimizers(Net):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.body.parameters(), lr=0.1),
                    torch.optim.SGD(self.head.parameters(), lr=0.1)]

        def training_step(self, batch, batch_idx, optimizer_idx=0):
            return super().training_step(batch, batch_idx)

    with pytest.raises(MisconfigurationException, match="one optimizer"):
        _trainer(tmp_path, callbacks=[StochasticWeightAveraging(swa_lrs=0.1)]).fit(
            TwoOptimizers(), _loader())


def test_swa_state_round_trips_and_a_stopped_run_keeps_its_weights(tmp_path):
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    trainer = _trainer(tmp_path, max_epochs=3, max_steps=6, callbacks=[swa])
    model = Net()
    trainer.fit(model, _loader())
    # max_steps ended the run inside epoch 1 of 3: the averaged weights are not swapped in
    assert any(not torch.equal(p.detach(), swa._average[n]) for n, p in model.named_parameters())
    state = swa.state_dict()
    assert state["n_averaged"] == 2 and state["latest_update_epoch"] == 1
    restored = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    restored.load_state_dict(state)
    assert restored._init_n_averaged == 2 and restored._scheduler_state is not None
    torch.testing.assert_close(restored._average, state["average_model_state"])


# --- RichProgressBar ------------------------------------------------------------------------------
def test_rich_progress_bar_draws_epochs_and_metrics(tmp_path):
    class Logged(Net):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.tensor(0.5), prog_bar=True)

    stream = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": stream, "width": 200})
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[bar], enable_progress_bar=True)
    assert trainer.progress_bar_callback is bar  # it is the run's one bar, not an extra one
    trainer.fit(Logged(), _loader(), _loader(8))
    out = stream.getvalue()
    assert "Epoch 1/1" in out and "4/4" in out and "val_loss: 0.500" in out


def test_rich_progress_bar_is_off_with_enable_progress_bar_false(tmp_path):
    stream = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": stream})
    _trainer(tmp_path, callbacks=[bar], enable_progress_bar=False).fit(Net(), _loader())
    assert stream.getvalue() == "" and isinstance(bar, ProgressBar)


def test_rich_progress_bar_without_rich_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    with pytest.raises(ImportError, match=r"pip install ray_lit\[rich\]"):
        RichProgressBar()


# --- the names Lightning code imports -------------------------------------------------------------
def test_lightning_import_paths_resolve_to_these_callbacks():
    import ray_lit.compat

    with ray_lit.compat.lightning_on_ray():
        import lightning.pytorch as L
        import pytorch_lightning as pl_alias
        from lightning.pytorch.callbacks import StochasticWeightAveraging as SWA
        from pytorch_lightning.callbacks.progress.rich_progress import RichProgressBar as Rich
        from pytorch_lightning.callbacks.timer import Timer as T

        assert SWA is StochasticWeightAveraging and Rich is RichProgressBar and T is Timer
        assert pl_alias.callbacks.ModelSummary is ModelSummary
        assert L.callbacks.Timer is Timer
