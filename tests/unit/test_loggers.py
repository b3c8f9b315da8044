"""Loggers: TensorBoard and CSV files read back, versioning, hparams, same-step aggregation."""

from __future__ import annotations

import csv
import os
import pickle
from argparse import Namespace

import cloudpickle
import pytest
import torch
import yaml
from doubles import AggregatingLogger

from ray_lit.loggers import CSVLogger, LightningLoggerBase, Logger, TensorBoardLogger
from ray_lit.loggers.base import _flatten_dict, _sanitize_params

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- base ------------------------------------------------------------------------------------
def test_0_9_alias():
    assert LightningLoggerBase is Logger


def test_agg_same_step_is_mean_and_flushed_on_step_change():
    logger = AggregatingLogger()
    logger.agg_and_log_metrics({"a": 1.0, "b": 10.0}, step=0)
    logger.agg_and_log_metrics({"a": 3.0}, step=0)
    assert logger.calls == []  # held until the step changes
    logger.agg_and_log_metrics({"a": 5.0}, step=1)
    assert logger.calls == [({"a": 2.0, "b": 10.0}, 0)]
    logger.finalize("success")
    assert logger.calls[-1] == ({"a": 5.0}, 1)


def test_agg_flushed_by_save_and_custom_funcs():
    logger = AggregatingLogger(agg_key_funcs={"n": max})
    logger.agg_and_log_metrics({"n": 1.0, "x": 2.0}, step=4)
    logger.agg_and_log_metrics({"n": 7.0, "x": 4.0}, step=4)
    logger.save()
    assert logger.calls == [({"n": 7.0, "x": 3.0}, 4)]
    logger.save()  # nothing pending: nothing logged twice
    assert len(logger.calls) == 1


def test_agg_works_without_super_init():
    class Bare(AggregatingLogger):
        def __init__(self):  # users forget super().__init__()
            self.calls = []

    logger = Bare()
    logger.agg_and_log_metrics({"a": 1.0}, 0)
    logger.agg_and_log_metrics({"a": 2.0}, 1)
    logger.finalize("success")
    assert logger.calls == [({"a": 1.0}, 0), ({"a": 2.0}, 1)]


def test_finalize_flushes_even_if_save_is_overridden():
    class OwnSave(AggregatingLogger):
        def save(self):  # no super().save()
            pass

    logger = OwnSave()
    logger.agg_and_log_metrics({"a": 1.0}, step=3)
    logger.finalize("success")
    assert logger.calls == [({"a": 1.0}, 3)]


def test_flatten_and_sanitize():
    params = {"a": {"b": 1, "c": {"d": "x"}}, "ns": Namespace(k=2), "e": []}
    assert _flatten_dict(params) == {"a/b": 1, "a/c/d": "x", "ns/k": 2, "e": []}
    clean = _sanitize_params({"f": torch.relu, "t": torch.tensor(3.5), "l": [1, 2], "n": None,
                              "b": True})
    assert clean == {"f": "relu", "t": 3.5, "l": "[1, 2]", "n": "None", "b": True}
    assert _sanitize_params(Namespace(x=1)) == {"x": 1}


# --- TensorBoard -----------------------------------------------------------------------------
def test_tensorboard_scalars_read_back(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"loss": torch.tensor(0.5), "acc": 0.25}, step=3)
    logger.log_metrics({"loss": 0.125}, step=7)
    logger.finalize("success")
    scalars = _scalars(logger.log_dir)
    assert scalars["loss"] == [(3, 0.5), (7, 0.125)]
    assert scalars["acc"] == [(3, 0.25)]


def test_tensorboard_prefix(tmp_path):
    logger = TensorBoardLogger(tmp_path, prefix="pre")
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.finalize("success")
    assert list(_scalars(logger.log_dir)) == ["pre-loss"]


def test_tensorboard_version_auto_increments(tmp_path):
    first = TensorBoardLogger(tmp_path, name="exp")
    assert first.version == 0
    first.log_metrics({"x": 1.0}, 0)
    first.finalize("success")
    assert first.log_dir == os.path.join(tmp_path, "exp", "version_0")
    os.makedirs(tmp_path / "exp" / "version_5")
    os.makedirs(tmp_path / "exp" / "version_x")  # not a version: ignored
    second = TensorBoardLogger(tmp_path, name="exp")
    assert second.version == 6
    os.makedirs(tmp_path / "exp" / "version_6")
    assert second.version == 6  # resolved once, then fixed


def test_tensorboard_explicit_versions_and_no_name(tmp_path):
    assert TensorBoardLogger(tmp_path, version="run_a").log_dir == os.path.join(
        tmp_path, "lightning_logs", "run_a")
    assert TensorBoardLogger(tmp_path, version=3).log_dir.endswith("version_3")
    logger = TensorBoardLogger(tmp_path, name="")
    assert logger.name == ""
    assert logger.log_dir == os.path.join(tmp_path, "version_0")
    assert TensorBoardLogger(tmp_path, name=None).root_dir == os.fspath(tmp_path)


def test_tensorboard_hparams_yaml_and_plugin(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_hyperparams(Namespace(lr=0.01, layers=[8, 4], opt={"name": "adam"},
                                     act=torch.relu))
    logger.finalize("success")
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved == {"lr": 0.01, "layers": [8, 4], "opt": {"name": "adam"}, "act": "relu"}
    acc = event_accumulator.EventAccumulator(logger.log_dir)
    acc.Reload()
    plugin = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(plugin)
    assert b"opt/name" in plugin["_hparams_/session_start_info"]
    assert b"hp_metric" in plugin["_hparams_/experiment"]
    assert _scalars(logger.log_dir)["hp_metric"] == [(0, -1.0)]


def test_tensorboard_without_default_hp_metric(tmp_path):
    logger = TensorBoardLogger(tmp_path, default_hp_metric=False)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"x": 1.0}, 0)
    logger.finalize("success")
    assert "hp_metric" not in _scalars(logger.log_dir)
    assert os.path.isfile(os.path.join(logger.log_dir, "hparams.yaml"))


def test_tensorboard_keeps_working_after_finalize(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.agg_and_log_metrics({"fit": 1.0}, step=0)
    logger.finalize("success")
    logger.agg_and_log_metrics({"test": 2.0}, step=0)  # trainer.test() after fit()
    logger.finalize("success")
    scalars = _scalars(logger.log_dir)  # both event files survive (no truncation)
    assert scalars["fit"] == [(0, 1.0)]
    assert scalars["test"] == [(0, 2.0)]


def test_tensorboard_pickles_without_writer(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="p")
    logger.log_metrics({"x": 1.0}, 0)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        copy = pickle.loads(dumps(logger))
        assert (copy.name, copy.version, copy.save_dir) == ("p", 0, os.fspath(tmp_path))
        assert copy._experiment is None
    logger.finalize("success")


def test_tensorboard_pickle_fixes_version(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    copy = pickle.loads(pickle.dumps(logger))  # resolved before shipping
    os.makedirs(tmp_path / "lightning_logs" / "version_0")
    assert copy.version == logger.version == 0


def test_tensorboard_rejects_non_numbers(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(ValueError, match="name"):
        logger.log_metrics({"name": "abc"}, 0)
    logger.finalize("success")


# --- CSV -------------------------------------------------------------------------------------
def test_csv_rows_and_key_union(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.log_metrics({"loss": 0.5, "acc": 0.25}, step=1)
    logger.save()
    logger.log_metrics({"val_loss": torch.tensor(2.0)}, step=2)  # new key after a flush
    logger.finalize("success")
    rows = _read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert set(rows[0]) == {"step", "loss", "acc", "val_loss"}
    assert rows[0]["acc"] == "" and rows[1]["acc"] == "0.25"
    assert rows[2]["val_loss"] == "2.0" and rows[2]["loss"] == ""


def test_csv_flush_every_n_steps(tmp_path):
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=2)
    path = os.path.join(logger.log_dir, "metrics.csv")
    logger.log_metrics({"a": 1.0}, step=0)
    assert not os.path.exists(path)
    logger.log_metrics({"a": 2.0}, step=1)
    assert len(_read_csv(path)) == 2


def test_csv_hparams_yaml_and_versions(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    logger.log_hyperparams({"lr": 0.1, "nested": {"k": 1}})
    logger.log_hyperparams({"batch_size": 8})
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f) == {"lr": 0.1, "nested": {"k": 1}, "batch_size": 8}
    assert logger.log_dir == os.path.join(tmp_path, "csv", "version_0")
    assert CSVLogger(tmp_path, name="csv").version == 1


def test_csv_appends_after_finalize_and_in_a_fresh_copy(tmp_path):
    logger = CSVLogger(tmp_path, prefix="p")
    logger.agg_and_log_metrics({"a": 1.0}, step=0)
    logger.agg_and_log_metrics({"a": 3.0}, step=0)
    logger.finalize("success")
    logger.log_metrics({"b": 1.0}, step=5)
    logger.finalize("success")
    copy = pickle.loads(pickle.dumps(logger))  # e.g. a resumed run writing the same dir
    copy.log_metrics({"a": 4.0, "c": 2.0}, step=6)
    copy.finalize("success")
    rows = _read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    assert [(r["step"], r["p-a"], r["p-b"], r["p-c"]) for r in rows] == [
        ("0", "2.0", "", ""), ("5", "", "1.0", ""), ("6", "4.0", "", "2.0")]


def test_a_step_key_sets_the_step_and_adds_no_epoch(make_trainer):
    """Spec §1.8 (0.9.0 ``TrainerLoggingMixin.log_metrics``): a ``'step'`` key in a 0.9
    ``'log'`` dict is popped and used as the step, and no ``'epoch'`` is added; without one
    the step is the global step and ``'epoch'`` is added."""
    from doubles import DeterministicModel, RecordingLogger

    class StepKey(DeterministicModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            loss = out["loss"] if isinstance(out, dict) else out
            log = {"a": 1.0, "step": 100 + batch_idx} if batch_idx == 0 else {"b": 2.0}
            return {"loss": loss, "log": log}

    logger = RecordingLogger()
    trainer = make_trainer(logger=logger, max_epochs=1, limit_train_batches=2,
                           num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(StepKey())
    with_a = [(m, s) for m, s in logger.calls if "a" in m]
    with_b = [(m, s) for m, s in logger.calls if "b" in m]
    assert with_a == [({"a": 1.0}, 100)]
    assert with_b and with_b[0][0].get("epoch") == 0 and with_b[0][1] == 1
