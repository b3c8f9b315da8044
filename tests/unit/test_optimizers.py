"""``configure_optimizers`` forms, scheduler stepping, several optimizers, accumulation and
clipping (spec §3.2, §3.6, §3.7, §6 test_optimizers / test_trainer_steps_dict_return,
§8 scenarios 8 and 9)."""

from __future__ import annotations

import pytest
import torch
from doubles import BATCH_LOSS, DeterministicModel, RecordingLogger
from torch import nn

import ray_lit as pl


def _sgd(model, lr=0.0):
    return torch.optim.SGD(model.parameters(), lr=lr)


class Configured(DeterministicModel):
    """``configure_optimizers`` returns what ``factory(self)`` builds."""

    def __init__(self, factory, **kwargs):
        super().__init__(**kwargs)
        self._factory = factory

    def configure_optimizers(self):
        return self._factory(self)


# --- return forms --------------------------------------------------------------------------------


def test_single_optimizer(make_trainer):
    holder = {}

    def factory(m):
        holder["opt"] = _sgd(m)
        return holder["opt"]

    trainer = make_trainer()
    trainer.fit(Configured(factory))
    assert trainer.optimizers == [holder["opt"]]
    assert trainer.lr_schedulers == []


def test_optimizer_and_scheduler_lists(make_trainer):
    holder = {}

    def factory(m):
        opt = _sgd(m)
        holder["sched"] = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        return [opt], [holder["sched"]]

    trainer = make_trainer()
    trainer.fit(Configured(factory))
    (config,) = trainer.lr_schedulers
    assert config.scheduler is holder["sched"]
    assert config.interval == "epoch"
    assert config.frequency == 1
    assert config.reduce_on_plateau is False


def test_dict_forms(make_trainer):
    def with_sched(m):
        opt = _sgd(m)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    trainer = make_trainer(max_epochs=2)
    trainer.fit(Configured(with_sched))
    assert len(trainer.optimizers) == 1 and len(trainer.lr_schedulers) == 1
    assert trainer.lr_schedulers[0].scheduler.last_epoch == 2

    trainer = make_trainer()
    trainer.fit(Configured(lambda m: {"optimizer": _sgd(m)}))
    assert len(trainer.optimizers) == 1 and trainer.lr_schedulers == []


class TwoOptimizers(DeterministicModel):
    def __init__(self, factory=None):
        super().__init__()
        self.gen = nn.Linear(1, 1)
        self.disc = nn.Linear(1, 1)
        self.calls = []
        self.stepped = []
        self._factory = factory

    def configure_optimizers(self):
        if self._factory is not None:
            return self._factory(self)
        opt_g = torch.optim.SGD([*self.l1.parameters(), *self.gen.parameters()], lr=0.0)
        opt_d = torch.optim.SGD(self.disc.parameters(), lr=0.0)
        return [opt_g, opt_d]

    def training_step(self, batch, batch_idx, optimizer_idx):
        self.calls.append((batch_idx, optimizer_idx, self.gen.weight.requires_grad,
                           self.disc.weight.requires_grad))
        if optimizer_idx == 0:
            return self.step(batch) + 0 * self.gen.weight.sum()
        return self.disc(torch.ones(3, 1)).sum()

    def on_before_optimizer_step(self, optimizer, optimizer_idx=0):
        self.stepped.append(optimizer_idx)


def test_gan_two_optimizers(make_trainer):
    model = TwoOptimizers()
    trainer = make_trainer()
    trainer.fit(model)
    expected = []
    for b in range(4):
        expected += [(b, 0, True, False), (b, 1, False, True)]
    assert model.calls == expected  # only the active optimizer's parameters require grad
    assert model.stepped == [0, 1] * 4
    assert trainer.global_step == 4  # one step per batch, not per optimizer
    assert all(p.requires_grad for p in model.parameters())


def test_optimizer_frequencies(make_trainer):
    def factory(m):
        opt_g = torch.optim.SGD([*m.l1.parameters(), *m.gen.parameters()], lr=0.0)
        opt_d = torch.optim.SGD(m.disc.parameters(), lr=0.0)
        return [{"optimizer": opt_g, "frequency": 1}, {"optimizer": opt_d, "frequency": 2}]

    model = TwoOptimizers(factory)
    make_trainer(max_epochs=2).fit(model)
    # one optimizer per batch, cycling 0, 1, 1 by the total batch index
    assert [opt for _, opt, _, _ in model.calls] == [0, 1, 1, 0, 1, 1, 0, 1]
    assert model.stepped == [0, 1, 1, 0, 1, 1, 0, 1]


def test_frequencies_for_some_optimizers_only_raise(make_trainer):
    def factory(m):
        return [{"optimizer": _sgd(m), "frequency": 1}, {"optimizer": _sgd(m)}]

    with pytest.raises((pl.MisconfigurationException, ValueError), match="frequency"):
        make_trainer().fit(Configured(factory))


def test_none_optimizer_warns_and_trains(make_trainer):
    steps = []

    class NoOpt(DeterministicModel):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return self.step(batch)

        def configure_optimizers(self):
            return None

    model = NoOpt()
    before = model.l1.weight.detach().clone()
    with pytest.warns(UserWarning, match="no optimizer"):
        make_trainer().fit(model)
    assert steps == [0, 1, 2, 3]
    assert torch.equal(model.l1.weight.detach(), before)


# --- scheduler stepping --------------------------------------------------------------------------


def test_epoch_scheduler_steps_once_per_epoch(make_trainer):
    holder = {}

    def factory(m):
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        holder["sched"] = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
        holder["opt"] = opt
        return [opt], [holder["sched"]]

    make_trainer(max_epochs=3).fit(Configured(factory))
    assert holder["sched"].last_epoch == 3
    assert holder["opt"].param_groups[0]["lr"] == pytest.approx(1e-3)


def test_step_scheduler_steps_every_batch(make_trainer):
    holder = {}

    def factory(m):
        opt = _sgd(m)
        holder["sched"] = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        return [opt], [{"scheduler": holder["sched"], "interval": "step"}]

    make_trainer(max_epochs=2).fit(Configured(factory))
    assert holder["sched"].last_epoch == 8


def test_step_scheduler_frequency_counts_batches_within_the_epoch(make_trainer):
    # spec §3.6 (0.9 rule): steps when (batch_idx + 1) % frequency == 0, batch_idx in the epoch.
    # 3 batches per epoch, frequency 2 -> only batch 1 of each epoch -> 2 steps in 2 epochs.
    holder = {}

    def factory(m):
        opt = _sgd(m)
        holder["sched"] = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        return [opt], [{"scheduler": holder["sched"], "interval": "step", "frequency": 2}]

    make_trainer(max_epochs=2).fit(Configured(factory, n_train=9))
    assert holder["sched"].last_epoch == 2


def test_epoch_scheduler_frequency(make_trainer):
    holder = {}

    def factory(m):
        opt = _sgd(m)
        holder["sched"] = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        return [opt], [{"scheduler": holder["sched"], "interval": "epoch", "frequency": 2}]

    make_trainer(max_epochs=5).fit(Configured(factory))
    assert holder["sched"].last_epoch == 2  # after epochs 1 and 3


class RecordingPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    def __init__(self, optimizer, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.seen = []

    def step(self, metrics, *args, **kwargs):
        self.seen.append(float(metrics))
        return super().step(metrics, *args, **kwargs)


class PlateauModel(DeterministicModel):
    def __init__(self, sched_dict, **kwargs):
        super().__init__(**kwargs)
        self.sched_dict = sched_dict
        self.sched = None

    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("train_epoch_metric", loss, on_step=False, on_epoch=True)
        self.log("pbar_metric", loss + batch_idx, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = _sgd(self)
        self.sched = RecordingPlateau(opt)
        return [opt], [{"scheduler": self.sched, **self.sched_dict}]


def test_plateau_epoch_interval_monitors_epoch_metric(make_trainer):
    model = PlateauModel({"monitor": "train_epoch_metric"})
    trainer = make_trainer(max_epochs=3)
    trainer.fit(model)
    assert model.sched.seen == [BATCH_LOSS] * 3
    assert trainer.lr_schedulers[0].reduce_on_plateau is True


def test_plateau_step_interval_monitors_pbar_metric(make_trainer):
    model = PlateauModel({"monitor": "pbar_metric", "interval": "step"})
    make_trainer(max_epochs=2).fit(model)
    assert model.sched.seen == [BATCH_LOSS + b for b in range(4)] * 2


def test_plateau_missing_monitor_lists_available_keys(make_trainer):
    model = PlateauModel({"monitor": "does_not_exist"})
    with pytest.raises(pl.MisconfigurationException) as err:
        make_trainer().fit(model)
    assert "does_not_exist" in str(err.value)
    assert "train_epoch_metric" in str(err.value)


def test_plateau_defaults_to_val_loss(make_trainer):
    class ValPlateau(DeterministicModel):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.step(batch))

        def configure_optimizers(self):
            opt = _sgd(self)
            self.sched = RecordingPlateau(opt)
            return [opt], [self.sched]

    model = ValPlateau()
    make_trainer(max_epochs=2).fit(model)
    assert model.sched.seen == [BATCH_LOSS, BATCH_LOSS]


# --- accumulation --------------------------------------------------------------------------------


class AccumulationModel(DeterministicModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.step_at = []
        self.grads = []
        self.backward_losses = []

    def on_before_backward(self, loss):
        self.backward_losses.append(float(loss.detach()))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self.step_at.append((epoch, batch_idx))
        self.grads.append(self.l1.weight.grad.clone())
        optimizer.step(closure=optimizer_closure)


def test_accumulation_steps_at_window_ends_and_last_batch(make_trainer):
    model = AccumulationModel(n_train=15)  # 5 batches of 3
    trainer = make_trainer(max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(model)
    assert model.step_at == [(0, 1), (0, 3), (0, 4), (1, 1), (1, 3), (1, 4)]
    assert trainer.global_step == 6
    assert model.backward_losses == [BATCH_LOSS / 2] * 10
    # d(loss)/dW = 3 per batch, scaled by 1/2; a full window sums two batches
    expected = [3.0, 3.0, 1.5] * 2
    for grad, value in zip(model.grads, expected):
        assert torch.allclose(grad, torch.full((2, 2), value))


def test_accumulation_schedule_dict(make_trainer):
    model = AccumulationModel()
    trainer = make_trainer(max_epochs=2, accumulate_grad_batches={1: 2})
    trainer.fit(model)
    assert model.step_at == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 3)]
    assert trainer.global_step == 6


def test_accumulation_keeps_unnormalised_checkpoint_on_and_pbar_loss(make_trainer):
    class ResultAccumulation(DeterministicModel):
        def training_step(self, batch, batch_idx):
            return pl.TrainResult(minimize=self.step(batch))

    trainer = make_trainer(accumulate_grad_batches=2, logger=RecordingLogger(version=12345))
    trainer.fit(ResultAccumulation())
    assert trainer.global_step == 2
    # spec §7.3: checkpoint_on is the un-normalised minimize; the bar's loss is re-scaled
    assert float(trainer.callback_metrics["checkpoint_on"]) == BATCH_LOSS
    bar = trainer.progress_bar_dict
    assert bar["loss"] == "171.000"
    assert bar["v_num"] == 12345


@pytest.mark.parametrize("schedule", [{-1: 2}, {}, [2], 2.5])
def test_bad_accumulation_schedules(make_trainer, schedule):
    # issue 19: a named MisconfigurationException (0.9 raised TypeError / IndexError here)
    with pytest.raises(pl.MisconfigurationException, match="accumulate_grad_batches="):
        make_trainer(accumulate_grad_batches=schedule)


# --- clipping ------------------------------------------------------------------------------------


class GradNorms(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.norms = []
        self.max_abs = []

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        # the gradients the step uses: clipping runs after on_before_optimizer_step (2.x)
        grad = self.l1.weight.grad
        self.norms.append(float(grad.norm()))
        self.max_abs.append(float(grad.abs().max()))
        optimizer.step(closure=optimizer_closure)


def test_no_clipping_control(make_trainer):
    model = GradNorms()
    make_trainer(limit_train_batches=2).fit(model)
    assert model.norms == [pytest.approx(6.0)] * 2  # four entries of 3


def test_gradient_clip_val_norm(make_trainer):
    model = GradNorms()
    make_trainer(limit_train_batches=2, gradient_clip_val=1.0).fit(model)
    assert model.norms == [pytest.approx(1.0, abs=1e-4)] * 2


def test_gradient_clip_by_value(make_trainer):
    model = GradNorms()
    make_trainer(limit_train_batches=2, gradient_clip_val=0.5,
                 gradient_clip_algorithm="value").fit(model)
    assert model.max_abs == [pytest.approx(0.5)] * 2
