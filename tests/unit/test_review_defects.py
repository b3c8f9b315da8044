"""The smaller defects of the design review (REVIEW.md section 5), each pinned as behaviour."""

from __future__ import annotations

import pytest
from doubles import DeterministicModel

import ray_lit as pl
from ray_lit.errors import MisconfigurationException


def test_test_with_ckpt_path_last_and_no_checkpoint_uses_the_current_weights(make_trainer):
    """5.2: ``trainer.test(model, ckpt_path="last")`` with no last checkpoint warned, then
    crashed loading None; it now warns and tests the weights as they are."""
    class Tested(DeterministicModel):
        def test_step(self, batch, batch_idx):
            self.log("test_loss", self.step(batch))

    model = Tested()
    trainer = make_trainer(limit_test_batches=2)
    with pytest.warns(UserWarning, match="no checkpoint was saved"):
        results = trainer.test(model, ckpt_path="last", verbose=False)
    assert len(results) == 1 and "test_loss" in results[0]


@pytest.mark.parametrize("name", ["train_dataloaders", "val_dataloaders"])
def test_dataloaders_given_to_the_trainer_are_refused_not_dropped(name):
    """5.3: ``Trainer(train_dataloaders=dl)`` was silently dropped."""
    with pytest.raises(MisconfigurationException, match=rf"{name}=.*trainer.fit"):
        pl.Trainer(**{name: [1, 2, 3]})


@pytest.mark.parametrize("options, match", [
    ({"accelerator": "cpu", "use_gpu": True}, "exclude each other"),
    ({"keep_checkpoints": 0}, "keep_checkpoints=0"),
    ({"keep_checkpoints": True}, "keep_checkpoints=True"),
    ({"checkpoint_every_n_steps": True}, "checkpoint_every_n_steps=True"),
    ({"checkpoint_every_n_steps": 2.5}, "checkpoint_every_n_steps=2.5"),
    ({"resume": 3}, "resume=3"),
])
def test_options_the_review_found_unchecked_are_validated_once(options, match):
    """5.10: these went unchecked, were clamped silently, or trained on CUDA in process."""
    with pytest.raises(MisconfigurationException, match=match):
        pl.Trainer(**options)


def test_tune_settings_are_a_typed_internal_config_field_not_a_user_option():
    """5.12: Tune planted private attributes on the Trainer; they are one ``TuneSpec`` in the
    config now (shipped to the workers with it), and not a Trainer option."""
    import dataclasses

    from ray_lit.config import TuneSpec

    with pytest.raises(MisconfigurationException, match="unknown option 'tune'"):
        pl.Trainer(tune=TuneSpec("/tmp/reports"))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False)
    assert trainer.config.tune is None
    trainer.config = dataclasses.replace(trainer.config, tune=TuneSpec("/tmp/r", print))
    assert trainer._driver_sink().report_fn is print


def test_pbt_restore_keeps_the_configured_learning_rate(make_trainer, tmp_path):
    """With ``TuneSpec(restore_lr_from_config=True)`` a restored optimizer keeps the learning
    rate its new config set (PBT exploit); otherwise the checkpoint's comes back."""
    import dataclasses

    import torch

    from ray_lit.config import TuneSpec

    class WithLr(DeterministicModel):
        def __init__(self, lr):
            super().__init__()
            self.lr = lr

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    trainer = make_trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(WithLr(0.1))
    path = str(tmp_path / "pbt.ckpt")
    trainer.save_checkpoint(path)
    for from_config, expected in ((True, 0.5), (False, 0.1)):
        resumed = make_trainer(max_epochs=2, limit_train_batches=2, num_sanity_val_steps=0)
        resumed.config = dataclasses.replace(resumed.config, tune=TuneSpec(
            str(tmp_path), restore_lr_from_config=from_config))
        resumed.fit(WithLr(0.5), ckpt_path=path)
        assert resumed.optimizers[0].param_groups[0]["lr"] == expected
