"""Trainer options of the Lightning era (spec §3.1-3.3, §5, §6 test_trainer / test_dataloaders,
§7.12)."""

from __future__ import annotations

import os

import pytest
import torch
from doubles import BATCH_LOSS, DeterministicModel, RecordingLogger, constant_loader
from torch.utils.data import DataLoader, Dataset

import ray_lit as pl
from ray_lit.callbacks.model_checkpoint import ModelCheckpoint


class Counting(DeterministicModel):
    """Counts training / validation / test steps (sanity-check validation separately)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.train_steps = []
        self.val_steps = []
        self.sanity_steps = 0
        self.test_steps = 0
        self.val_after = []  # training batches done when each real validation run started

    def training_step(self, batch, batch_idx):
        self.train_steps.append((self.current_epoch, batch_idx))
        return self.step(batch)

    def validation_step(self, batch, batch_idx):
        if self.trainer.sanity_checking:
            self.sanity_steps += 1
        else:
            if batch_idx == 0:
                self.val_after.append(len(self.train_steps))
            self.val_steps.append(batch_idx)
        self.log("val_loss", self.step(batch))

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self.test_steps += 1
        self.log("test_loss", self.step(batch))


def test_fit_returns_one(make_trainer):
    assert make_trainer().fit(Counting()) == 1


def test_max_steps_overrides_max_epochs(make_trainer):
    model = Counting()
    trainer = make_trainer(max_steps=5, max_epochs=10)
    trainer.fit(model)
    assert trainer.global_step == 5
    assert model.train_steps == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]


def test_max_epochs(make_trainer):
    model = Counting()
    trainer = make_trainer(max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(model)
    assert trainer.global_step == 12
    assert len(model.train_steps) == 12
    assert model.val_after == [4, 8, 12]


def test_min_epochs_keeps_training_after_a_stop_request(make_trainer):
    class StopAtOnce(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    model = Counting()
    make_trainer(max_epochs=10, min_epochs=3, callbacks=[StopAtOnce()]).fit(model)
    assert sorted({e for e, _ in model.train_steps}) == [0, 1, 2]


@pytest.mark.parametrize("limit, batches", [(2, 2), (1, 1), (0.5, 2), (0.25, 1), (1.0, 4)])
def test_limit_train_batches(make_trainer, limit, batches):
    model = Counting()
    trainer = make_trainer(limit_train_batches=limit, num_sanity_val_steps=0)
    trainer.fit(model)
    assert trainer.num_training_batches == batches
    assert [b for _, b in model.train_steps] == list(range(batches))


@pytest.mark.parametrize("limit, batches", [(1, 1), (3, 3), (0.5, 2), (1.0, 4)])
def test_limit_val_batches(make_trainer, limit, batches):
    model = Counting()
    make_trainer(limit_val_batches=limit, num_sanity_val_steps=0).fit(model)
    assert model.val_steps == list(range(batches))


def test_limit_val_batches_zero_disables_validation(make_trainer):
    ends = []

    class End(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            ends.append(trainer.current_epoch)

    model = Counting()
    make_trainer(limit_val_batches=0, max_epochs=2, callbacks=[End()]).fit(model)
    assert model.val_steps == [] and model.sanity_steps == 0
    assert ends == []


def test_limit_fraction_leaving_no_batch_raises(make_trainer):
    with pytest.raises(pl.MisconfigurationException, match="limit_val_batches"):
        make_trainer(limit_val_batches=0.1).fit(Counting())


@pytest.mark.parametrize("value", [1.5, -1, -0.5, "all"])
def test_bad_limit_values_raise_at_init(make_trainer, value):
    with pytest.raises(pl.MisconfigurationException, match="limit_train_batches"):
        make_trainer(limit_train_batches=value)


def test_limit_test_batches(make_trainer):
    model = Counting()
    results = make_trainer(limit_test_batches=2).test(model)
    assert model.test_steps == 2
    assert results == [{"test_loss": BATCH_LOSS}]


@pytest.mark.parametrize("interval, after", [
    (2, [2, 4, 6, 8]),
    (0.5, [2, 4, 6, 8]),
    (0.25, [1, 2, 3, 4, 5, 6, 7, 8]),
    (1.0, [4, 8]),
    (4, [4, 8]),
])
def test_val_check_interval(make_trainer, interval, after):
    model = Counting()
    make_trainer(max_epochs=2, val_check_interval=interval, num_sanity_val_steps=0,
                 limit_val_batches=1).fit(model)
    assert model.val_after == after


def test_val_check_interval_larger_than_epoch_raises(make_trainer):
    with pytest.raises((pl.MisconfigurationException, ValueError)):
        make_trainer(val_check_interval=5).fit(Counting())


def test_check_val_every_n_epoch(make_trainer):
    model = Counting()
    make_trainer(max_epochs=4, check_val_every_n_epoch=2, num_sanity_val_steps=0,
                 limit_val_batches=1).fit(model)
    assert model.val_after == [8, 16]


@pytest.mark.parametrize("steps, expected", [(None, 2), (2, 2), (1, 1), (-1, 4), (0, 0)])
def test_num_sanity_val_steps(make_trainer, steps, expected):
    model = Counting()
    options = {} if steps is None else {"num_sanity_val_steps": steps}
    logger = RecordingLogger()
    make_trainer(logger=logger, **options).fit(model)
    # DECISION (spec §3.3): the documented default of 2 batches, capped by the val batches
    assert model.sanity_steps == expected
    # sanity metrics are not logged: one val_loss dict for the one real validation
    assert len(logger.with_key("val_loss")) == 1


def test_num_sanity_val_steps_capped_by_limit(make_trainer):
    model = Counting()
    make_trainer(limit_val_batches=1).fit(model)
    assert model.sanity_steps == 1
    model = Counting()
    make_trainer(limit_val_batches=1, num_sanity_val_steps=-1).fit(model)
    assert model.sanity_steps == 1


def test_fast_dev_run(make_trainer, tmp_path):
    model = Counting()
    trainer = make_trainer(fast_dev_run=True, max_epochs=5, enable_checkpointing=True,
                           limit_val_batches=0)
    trainer.fit(model)
    assert model.train_steps == [(0, 0)]
    assert model.val_steps == [0] and model.sanity_steps == 0
    # no checkpoint is written in a dev run
    written = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".ckpt")]
    assert written == []


def test_fast_dev_run_int(make_trainer):
    model = Counting()
    make_trainer(fast_dev_run=2, max_epochs=5).fit(model)
    assert model.train_steps == [(0, 0), (0, 1)]
    assert model.val_steps == [0, 1]


class IndexDataset(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, idx):
        return torch.ones(2), torch.tensor(float(idx))


def test_overfit_batches_uses_train_data_sequentially(make_trainer):
    seen_val = []
    seen_train = []

    class Overfit(DeterministicModel):
        def training_step(self, batch, batch_idx):
            seen_train.append(batch_idx)
            return self.step(batch)

        def validation_step(self, batch, batch_idx):
            if not self.trainer.sanity_checking:
                seen_val.append(batch[1].tolist())

    torch.manual_seed(0)
    train = DataLoader(IndexDataset(), batch_size=3, shuffle=True)
    other_val = constant_loader(30, 5)
    make_trainer(overfit_batches=2, num_sanity_val_steps=0).fit(Overfit(), train, other_val)
    assert seen_train == [0, 1]
    assert seen_val == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_overfit_batches_fraction(make_trainer):
    model = Counting()
    trainer = make_trainer(overfit_batches=0.5, num_sanity_val_steps=0)
    trainer.fit(model)
    assert [b for _, b in model.train_steps] == [0, 1]
    assert model.val_steps == [0, 1]


def test_loaders_passed_to_fit_and_test(make_trainer):
    model = Counting()
    trainer = make_trainer(num_sanity_val_steps=0)
    trainer.fit(model, constant_loader(6, 3), constant_loader(3, 3))
    assert [b for _, b in model.train_steps] == [0, 1]
    assert model.val_steps == [0]
    results = trainer.test(model, test_dataloaders=[constant_loader(3, 3),
                                                    constant_loader(6, 3)])
    assert results == [{"test_loss/dataloader_idx_0": BATCH_LOSS},
                       {"test_loss/dataloader_idx_1": BATCH_LOSS}]
    assert model.test_steps == 3
    # the 2.x keyword works too
    trainer = make_trainer(num_sanity_val_steps=0)
    trainer.fit(Counting(), train_dataloaders=constant_loader(3, 3))
    assert trainer.num_training_batches == 1


def test_checkpoint_callback_alias_disables_checkpointing(make_trainer):
    trainer = make_trainer(checkpoint_callback=False)
    assert trainer.checkpoint_callback is None
    trainer = make_trainer(enable_checkpointing=True)
    assert isinstance(trainer.checkpoint_callback, ModelCheckpoint)


def test_row_log_interval_alias(make_trainer):
    class Logs(DeterministicModel):
        def training_step(self, batch, batch_idx):
            self.log("x", float(batch_idx))
            return self.step(batch)

    logger = RecordingLogger()
    make_trainer(row_log_interval=2, logger=logger).fit(Logs())
    assert [m["x"] for m in logger.dicts() if "x" in m] == [1.0, 3.0]
