"""LearningRateMonitor with a fake trainer, real optimizers/schedulers and a recording logger."""

from __future__ import annotations

import pickle
import warnings
from types import SimpleNamespace

import pytest
import torch

from ray_lit.callbacks.lr_monitor import LearningRateLogger, LearningRateMonitor
from ray_lit.errors import MisconfigurationException


class RecordingLogger:
    def __init__(self):
        self.calls: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))


def _config(scheduler, interval="epoch", name=None, opt_idx=0, frequency=1):
    return SimpleNamespace(scheduler=scheduler, interval=interval, frequency=frequency,
                           name=name, opt_idx=opt_idx)


def _params(n=1):
    return [torch.nn.Parameter(torch.zeros(2)) for _ in range(n)]


def _trainer(optimizers, configs, loggers=None, log_every=1):
    return SimpleNamespace(
        optimizers=optimizers, lr_scheduler_configs=configs,
        loggers=[RecordingLogger()] if loggers is None else loggers,
        global_step=0, current_epoch=0, config=SimpleNamespace(log_every_n_steps=log_every),
        callback_metrics={})


def test_alias():
    assert LearningRateLogger is LearningRateMonitor


def test_bad_interval():
    with pytest.raises(MisconfigurationException, match="logging_interval"):
        LearningRateMonitor(logging_interval="batch")


def test_no_logger_raises_at_train_start():
    opt = torch.optim.SGD(_params(), lr=0.1)
    trainer = _trainer([opt], [], loggers=[])
    with pytest.raises(MisconfigurationException,
                       match="Cannot use LearningRateMonitor with Trainer that has no logger"):
        LearningRateMonitor().on_train_start(trainer, None)


def test_step_scheduler_logged_on_cadence():
    opt = torch.optim.Adam(_params(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = _trainer([opt], [_config(sched, "step")], log_every=2)
    monitor = LearningRateMonitor()
    monitor.on_train_start(trainer, None)
    monitor.on_train_epoch_start(trainer, None)  # step schedulers: not at epoch start
    for step in range(4):
        trainer.global_step = step
        monitor.on_train_batch_start(trainer, None, batch=None, batch_idx=step)
        opt.step()
        sched.step()
    calls = trainer.loggers[0].calls
    assert calls == [({"lr-Adam": 1.0}, 0), ({"lr-Adam": 0.25}, 2)]
    assert monitor.lrs == {"lr-Adam": [1.0, 0.25]}
    assert trainer.callback_metrics == {}  # loggers only, as in Lightning


def test_log_every_n_steps_attribute_wins():
    opt = torch.optim.SGD(_params(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    trainer = _trainer([opt], [_config(sched, "step")], log_every=1)
    trainer.log_every_n_steps = 3
    monitor = LearningRateMonitor()
    for step in range(4):
        trainer.global_step = step
        monitor.on_train_batch_start(trainer, None, None, step)
    assert [s for _, s in trainer.loggers[0].calls] == [0, 3]


def test_epoch_scheduler_logged_at_epoch_start_only():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    trainer = _trainer([opt], [_config(sched, "epoch")])
    monitor = LearningRateMonitor()
    monitor.on_train_start(trainer, None)
    monitor.on_train_batch_start(trainer, None, None, 0)
    assert trainer.loggers[0].calls == []
    monitor.on_train_epoch_start(trainer, None)
    opt.step()
    sched.step()
    trainer.global_step, trainer.current_epoch = 10, 1
    monitor.on_train_epoch_start(trainer, None)
    assert trainer.loggers[0].calls == [({"lr-SGD": 0.1}, 0), ({"lr-SGD": pytest.approx(0.01)}, 10)]


def test_logging_interval_step_logs_epoch_schedulers_every_step():
    opt = torch.optim.SGD(_params(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    trainer = _trainer([opt], [_config(sched, "epoch")])
    monitor = LearningRateMonitor(logging_interval="step")
    monitor.on_train_epoch_start(trainer, None)
    monitor.on_train_batch_start(trainer, None, None, 0)
    assert trainer.loggers[0].calls == [({"lr-SGD": 0.1}, 0)]


def test_names_duplicates_param_groups_and_custom_name():
    a1 = torch.optim.Adam(_params(), lr=0.1)
    a2 = torch.optim.Adam([{"params": _params()}, {"params": _params(), "lr": 0.2}], lr=0.3)
    sgd = torch.optim.SGD(_params(), lr=0.5)
    named = torch.optim.Adam(_params(), lr=0.7)
    configs = [_config(torch.optim.lr_scheduler.StepLR(a1, 1)),
               _config(torch.optim.lr_scheduler.StepLR(a2, 1), opt_idx=1),
               _config(torch.optim.lr_scheduler.StepLR(named, 1), name="my_lr", opt_idx=3)]
    trainer = _trainer([a1, a2, sgd, named], configs)
    monitor = LearningRateMonitor()
    monitor.on_train_start(trainer, None)
    monitor.on_train_epoch_start(trainer, None)
    (metrics, _), = trainer.loggers[0].calls
    assert metrics == {"lr-Adam": 0.1, "lr-Adam-1/pg1": 0.3, "lr-Adam-1/pg2": 0.2,
                       "my_lr": 0.7, "lr-SGD": 0.5}
    assert set(monitor.lrs) == set(metrics)


def test_no_schedulers_warns_once_and_logs_per_interval():
    opt = torch.optim.SGD(_params(), lr=0.1)
    trainer = _trainer([opt], [])
    monitor = LearningRateMonitor()
    with pytest.warns(RuntimeWarning, match="no learning rate schedulers"):
        monitor.on_train_start(trainer, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.on_train_start(trainer, None)  # once per callback
    monitor.on_train_batch_start(trainer, None, None, 0)
    assert trainer.loggers[0].calls == []  # default interval: epoch
    monitor.on_train_epoch_start(trainer, None)
    assert trainer.loggers[0].calls == [({"lr-SGD": 0.1}, 0)]

    step_monitor = LearningRateMonitor(logging_interval="step")
    trainer = _trainer([opt], [])
    with pytest.warns(RuntimeWarning):
        step_monitor.on_train_start(trainer, None)
    step_monitor.on_train_epoch_start(trainer, None)
    step_monitor.on_train_batch_start(trainer, None, None, 0)
    assert trainer.loggers[0].calls == [({"lr-SGD": 0.1}, 0)]


def test_log_momentum():
    adam = torch.optim.Adam(_params(), lr=0.1, betas=(0.8, 0.99))
    sgd = torch.optim.SGD(_params(), lr=0.2, momentum=0.5)
    configs = [_config(torch.optim.lr_scheduler.StepLR(adam, 1)),
               _config(torch.optim.lr_scheduler.StepLR(sgd, 1), name="sgd_lr", opt_idx=1)]
    trainer = _trainer([adam, sgd], configs)
    monitor = LearningRateMonitor(log_momentum=True)
    monitor.on_train_start(trainer, None)
    monitor.on_train_epoch_start(trainer, None)
    (metrics, _), = trainer.loggers[0].calls
    assert metrics == {"lr-Adam": 0.1, "lr-Adam-momentum": 0.8, "sgd_lr": 0.2,
                       "sgd_lr-momentum": 0.5}  # Lightning's keys
    assert monitor.last_momentum_values == {"lr-Adam-momentum": 0.8, "sgd_lr-momentum": 0.5}


def test_log_momentum_warns_without_momentum():
    opt = torch.optim.Adagrad(_params(), lr=0.1)
    trainer = _trainer([opt], [_config(torch.optim.lr_scheduler.StepLR(opt, 1))])
    monitor = LearningRateMonitor(log_momentum=True)
    with pytest.warns(RuntimeWarning, match="momentum"):
        monitor.on_train_start(trainer, None)
    monitor.on_train_epoch_start(trainer, None)
    assert trainer.loggers[0].calls[0][0]["lr-Adagrad-momentum"] == 0.0


def test_picklable():
    monitor = pickle.loads(pickle.dumps(LearningRateMonitor("step", log_momentum=True)))
    assert (monitor.logging_interval, monitor.log_momentum) == ("step", True)


def test_aggregating_loggers_get_one_record_per_step(tmp_path):
    from ray_lit.loggers import CSVLogger

    opt = torch.optim.SGD(_params(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    logger = CSVLogger(tmp_path)
    trainer = _trainer([opt], [_config(sched, "epoch")], loggers=[logger])
    LearningRateMonitor().on_train_epoch_start(trainer, None)
    logger.agg_and_log_metrics({"val_loss": 1.0}, step=0)  # what the trainer sends
    logger.finalize("success")
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        assert f.read().splitlines() == ["step,lr-SGD,val_loss", "0,0.1,1.0"]
