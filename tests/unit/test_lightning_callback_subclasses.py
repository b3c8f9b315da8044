"""Subclasses of the REAL Lightning 2.6 built-in callbacks run on ray_lit's twins, in process:
ModelCheckpoint overriding ``on_validation_end`` or ``format_checkpoint_name``, EarlyStopping
overriding ``on_train_epoch_end`` (and the docs' ``_run_early_stopping_check`` idiom),
LearningRateMonitor and TQDMProgressBar. Each outcome is compared with real Lightning's own
Trainer running the same subclass; what cannot work is refused by name."""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
from ray_lit.errors import MisconfigurationException

L = pytest.importorskip("lightning.pytorch")  # the dev extra installs it
from lightning.pytorch import callbacks as lc  # noqa: E402


class Regression(L.LightningModule):
    """val_loss falls for a few epochs, then flattens (a tiny lr on a linear target)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.layer(x).squeeze(-1), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.layer(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader() -> DataLoader:
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=16)


QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False,
             num_sanity_val_steps=0)


def _both(make_callbacks, tmp_path, max_epochs=4, lr=0.05):
    """Run real Lightning and ray_lit on the same module and fresh callbacks; return
    ``(lightning_callbacks, lightning_trainer, ray_lit_callbacks, ray_lit_trainer)``."""
    torch.manual_seed(0)
    ref_callbacks = make_callbacks(tmp_path / "lightning")
    ref = L.Trainer(max_epochs=max_epochs, callbacks=list(ref_callbacks), accelerator="cpu",
                    devices=1, default_root_dir=str(tmp_path / "lightning"), **QUIET)
    ref.fit(Regression(lr), _loader(), _loader())
    torch.manual_seed(0)
    ours_callbacks = make_callbacks(tmp_path / "ray_lit")
    ours = ray_lit.Trainer(max_epochs=max_epochs, callbacks=list(ours_callbacks),
                           default_root_dir=str(tmp_path / "ray_lit"), **QUIET)
    ours.fit(Regression(lr), _loader(), _loader())
    return ref_callbacks, ref, ours_callbacks, ours


# --- ModelCheckpoint -----------------------------------------------------------------------------
class CountingCheckpoint(lc.ModelCheckpoint):
    """Overrides ``on_validation_end``: records each epoch it checked, then saves as usual."""

    def __init__(self, tag: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tag = tag
        self.checked: list[int] = []

    def on_validation_end(self, trainer, pl_module):
        self.checked.append(trainer.current_epoch)
        super().on_validation_end(trainer, pl_module)


def test_model_checkpoint_subclass_overriding_on_validation_end(tmp_path):
    def make(root):
        return [CountingCheckpoint("mine", dirpath=str(root / "ckpts"), monitor="val_loss",
                                   save_top_k=2, filename="{epoch}-{val_loss:.3f}")]

    (ref,), ref_trainer, (ours,), ours_trainer = _both(make, tmp_path)
    assert type(ours) is CountingCheckpoint  # the user's own instance, rebased underneath
    assert ours.tag == "mine" and ours.checked == ref.checked == [0, 1, 2, 3]
    # the same files as real Lightning's run, and the results on the user's instance
    assert sorted(os.listdir(tmp_path / "ray_lit" / "ckpts")) == \
        sorted(os.listdir(tmp_path / "lightning" / "ckpts"))
    assert os.path.basename(ours.best_model_path) == os.path.basename(ref.best_model_path)
    assert ours.best_model_score == pytest.approx(float(ref.best_model_score), rel=1e-5)
    assert ours_trainer.checkpoint_callback is not None
    assert ours_trainer.checkpoint_callback.best_model_path == ours.best_model_path


class RenamingCheckpoint(lc.ModelCheckpoint):
    """Overrides ``format_checkpoint_name`` with Lightning's signature, calling super()."""

    def format_checkpoint_name(self, metrics, filename=None, ver=None, prefix=None):
        path = super().format_checkpoint_name(metrics, filename, ver, prefix)
        head, name = os.path.split(path)
        return os.path.join(head, f"run-{int(metrics['epoch'])}-{name}")


def test_model_checkpoint_subclass_overriding_format_checkpoint_name(tmp_path):
    def make(root):
        return [RenamingCheckpoint(dirpath=str(root / "ckpts"), save_top_k=-1,
                                   monitor="val_loss", filename="{epoch}-{step}",
                                   save_last=True)]

    (ref,), _, (ours,), _ = _both(make, tmp_path, max_epochs=2)
    files = sorted(os.listdir(tmp_path / "ray_lit" / "ckpts"))
    # last.ckpt is named through the override too (the previous epoch's was removed)
    assert files == ["run-0-epoch=0-step=2.ckpt", "run-1-epoch=1-step=4.ckpt",
                     "run-1-last.ckpt"]
    assert files == sorted(os.listdir(tmp_path / "lightning" / "ckpts"))
    # called the Lightning way from outside too: the path under dirpath
    assert ours.format_checkpoint_name({"epoch": 7, "step": 9}) == \
        os.path.join(ours.dirpath, "run-7-epoch=7-step=9.ckpt")
    assert ours.format_checkpoint_name({"epoch": 7, "step": 9}, ver=2) == \
        ref.format_checkpoint_name({"epoch": 7, "step": 9}, ver=2).replace(
            str(tmp_path / "lightning"), str(tmp_path / "ray_lit"))


# --- EarlyStopping -------------------------------------------------------------------------------
class EpochEndStopping(lc.EarlyStopping):
    """Overrides ``on_train_epoch_end``: notes the epochs, then checks as Lightning does."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(trainer.current_epoch)
        super().on_train_epoch_end(trainer, pl_module)


def test_early_stopping_subclass_overriding_on_train_epoch_end(tmp_path):
    def make(root):
        # the train metric, checked at the epoch end; tiny lr: it plateaus within min_delta
        return [EpochEndStopping(monitor="train_loss_epoch", patience=2, min_delta=0.5,
                                 check_on_train_epoch_end=True)]

    (ref,), ref_trainer, (ours,), ours_trainer = _both(make, tmp_path, max_epochs=20,
                                                        lr=0.001)
    assert ref_trainer.current_epoch < 20  # real Lightning stopped early
    assert ours.seen == ref.seen and ours_trainer.current_epoch == ref_trainer.current_epoch
    assert ours.stopped_epoch == ref.stopped_epoch and ours.wait_count == ref.wait_count
    assert ours.min_delta == abs(float(ref.min_delta)) == 0.5


class EndOfTrainingStopping(lc.EarlyStopping):
    """Lightning's docs idiom: no check after validation, one at the end of training."""

    def on_validation_end(self, trainer, pl_module):
        pass

    def on_train_end(self, trainer, pl_module):
        self._run_early_stopping_check(trainer)


def test_early_stopping_docs_idiom_uses_lightnings_check_name(tmp_path):
    def make(root):
        return [EndOfTrainingStopping(monitor="val_loss", patience=1)]

    (ref,), ref_trainer, (ours,), ours_trainer = _both(make, tmp_path, max_epochs=3)
    assert ours_trainer.current_epoch == ref_trainer.current_epoch == 3  # never stopped early
    assert ours.best_score == pytest.approx(float(ref.best_score), rel=1e-5)
    assert ours.monitor_op is torch.lt


# --- LearningRateMonitor and TQDMProgressBar ----------------------------------------------------
class NamedLR(lc.LearningRateMonitor):
    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs_started = getattr(self, "epochs_started", 0) + 1
        super().on_train_epoch_start(trainer, pl_module)


class QuietBar(lc.TQDMProgressBar):
    pass


def test_lr_monitor_and_progress_bar_subclasses_run(tmp_path):
    from ray_lit.loggers import CSVLogger

    monitor = NamedLR(logging_interval="epoch")
    bar = QuietBar(refresh_rate=5, leave=True)
    trainer = ray_lit.Trainer(max_epochs=2, callbacks=[monitor, bar],
                              logger=CSVLogger(str(tmp_path)), enable_model_summary=False,
                              num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(Regression(), _loader())
    assert monitor.epochs_started == 2 and monitor.lrs == {"lr-SGD": [0.05, 0.05]}
    running = trainer.progress_bar_callback  # the rebased twin of the user's bar
    assert isinstance(running, QuietBar) and running.__dict__ is bar.__dict__
    assert bar.refresh_rate == 5 and bar.leave


# --- what cannot work is refused by name ---------------------------------------------------------
class PrivateSaving(lc.ModelCheckpoint):
    def on_train_epoch_end(self, trainer, pl_module):
        self._save_checkpoint(trainer, self.format_checkpoint_name({}))


class SkipRule(lc.ModelCheckpoint):
    def _should_skip_saving_checkpoint(self, trainer):
        return False


class TotalsBar(lc.TQDMProgressBar):
    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.total = self.total_train_batches  # Lightning's counters: not on ray_lit's bar
        return bar


def test_subclasses_using_what_ray_lit_lacks_are_refused_naming_it():
    with pytest.raises(MisconfigurationException,
                       match=r"PrivateSaving .*uses \['_save_checkpoint'\] of Lightning's "
                             r"ModelCheckpoint"):
        ray_lit.Trainer(callbacks=[PrivateSaving()])
    with pytest.raises(MisconfigurationException, match=r"_should_skip_saving_checkpoint"):
        ray_lit.Trainer(callbacks=[SkipRule()])
    with pytest.raises(MisconfigurationException, match=r"total_train_batches"):
        ray_lit.Trainer(callbacks=[TotalsBar()])
    with pytest.raises(MisconfigurationException,
                       match=r"ModelCheckpoint\(save_on_exception=True\).*does not support"):
        ray_lit.Trainer(callbacks=[CountingCheckpoint("x", save_on_exception=True)])
    with pytest.raises(MisconfigurationException, match=r"log_weight_decay=True"):
        ray_lit.Trainer(callbacks=[NamedLR(log_weight_decay=True)])


def test_a_rebased_callback_reused_by_a_second_trainer_keeps_its_state(tmp_path):
    checkpoint = CountingCheckpoint("reuse", dirpath=str(tmp_path), monitor="val_loss")
    first = ray_lit.Trainer(max_epochs=1, callbacks=[checkpoint], **QUIET)
    first.fit(Regression(), _loader(), _loader())
    best = checkpoint.best_model_path
    second = ray_lit.Trainer(max_epochs=1, callbacks=[checkpoint], **QUIET)
    assert second.checkpoint_callback.best_model_path == best == first.checkpoint_callback\
        .best_model_path
    assert checkpoint.checked == [0]


# --- Lightning's built-ins themselves ------------------------------------------------------------
def test_lightnings_own_built_in_callbacks_run_as_ray_lits_of_the_same_name(tmp_path):
    """``Trainer(callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(...), ...])`` trains
    as with Lightning: the files, the best model and the stop epoch are on the user's own
    instances after ``fit`` (they share their state with ray_lit's class of the same name)."""
    def make(root):
        return [lc.ModelCheckpoint(dirpath=str(root / "ckpts"), monitor="val_loss",
                                   save_top_k=2, filename="{epoch}-{val_loss:.3f}"),
                lc.EarlyStopping(monitor="val_loss", patience=1, min_delta=1.0)]

    (ref_ckpt, ref_es), ref_trainer, (ckpt, es), ours = _both(
        make, tmp_path, max_epochs=8)
    assert type(ckpt) is lc.ModelCheckpoint  # the user's object is untouched in kind
    assert sorted(os.listdir(tmp_path / "ray_lit" / "ckpts")) == \
        sorted(os.listdir(tmp_path / "lightning" / "ckpts"))
    assert os.path.basename(ckpt.best_model_path) == os.path.basename(ref_ckpt.best_model_path)
    assert ckpt.best_model_score == pytest.approx(float(ref_ckpt.best_model_score), rel=1e-5)
    assert es.stopped_epoch == ref_es.stopped_epoch > 0
    assert ours.current_epoch == ref_trainer.current_epoch
    assert ours.checkpoint_callback.best_model_path == ckpt.best_model_path


def test_a_lightning_built_in_without_a_twin_is_refused_naming_the_fix():
    with pytest.raises(MisconfigurationException, match="Timer"):
        ray_lit.Trainer(callbacks=[lc.Timer(duration="00:00:01:00")], logger=False)
