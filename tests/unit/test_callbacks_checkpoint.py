"""``ModelCheckpoint``: top-k file sets, file names, ``save_last``, default directory and the
0.9 monitor switch to ``checkpoint_on`` / ``val_checkpoint_on`` (spec §1.7, §4.5, §6
test_model_checkpoint / test_trainer.py::test_model_checkpoint_options, §7.15)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from doubles import BATCH_LOSS, DeterministicModel, RecordingLogger

import ray_lit as pl
from ray_lit.callbacks.model_checkpoint import ModelCheckpoint

LOSSES = [10.0, 9.0, 2.8, 5.0, 2.5]


class ScriptedValLoss(DeterministicModel):
    def __init__(self, losses=LOSSES):
        super().__init__()
        self.losses = losses

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.losses[self.current_epoch])


class FileSets(pl.Callback):
    """Records the checkpoint files present at each epoch end (after that epoch's validation
    and its checkpoint: checkpoint callbacks run last, as in 2.x)."""

    def __init__(self, dirpath):
        self.dirpath = dirpath
        self.sets = []

    def on_train_epoch_end(self, trainer, pl_module):
        files = os.listdir(self.dirpath) if os.path.isdir(self.dirpath) else []
        self.sets.append(sorted(files))


def _run(make_trainer, tmp_path, model=None, **ckpt_kwargs):
    dirpath = str(tmp_path / "ckpts")
    ckpt_kwargs.setdefault("monitor", "val_loss")
    ckpt_kwargs.setdefault("filename", "{epoch}")
    ckpt = ModelCheckpoint(dirpath=dirpath, **ckpt_kwargs)
    sets = FileSets(dirpath)
    model = model or ScriptedValLoss()
    trainer = make_trainer(max_epochs=len(model.losses), callbacks=[ckpt, sets],
                           enable_checkpointing=True, logger=RecordingLogger(),
                           num_sanity_val_steps=0)
    trainer.fit(model)
    files = sorted(os.listdir(dirpath)) if os.path.isdir(dirpath) else []
    return trainer, ckpt, sets.sets, files


def _names(epochs):
    return sorted(f"epoch={e}.ckpt" for e in epochs)


@pytest.mark.parametrize("k, expected", [
    (-1, [0, 1, 2, 3, 4]),
    (0, []),
    (1, [4]),
    (2, [2, 4]),
    (3, [2, 3, 4]),
])
def test_top_k_file_sets(make_trainer, tmp_path, k, expected):
    _, ckpt, _, files = _run(make_trainer, tmp_path, save_top_k=k)
    assert files == _names(expected)


@pytest.mark.parametrize("k, expected", [(-1, [0, 1, 2, 3, 4]), (1, [4])])
def test_without_a_monitor_top_k_minus_one_keeps_every_file(make_trainer, tmp_path, k, expected):
    """2.x: ``monitor=None`` keeps only the latest file with ``save_top_k=1`` and every file
    with -1; the latest is the best either way."""
    _, ckpt, _, files = _run(make_trainer, tmp_path, monitor=None, save_top_k=k)
    assert files == _names(expected)
    assert os.path.basename(ckpt.best_model_path) == "epoch=4.ckpt"


def test_top_2_after_every_epoch(make_trainer, tmp_path):
    _, ckpt, sets, _ = _run(make_trainer, tmp_path, save_top_k=2)
    assert sets == [_names([0]), _names([0, 1]), _names([1, 2]), _names([2, 3]),
                    _names([2, 4])]
    assert os.path.basename(ckpt.best_model_path) == "epoch=4.ckpt"
    assert ckpt.best_model_score == pytest.approx(2.5)
    assert os.path.basename(ckpt.kth_best_model_path) == "epoch=2.ckpt"
    assert sorted(ckpt.best_k_models.values()) == [pytest.approx(2.5), pytest.approx(2.8)]


def test_mode_max(make_trainer, tmp_path):
    _, ckpt, _, files = _run(make_trainer, tmp_path, save_top_k=2, mode="max")
    assert files == _names([0, 1])
    assert ckpt.best_model_score == pytest.approx(10.0)


def test_filename_template_with_metric(make_trainer, tmp_path):
    _, _, _, files = _run(make_trainer, tmp_path, save_top_k=-1,
                          filename="{epoch}-{val_loss:.2f}")
    assert files == sorted(["epoch=0-val_loss=10.00.ckpt", "epoch=1-val_loss=9.00.ckpt",
                            "epoch=2-val_loss=2.80.ckpt", "epoch=3-val_loss=5.00.ckpt",
                            "epoch=4-val_loss=2.50.ckpt"])


def test_format_checkpoint_name():
    ckpt = ModelCheckpoint(filename="{epoch}-{val_loss:.2f}")
    assert ckpt.format_checkpoint_name(3, 12, {"val_loss": torch.tensor(0.123)}) == \
        "epoch=3-val_loss=0.12.ckpt"
    # a metric that is not available formats as 0
    assert ckpt.format_checkpoint_name(3, 12, {}) == "epoch=3-val_loss=0.00.ckpt"


def test_save_last(make_trainer, tmp_path):
    from ray_lit.storage.checkpoint_io import load_checkpoint

    trainer, ckpt, _, files = _run(make_trainer, tmp_path, save_top_k=1, save_last=True)
    assert files == sorted(["epoch=4.ckpt", "last.ckpt"])
    assert os.path.basename(ckpt.last_model_path) == "last.ckpt"
    last = load_checkpoint(ckpt.last_model_path, map_location="cpu")
    assert last["epoch"] == 4
    assert last["global_step"] == 20
    for key in ("state_dict", "optimizer_states", "lr_schedulers",
                "checkpoint_callback_best_model_score", "checkpoint_callback_best_model_path"):
        assert key in last, key
    assert torch.equal(last["state_dict"]["l1.weight"], trainer.lightning_module.l1.weight)


@pytest.mark.parametrize("version, folder", [(0, "version_0"), (1, "version_1"),
                                             ("awesome", "awesome")])
def test_default_dirpath_from_logger(make_trainer, tmp_path, version, folder):
    ckpt = ModelCheckpoint(monitor="val_loss")
    trainer = make_trainer(max_epochs=1, callbacks=[ckpt], enable_checkpointing=True,
                           logger=RecordingLogger(name="lightning_logs", version=version))
    trainer.fit(ScriptedValLoss())
    expected = os.path.join(str(tmp_path), "lightning_logs", folder, "checkpoints")
    assert os.path.normpath(ckpt.dirpath) == os.path.normpath(expected)
    assert len(os.listdir(expected)) == 1


def test_default_dirpath_without_logger(make_trainer, tmp_path):
    ckpt = ModelCheckpoint(monitor="val_loss")
    make_trainer(callbacks=[ckpt], enable_checkpointing=True, logger=False).fit(
        ScriptedValLoss())
    assert os.path.normpath(ckpt.dirpath) == os.path.normpath(str(tmp_path / "checkpoints"))


def test_no_checkpoint_during_sanity_check(make_trainer, tmp_path):
    dirpath = str(tmp_path / "ckpts")
    ckpt = ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=-1,
                           filename="{epoch}")
    make_trainer(max_epochs=2, callbacks=[ckpt], enable_checkpointing=True,
                 num_sanity_val_steps=2).fit(ScriptedValLoss())
    assert sorted(os.listdir(dirpath)) == _names([0, 1])


class TrainOnlyResult(DeterministicModel):
    def training_step(self, batch, batch_idx):
        return pl.TrainResult(minimize=self.step(batch))


def test_train_only_result_monitors_checkpoint_on(make_trainer, tmp_path):
    trainer = make_trainer(max_epochs=2, enable_checkpointing=True,
                           logger=RecordingLogger())
    trainer.fit(TrainOnlyResult())
    ckpt = trainer.checkpoint_callback
    assert isinstance(ckpt, ModelCheckpoint)
    assert ckpt.monitor == "checkpoint_on"
    assert ckpt.best_model_score == pytest.approx(BATCH_LOSS)
    assert os.path.isfile(ckpt.best_model_path)


class ValResult(DeterministicModel):
    def validation_step(self, batch, batch_idx):
        return pl.EvalResult(checkpoint_on=self.step(batch))


def test_eval_result_monitors_val_checkpoint_on(make_trainer, tmp_path):
    trainer = make_trainer(max_epochs=1, enable_checkpointing=True,
                           logger=RecordingLogger())
    trainer.fit(ValResult())
    ckpt = trainer.checkpoint_callback
    assert ckpt.monitor == "val_checkpoint_on"
    assert ckpt.best_model_score == pytest.approx(BATCH_LOSS)


def test_missing_monitor_raises_with_available_keys(make_trainer, tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), monitor="not_logged")
    with pytest.raises(pl.MisconfigurationException) as err:
        make_trainer(callbacks=[ckpt], enable_checkpointing=True).fit(ScriptedValLoss())
    assert "not_logged" in str(err.value) and "val_loss" in str(err.value)


def test_checkpoint_callback_is_picklable():
    ckpt = ModelCheckpoint(monitor="val_loss", save_top_k=2)
    restored = pickle.loads(pickle.dumps(ckpt))
    assert restored.monitor == "val_loss" and restored.save_top_k == 2


def test_test_after_fit_uses_best_checkpoint(make_trainer, tmp_path):
    class Tested(ScriptedValLoss):
        def test_step(self, batch, batch_idx):
            self.log("test_loss", self.step(batch))

    trainer, ckpt, _, _ = _run(make_trainer, tmp_path, model=Tested(), save_top_k=1)
    results = trainer.test()  # model omitted: ckpt_path='best'
    assert trainer.tested_ckpt_path == ckpt.best_model_path
    assert os.path.basename(ckpt.best_model_path) == "epoch=4.ckpt"
    assert results == [{"test_loss": BATCH_LOSS}]
