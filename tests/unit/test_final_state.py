"""Rank 0's ``FinalState`` back onto the driver's Trainer: callbacks are matched by
``state_key``, never by position (a worker's list is reordered by ``configure_callbacks``).

The worker side (``worker.job.final_state``) and the driver side
(``driver.results.apply_final_state``) run here in one process, with the message pickled
between them as it travels."""

from __future__ import annotations

import cloudpickle
import torch
from doubles import DeterministicModel

from ray_lit.callbacks.base import Callback
from ray_lit.callbacks.early_stopping import EarlyStopping
from ray_lit.callbacks.model_checkpoint import ModelCheckpoint
from ray_lit.driver.results import apply_final_state
from ray_lit.messages import FinalState
from ray_lit.worker.job import final_state


class ConfiguresEarlyStopping(DeterministicModel):
    """Validation loss falls, then stays: patience runs out; ``configure_callbacks``
    replaces the Trainer's EarlyStopping (which then goes last on the worker)."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor([3.0, 2.0, 2.0, 2.0, 2.0, 2.0][self.current_epoch]))

    def configure_callbacks(self):
        return [EarlyStopping(monitor="val_loss", patience=1)]


def test_callback_state_comes_back_to_the_callback_it_belongs_to(make_trainer, tmp_path):
    def callbacks():
        return [EarlyStopping(monitor="val_loss", patience=1),
                ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss")]

    # what a worker runs: the module's EarlyStopping replaces the Trainer's and goes last
    worker_trainer = make_trainer(callbacks=callbacks(), max_epochs=6, limit_train_batches=1,
                                  limit_val_batches=1, num_sanity_val_steps=0,
                                  enable_checkpointing=True)
    model = ConfiguresEarlyStopping()
    worker_trainer.fit(model)
    kinds = [type(c).__name__ for c in worker_trainer.callbacks]
    assert kinds.index("ModelCheckpoint") < kinds.index("EarlyStopping")  # reordered
    sent = cloudpickle.loads(cloudpickle.dumps(final_state(worker_trainer._ctx, None)))
    assert isinstance(sent, FinalState)

    # the driver's Trainer still has the user's order: EarlyStopping first
    driver = make_trainer(callbacks=callbacks(), enable_checkpointing=True)
    apply_final_state(driver, ConfiguresEarlyStopping(), None, sent)
    stopping = next(c for c in driver.callbacks if isinstance(c, EarlyStopping))
    checkpoint = next(c for c in driver.callbacks if isinstance(c, ModelCheckpoint))
    assert stopping.stopped_epoch > 0 and stopping.best_score == 2.0
    assert not hasattr(stopping, "best_model_path")  # not ModelCheckpoint's state
    assert checkpoint.best_model_path.startswith(str(tmp_path / "ckpt"))
    assert not hasattr(checkpoint, "wait_count")  # not EarlyStopping's state
    assert driver.current_epoch == worker_trainer.current_epoch


def test_a_final_state_pickles_without_the_trainer_or_module(make_trainer) -> None:
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(DeterministicModel())
    state = final_state(trainer._ctx, None)
    blob = cloudpickle.dumps(state)
    assert b"LightningModule" not in blob and len(blob) < 50_000
    assert set(state.state_dict) == set(trainer.lightning_module.state_dict())


def test_a_callback_whose_class_is_pickled_by_value_still_gets_its_state(make_trainer):
    """A callback class defined in a function (or in ``__main__``) travels by value, and the
    copy's class loses its ``__qualname__``: the state comes back by the driver's tag."""
    from ray_lit.driver.launch import run_spec

    class StartStep(Callback):
        start_step = None

        def on_train_start(self, trainer, pl_module):
            self.start_step = trainer.global_step + 100

    probe = StartStep()
    driver = make_trainer(callbacks=[probe])
    shipped = cloudpickle.loads(cloudpickle.dumps(run_spec(driver).callbacks))[0]
    # in a Ray worker the class arrives rebuilt, named "StartStep" only (in this process
    # cloudpickle hands back the original class, so the rebuilt one is made by hand)
    rebuilt = type("StartStep", (StartStep,), {})
    on_worker = rebuilt.__new__(rebuilt)
    on_worker.__dict__.update(shipped.__dict__)
    assert on_worker.state_key != probe.state_key  # what broke the match
    worker = make_trainer(callbacks=[on_worker], max_epochs=1, limit_train_batches=2,
                          num_sanity_val_steps=0)
    worker.fit(DeterministicModel())
    apply_final_state(driver, DeterministicModel(), None,
                      cloudpickle.loads(cloudpickle.dumps(final_state(worker._ctx, None))))
    assert probe.start_step == 100
