"""MLFlowLogger against a local MLflow file store and WandbLogger in wandb's offline mode, in
process: hyperparameters and metrics are read back from what each wrote. No traffic leaves the
machine (the MLflow store is a directory; wandb runs with ``mode="offline"``)."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.loggers import MLFlowLogger, WandbLogger

mlflow = pytest.importorskip("mlflow")  # the dev extra installs both
wandb = pytest.importorskip("wandb")


class Regression(pl.LightningModule):
    def __init__(self, lr: float = 0.05, sizes: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


# Not the shared ``fit`` fixture: a regression fit logging to the caller's real logger.
def _fit(tmp_path, logger, max_epochs=2):
    x = torch.randn(16, 4)
    trainer = pl.Trainer(max_epochs=max_epochs, logger=logger, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(Regression(sizes={"hidden": 8}), DataLoader(TensorDataset(x, x.sum(1)),
                                                            batch_size=4))
    return trainer


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    """A local MLflow file store (MLflow 3 asks for an opt-in; the env var is restored)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"file:{tmp_path / 'mlruns'}"


# --- MLflow ---------------------------------------------------------------------------------------
def test_mlflow_logger_writes_hparams_metrics_and_status(tmp_path, file_store):
    logger = MLFlowLogger("exp", run_name="first", tracking_uri=file_store,
                          tags={"team": "ml"})
    trainer = _fit(tmp_path, logger)
    client = mlflow.tracking.MlflowClient(tracking_uri=file_store)
    run = client.get_run(logger.run_id)
    assert run.data.params["lr"] == "0.05" and run.data.params["sizes/hidden"] == "8"
    assert run.data.tags["team"] == "ml" and run.data.tags["mlflow.runName"] == "first"
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(logger.run_id, "train_loss")
    assert [m.step for m in history] == list(range(8))  # 4 batches x 2 epochs, every step
    assert history[-1].value == pytest.approx(float(trainer.logged_metrics["train_loss"]))
    assert client.get_experiment_by_name("exp").experiment_id == logger.name
    assert logger.version == logger.run_id
    assert logger.save_dir == str(tmp_path / "mlruns")


def test_mlflow_logger_prefix_names_and_an_existing_run(tmp_path, file_store):
    logger = MLFlowLogger("exp", tracking_uri=file_store, prefix="stage1")
    with pytest.warns(RuntimeWarning, match="string metric"):
        logger.log_metrics({"acc(top1)": 0.5, "note": "text"}, step=3)
    logger.finalize("failed")
    again = MLFlowLogger("other-name", tracking_uri=file_store, run_id=logger.run_id)
    again.log_metrics({"acc": torch.tensor(0.75)}, step=4)
    client = mlflow.tracking.MlflowClient(tracking_uri=file_store)
    run = client.get_run(logger.run_id)
    assert run.data.metrics == {"stage1-acctop1": 0.5, "acc": 0.75}
    assert run.info.status == "FAILED"
    assert again.experiment_id == logger.experiment_id  # the run's own experiment


def test_mlflow_logger_defaults_to_a_file_store_in_save_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # restored after the test
    logger = MLFlowLogger(save_dir=str(tmp_path / "store"))
    logger.log_hyperparams({"a": 1})
    assert logger.save_dir == str(tmp_path / "store")
    assert os.path.isdir(tmp_path / "store" / logger.experiment_id / logger.run_id)


def test_mlflow_logger_without_mlflow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    logger = MLFlowLogger(save_dir=str(tmp_path))  # building it imports nothing
    with pytest.raises(ImportError, match=r"pip install ray_lit\[mlflow\]"):
        logger.experiment  # noqa: B018


# --- wandb (offline) ------------------------------------------------------------------------------
def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _settled(path: str, timeout_s: float = 20.0) -> bytes:
    """The file's bytes once wandb's service stopped writing it: ``finish()`` returns before
    the service has flushed the run's records."""
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        size = os.path.getsize(path)
        if size > 7 and size == last:
            break
        last = size
        time.sleep(0.3)
    with open(path, "rb") as f:
        return f.read()


def read_offline_run(save_dir) -> dict:
    """The run, config and history records of the one offline run under ``save_dir``.

    wandb's ``.wandb`` file is a LevelDB-style log (7-byte file header, 32 KiB blocks, records
    with a 7-byte header: crc32, length, type) of protobuf ``Record`` messages.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb"))
    data = _settled(path)
    assert data[:4] == b":W&B"
    out: dict = {"run": None, "config": {}, "history": []}
    pos, block, parts = 7, 32768, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = [payload] if kind in (1, 2) else [*parts, payload]
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(b"".join(parts))
        which = record.WhichOneof("record_type")
        if which == "run":
            out["run"] = record.run
        elif which == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif which == "history":
            out["history"].append({_key(i): json.loads(i.value_json)
                                   for i in record.history.item})
    return out


def test_wandb_logger_offline_writes_config_and_history(tmp_path):
    logger = WandbLogger(name="first", save_dir=str(tmp_path), offline=True, project="proj")
    assert logger.name == "proj"
    try:
        _fit(tmp_path, logger)
        run_id = logger.version
        logger.log_metrics({"extra": 1.0})  # no step: wandb carries the last one (step_sync)
    finally:
        logger.experiment.finish()
    found = read_offline_run(str(tmp_path))
    assert found["run"].run_id == run_id and found["run"].display_name == "first"
    assert found["run"].project == "proj"
    assert found["config"]["lr"] == 0.05 and found["config"]["sizes"] == {"hidden": 8}
    losses = [h for h in found["history"] if "train_loss" in h]
    assert [h["trainer/global_step"] for h in losses] == list(range(8))
    assert all("epoch" in h for h in losses)
    assert any(h.get("extra") == 1.0 for h in found["history"])


def test_wandb_logger_prefix_and_kwargs_reach_wandb_init(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="p", prefix="pre",
                         job_type="eval", version="fixedid1")
    try:
        logger.log_metrics({"m": 2.0}, step=5)
        assert logger.experiment.job_type == "eval" and logger.version == "fixedid1"
    finally:
        logger.experiment.finish()
    history = read_offline_run(str(tmp_path))["history"]
    assert {"pre-m": 2.0, "trainer/global_step": 5}.items() <= history[0].items()


def test_lightning_import_paths_resolve_to_these_loggers():
    import ray_lit.compat

    with ray_lit.compat.lightning_on_ray():
        from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlow
        from pytorch_lightning.loggers.wandb import WandbLogger as LightningWandb

        assert LightningMLFlow is MLFlowLogger and LightningWandb is WandbLogger
