"""Bad input fails fast with one ``MisconfigurationException`` naming the offending thing
(API.md §6; spec §1.9, §2.1, §3.6)."""

from __future__ import annotations

import pytest
import torch
from doubles import DeterministicModel, constant_loader

import ray_lit as pl


class NoTrainingStep(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return constant_loader()


def test_missing_training_step(make_trainer):
    with pytest.raises(pl.MisconfigurationException, match="training_step"):
        make_trainer().fit(NoTrainingStep())


def test_missing_configure_optimizers(make_trainer):
    class NoOptimizers(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def train_dataloader(self):
            return constant_loader()

    with pytest.raises(pl.MisconfigurationException, match="configure_optimizers"):
        make_trainer().fit(NoOptimizers())


def test_not_a_lightning_module(make_trainer):
    with pytest.raises(pl.MisconfigurationException, match="LightningModule"):
        make_trainer().fit(torch.nn.Linear(2, 2))


def test_configure_optimizers_returning_a_string(make_trainer):
    class StringOptimizer(DeterministicModel):
        def configure_optimizers(self):
            return "adam"

    with pytest.raises(pl.MisconfigurationException, match="configure_optimizers") as err:
        make_trainer().fit(StringOptimizer())
    assert "adam" in str(err.value)


def test_optimizer_dict_without_optimizer_key(make_trainer):
    class NoKey(DeterministicModel):
        def configure_optimizers(self):
            return {"lr_scheduler": None}

    with pytest.raises(pl.MisconfigurationException, match="optimizer"):
        make_trainer().fit(NoKey())


def test_scheduler_dict_bad_interval(make_trainer):
    class BadInterval(DeterministicModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.0)
            sched = torch.optim.lr_scheduler.StepLR(opt, 1)
            return [opt], [{"scheduler": sched, "interval": "fortnight"}]

    with pytest.raises(pl.MisconfigurationException, match="interval"):
        make_trainer().fit(BadInterval())


def test_training_step_dict_without_loss(make_trainer):
    class NoLoss(DeterministicModel):
        def training_step(self, batch, batch_idx):
            return {"not_the_loss": self.step(batch)}

    with pytest.raises(pl.MisconfigurationException, match="loss") as err:
        make_trainer().fit(NoLoss())
    assert "not_the_loss" in str(err.value)


def test_training_step_returning_garbage(make_trainer):
    class Garbage(DeterministicModel):
        def training_step(self, batch, batch_idx):
            return "loss"

    with pytest.raises(pl.MisconfigurationException, match="training_step"):
        make_trainer().fit(Garbage())


def test_logging_a_non_scalar_tensor(make_trainer):
    class Vector(DeterministicModel):
        def training_step(self, batch, batch_idx):
            self.log("my_vector", torch.ones(3))
            return self.step(batch)

    with pytest.raises(pl.MisconfigurationException, match="my_vector"):
        make_trainer().fit(Vector())


def test_logging_a_dict_value(make_trainer):
    class Nested(DeterministicModel):
        def training_step(self, batch, batch_idx):
            self.log("nested", {"a": 1.0})
            return self.step(batch)

    with pytest.raises(pl.MisconfigurationException, match="nested"):
        make_trainer().fit(Nested())


def test_logging_a_reserved_dataloader_suffix(make_trainer):
    class Reserved(DeterministicModel):
        def training_step(self, batch, batch_idx):
            self.log("x/dataloader_idx_0", 1.0)
            return self.step(batch)

    with pytest.raises(pl.MisconfigurationException, match="dataloader_idx"):
        make_trainer().fit(Reserved())


def test_unknown_trainer_option_with_suggestion():
    with pytest.raises(pl.MisconfigurationException, match="max_epoch") as err:
        pl.Trainer(max_epoch=3)
    assert "max_epochs" in str(err.value)


def test_unknown_trainer_option_without_close_match():
    with pytest.raises(pl.MisconfigurationException, match="zzz_not_an_option"):
        pl.Trainer(zzz_not_an_option=1)


@pytest.mark.parametrize("options, name", [
    ({"max_epochs": -1}, "max_epochs"),
    ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ({"num_sanity_val_steps": -2}, "num_sanity_val_steps"),
    ({"val_check_interval": 1.5}, "val_check_interval"),
    ({"gradient_clip_algorithm": "median"}, "gradient_clip_algorithm"),
    ({"precision": 8}, "precision"),
    ({"truncated_bptt_steps": 2}, "truncated_bptt_steps"),
    ({"accelerator": "abacus"}, "accelerator"),
])
def test_bad_option_values(options, name):
    with pytest.raises(pl.MisconfigurationException, match=name):
        pl.Trainer(**options)


def test_loaders_and_datamodule_together(make_trainer):
    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return constant_loader()

    with pytest.raises(pl.MisconfigurationException, match="datamodule"):
        make_trainer().fit(DeterministicModel(), constant_loader(), datamodule=DM())


def test_checkpoint_callback_with_checkpointing_disabled(tmp_path):
    from ray_lit.callbacks.model_checkpoint import ModelCheckpoint

    with pytest.raises(pl.MisconfigurationException, match="enable_checkpointing"):
        pl.Trainer(enable_checkpointing=False, callbacks=[ModelCheckpoint()],
                   default_root_dir=str(tmp_path), logger=False)


def test_validate_without_validation_step(make_trainer):
    with pytest.raises(pl.MisconfigurationException, match="validation_step"):
        make_trainer().validate(DeterministicModel())


def test_test_without_a_model(make_trainer):
    with pytest.raises(pl.MisconfigurationException, match="model"):
        make_trainer().test()


def test_several_optimizers_need_optimizer_idx(make_trainer):
    class TwoOpts(DeterministicModel):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.parameters(), lr=0.0),
                    torch.optim.SGD(self.parameters(), lr=0.0)]

    # spec §3.6: training_step must accept optimizer_idx with several optimizers
    with pytest.raises((pl.MisconfigurationException, ValueError), match="optimizer_idx"):
        make_trainer().fit(TwoOpts())
