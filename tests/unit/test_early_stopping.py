"""``EarlyStopping`` scenarios (spec §1.7, §4.5, §6 test_early_stopping.py and the
Result-driven callback tests of test_trainer_steps_result_return /
test_validation_steps_result_return, §7.14)."""

from __future__ import annotations

import pickle

import pytest
import torch
from doubles import BATCH_LOSS, DeterministicModel, RecordingLogger

import ray_lit as pl
from ray_lit.callbacks.early_stopping import EarlyStopping
from ray_lit.callbacks.model_checkpoint import ModelCheckpoint


class EpochCounter(pl.Callback):
    def __init__(self):
        self.epochs = []
        self.saved_at = []
        self.val_end_calls = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saved_at.append(trainer.current_epoch)


class ScriptedVal(DeterministicModel):
    """``val_loss`` of epoch ``e`` is ``losses[e]`` (one validation batch per epoch)."""

    def __init__(self, losses):
        super().__init__()
        self.losses = losses

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.losses[self.current_epoch])


def _pad(losses, n=12):
    return list(losses) + [losses[-1]] * (n - len(losses))


# Not the shared ``fit`` fixture: one batch per epoch, the stopper and an epoch counter.
def _fit(make_trainer, model, es, **options):
    counter = EpochCounter()
    options.setdefault("max_epochs", 10)
    trainer = make_trainer(callbacks=[es, counter], limit_train_batches=1, limit_val_batches=1,
                           num_sanity_val_steps=0, **options)
    trainer.fit(model)
    return trainer, counter


@pytest.mark.parametrize("losses, patience, stop_epoch", [
    ([6, 5, 5, 5, 5, 5], 3, 4),
    ([6, 5, 4, 4, 3, 3], 1, 3),
    ([6, 5, 6, 5, 5, 5], 3, 4),
])
def test_early_stopping_patience(make_trainer, losses, patience, stop_epoch):
    es = EarlyStopping(monitor="val_loss", patience=patience)
    trainer, counter = _fit(make_trainer, ScriptedVal(_pad([float(v) for v in losses])), es)
    assert es.stopped_epoch == stop_epoch
    assert counter.epochs == list(range(stop_epoch + 1))
    assert trainer.should_stop


def test_early_stopping_functionality(make_trainer):
    es = EarlyStopping(monitor="val_loss", patience=3)
    losses = [8.0, 4.0, 2.0, 3.0, 4.0, 5.0, 8.0, 10.0, 1.0, 1.0]
    _, counter = _fit(make_trainer, ScriptedVal(losses), es)
    assert es.stopped_epoch == 5
    assert counter.epochs == [0, 1, 2, 3, 4, 5]
    assert es.best_score == pytest.approx(2.0)


def test_min_epochs_delays_the_stop(make_trainer):
    es = EarlyStopping(monitor="val_loss", patience=1)
    _, counter = _fit(make_trainer, ScriptedVal(_pad([6.0, 5.0, 5.0])), es, min_epochs=5)
    # the stop is requested after epoch 2 but honoured only once 5 epochs are done
    assert counter.epochs == [0, 1, 2, 3, 4]


def test_min_delta(make_trainer):
    # steps of 1/16 (exact in float32) are smaller than min_delta: no improvement
    es = EarlyStopping(monitor="val_loss", patience=2, min_delta=0.25)
    _, counter = _fit(make_trainer, ScriptedVal(_pad([1.0, 0.9375, 0.875, 0.8125, 0.75])), es)
    assert es.stopped_epoch == 2
    assert counter.epochs == [0, 1, 2]


def test_mode_max(make_trainer):
    es = EarlyStopping(monitor="val_loss", patience=2, mode="max")
    _, counter = _fit(make_trainer, ScriptedVal(_pad([1.0, 2.0, 3.0, 2.0, 1.0])), es)
    assert es.stopped_epoch == 4
    assert EarlyStopping(monitor="acc", mode="auto").mode == "max"
    assert EarlyStopping(monitor="val_acc", mode="auto").mode == "min"


def test_checked_once_per_validation(make_trainer):
    calls = []

    class Counting(EarlyStopping):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                calls.append(trainer.current_epoch)
            super().on_validation_end(trainer, pl_module)

    es = Counting(monitor="val_loss", patience=3)
    counter = EpochCounter()
    make_trainer(callbacks=[es, counter], max_epochs=3, num_sanity_val_steps=2).fit(
        ScriptedVal(_pad([3.0, 2.0, 1.0])))
    assert calls == [0, 1, 2]
    assert es.wait_count == 0


def test_strict_missing_monitor_raises(make_trainer):
    es = EarlyStopping(monitor="not_logged", strict=True)
    with pytest.raises(RuntimeError) as err:
        _fit(make_trainer, ScriptedVal(_pad([1.0])), es)
    assert "not_logged" in str(err.value) and "val_loss" in str(err.value)


def test_non_strict_missing_monitor_is_skipped(make_trainer):
    es = EarlyStopping(monitor="not_logged", strict=False, patience=1)
    _, counter = _fit(make_trainer, ScriptedVal(_pad([1.0])), es, max_epochs=3)
    assert counter.epochs == [0, 1, 2]


def test_early_stopping_is_picklable():
    es = EarlyStopping(monitor="val_loss", patience=5)
    restored = pickle.loads(pickle.dumps(es))
    assert restored.patience == 5 and restored.monitor == "val_loss"


# --- 0.9 Results drive the callbacks -------------------------------------------------------------


class TrainLoopResults(DeterministicModel):
    """Per-epoch train value 171 + script[epoch] as early_stop_on and checkpoint_on."""

    SCRIPT = [20, 19, 18, 10, 15, 14, 9, 11, 11, 20, 30, 30, 30]

    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        value = loss.detach() + self.SCRIPT[self.current_epoch]
        return pl.TrainResult(minimize=loss, early_stop_on=value, checkpoint_on=value)


def test_train_loop_early_stop_on_and_checkpoint_on(make_trainer, tmp_path):
    es = EarlyStopping(patience=3)  # default monitor 'val_loss' is switched to early_stop_on
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), filename="{epoch}")
    counter = EpochCounter()
    trainer = make_trainer(max_epochs=20, callbacks=[es, ckpt, counter],
                           enable_checkpointing=True)
    trainer.fit(TrainLoopResults())
    assert es.monitor == "early_stop_on"
    assert counter.epochs == list(range(10))
    assert es.best_score == pytest.approx(BATCH_LOSS + 9)
    assert ckpt.monitor == "checkpoint_on"
    assert counter.saved_at == [0, 1, 2, 3, 6]
    assert ckpt.best_model_score == pytest.approx(BATCH_LOSS + 9)


class ValLoopResults(DeterministicModel):
    SCRIPT = [20, 19, 20, 21, 22, 23, 24, 25]

    def validation_step(self, batch, batch_idx):
        value = self.step(batch) + self.SCRIPT[self.current_epoch]
        return pl.EvalResult(early_stop_on=value, checkpoint_on=value)


def test_val_loop_early_stop_on_and_checkpoint_on(make_trainer):
    counter = EpochCounter()
    logger = RecordingLogger()
    trainer = make_trainer(max_epochs=8, early_stop_callback=True, enable_checkpointing=True,
                           callbacks=[counter], logger=logger)
    trainer.fit(ValLoopResults())
    es = trainer.early_stop_callback
    assert isinstance(es, EarlyStopping)
    assert es.monitor == "val_early_stop_on"
    assert counter.epochs == [0, 1, 2, 3, 4]
    assert counter.saved_at == [0, 1]
    assert float(trainer.callback_metrics["val_checkpoint_on"]) == BATCH_LOSS + 22
    assert trainer.progress_bar_metrics == {}
    assert logger.dicts() == [{"epoch": float(e)} for e in range(5)]


class ValCheckpointTrainEarlyStop(DeterministicModel):
    VAL = [20, 19, 21, 22, 23, 24, 25, 26]

    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        return pl.TrainResult(minimize=loss, early_stop_on=loss.detach())

    def validation_step(self, batch, batch_idx):
        return pl.EvalResult(checkpoint_on=self.step(batch) + self.VAL[self.current_epoch])


def test_val_checkpoint_with_train_early_stopping(make_trainer):
    counter = EpochCounter()
    trainer = make_trainer(max_epochs=8, early_stop_callback=True, enable_checkpointing=True,
                           callbacks=[counter])
    trainer.fit(ValCheckpointTrainEarlyStop())
    es = trainer.early_stop_callback
    # the train-loop early_stop_on is constant: no improvement after epoch 0, patience 3
    assert es.monitor == "early_stop_on"
    assert counter.epochs == [0, 1, 2, 3]
    assert es.stopped_epoch == 3
    assert trainer.checkpoint_callback.monitor == "val_checkpoint_on"
    assert counter.saved_at == [0, 1]
    assert float(trainer.callback_metrics["val_checkpoint_on"]) == BATCH_LOSS + 22


def test_early_stopping_state_dict_roundtrip():
    es = EarlyStopping(monitor="val_loss", patience=4)
    es.wait_count, es.stopped_epoch, es.best_score = 2, 7, 0.5
    other = EarlyStopping(monitor="val_loss")
    other.load_state_dict(es.state_dict())
    assert (other.wait_count, other.stopped_epoch, other.best_score, other.patience) == \
        (2, 7, 0.5, 4)
    assert torch.tensor(other.best_score).item() == 0.5
