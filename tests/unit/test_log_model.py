"""``log_model`` on MLFlowLogger (a local MLflow file store) and WandbLogger (offline mode), in
process: ``True`` uploads the checkpoints kept at the end of training, ``"all"`` each one as
ModelCheckpoint saves it, ``False`` none. The artifacts are read back and loaded."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import struct

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.callbacks import ModelCheckpoint
from ray_lit.errors import MisconfigurationException
from ray_lit.loggers import MLFlowLogger, WandbLogger
from ray_lit.loggers.model_artifacts import CheckpointUploads, SavedCheckpoints

mlflow = pytest.importorskip("mlflow")  # the dev extra installs both
wandb = pytest.importorskip("wandb")


class Regression(pl.LightningModule):
    """val_loss goes down epoch after epoch (full-batch SGD on a linear target)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.layer(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


# Not the shared ``fit`` fixture: a checkpointing Trainer logging to the caller's logger.
def _fit(tmp_path, logger, epochs=3, **ckpt):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, x.sum(1)), batch_size=16)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), monitor="val_loss",
                                 filename="{epoch}", **ckpt)
    trainer = pl.Trainer(max_epochs=epochs, logger=logger, callbacks=[checkpoint],
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(Regression(), loader, loader)
    return trainer, checkpoint


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"file:{tmp_path / 'mlruns'}"


def _mlflow_artifacts(store: str, run_id: str) -> dict[str, set[str]]:
    """artifact folder -> the files in it."""
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    return {folder.path: {os.path.basename(f.path) for f in client.list_artifacts(run_id,
                                                                                  folder.path)}
            for folder in client.list_artifacts(run_id) if folder.is_dir}


def _download(store: str, run_id: str, path: str, dst) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                               dst_path=str(dst), tracking_uri=store)


# --- validation ----------------------------------------------------------------------------------
def test_log_model_values_are_validated_naming_the_option():
    for cls in (MLFlowLogger, WandbLogger):
        with pytest.raises(MisconfigurationException, match=r"log_model='best'.*'all'"):
            cls(log_model="best")
    MLFlowLogger(log_model="all")  # accepted, nothing imported or created yet
    WandbLogger(log_model=True)


# --- MLflow --------------------------------------------------------------------------------------
def test_mlflow_log_model_true_uploads_the_kept_checkpoints_at_the_end(tmp_path, file_store):
    logger = MLFlowLogger("exp", tracking_uri=file_store, log_model=True)
    trainer, checkpoint = _fit(tmp_path, logger, save_top_k=2)
    kept = sorted(os.path.basename(p) for p in checkpoint.best_k_models)
    assert kept == ["epoch=1.ckpt", "epoch=2.ckpt"]  # epoch 0 was replaced
    artifacts = _mlflow_artifacts(file_store, logger.run_id)
    assert artifacts == {f"epoch={e}": {f"epoch={e}.ckpt", "metadata.yaml", "aliases.txt"}
                         for e in (1, 2)}
    best = _download(file_store, logger.run_id, "epoch=2", tmp_path / "dl")
    import yaml

    meta = yaml.safe_load(pathlib.Path(best, "metadata.yaml").read_text())
    assert meta["original_filename"] == "epoch=2.ckpt"
    assert meta["score"] == pytest.approx(checkpoint.best_model_score)
    assert meta["ModelCheckpoint"]["monitor"] == "val_loss"
    assert meta["ModelCheckpoint"]["save_top_k"] == 2
    assert pathlib.Path(best, "aliases.txt").read_text() == "['latest', 'best']"
    state = torch.load(os.path.join(best, "epoch=2.ckpt"), weights_only=False)
    assert state["global_step"] == trainer.global_step
    assert torch.equal(state["state_dict"]["layer.weight"],
                       torch.load(checkpoint.best_model_path,
                                  weights_only=False)["state_dict"]["layer.weight"])


def test_mlflow_log_model_all_uploads_each_checkpoint_as_saved(tmp_path, file_store):
    logger = MLFlowLogger("exp", tracking_uri=file_store, log_model="all")
    _fit(tmp_path, logger, save_top_k=1, save_last=True)
    artifacts = _mlflow_artifacts(file_store, logger.run_id)
    # each epoch's file was uploaded before the next replaced it; last.ckpt once (its latest)
    assert set(artifacts) == {"epoch=0", "epoch=1", "epoch=2", "last"}
    assert "epoch=0.ckpt" in artifacts["epoch=0"]
    assert not os.path.exists(tmp_path / "ckpts" / "epoch=0.ckpt")


def test_mlflow_log_model_false_uploads_nothing(tmp_path, file_store):
    logger = MLFlowLogger("exp", tracking_uri=file_store)
    _fit(tmp_path, logger, epochs=1)
    assert _mlflow_artifacts(file_store, logger.run_id) == {}


def test_log_model_true_with_save_top_k_minus_one_uploads_as_saved():
    """Lightning's rule: True with ``save_top_k=-1`` uploads each checkpoint at once."""
    uploads = CheckpointUploads(True)
    assert uploads.after_save(SavedCheckpoints(options={"save_top_k": -1})) == []
    assert uploads.at_end() == []  # nothing was held back for the end
    pending = SavedCheckpoints(options={"save_top_k": 1})
    uploads.after_save(pending)
    assert uploads._pending is pending


def test_mlflow_log_model_true_with_save_top_k_minus_one_keeps_every_epoch(tmp_path,
                                                                          file_store):
    logger = MLFlowLogger("exp", tracking_uri=file_store, log_model=True)
    _fit(tmp_path, logger, epochs=2, save_top_k=-1)
    assert set(_mlflow_artifacts(file_store, logger.run_id)) == {"epoch=0", "epoch=1"}


def test_a_changed_file_is_uploaded_again_and_a_gone_one_is_skipped(tmp_path):
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"1")
    uploads = CheckpointUploads("all")
    saved = SavedCheckpoints(last_model_path=str(last), best_k_models={
        str(tmp_path / "gone.ckpt"): 0.5})
    with pytest.warns(RuntimeWarning, match="gone"):
        first = uploads.after_save(saved)
    assert [u.path for u in first] == [str(last)] and first[0].aliases == ("latest",)
    with pytest.warns(RuntimeWarning):
        assert uploads.after_save(saved) == []  # unchanged: not again
    os.utime(last, (os.stat(last).st_atime, os.stat(last).st_mtime + 5))
    with pytest.warns(RuntimeWarning):
        assert [u.path for u in uploads.after_save(saved)] == [str(last)]


# --- wandb (offline) -----------------------------------------------------------------------------
def _artifact_records(save_dir) -> list:
    """The artifact records of the one offline run under ``save_dir`` (wandb's ``.wandb`` log:
    7-byte file header, 32 KiB blocks, records with a 7-byte header, protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2

    from tests.unit.test_loggers_extra import _settled

    (path,) = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb"))
    data = _settled(path)
    pos, block, parts, found = 7, 32768, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = [payload] if kind in (1, 2) else [*parts, payload]
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(b"".join(parts))
        if record.WhichOneof("record_type") == "artifact":
            found.append(record.artifact)
    return found


@pytest.fixture
def wandb_dirs(tmp_path, monkeypatch):
    """wandb's staging and cache folders inside the test's directory."""
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_ARTIFACT_DIR", str(tmp_path / "wandb_artifacts"))


def _entry(artifact):
    (entry,) = [e for e in artifact.manifest.contents if e.path == "model.ckpt"]
    return entry


@pytest.mark.parametrize("log_model", ["all", True])
def test_wandb_log_model_offline_logs_model_artifacts(tmp_path, wandb_dirs, log_model):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="p",
                         log_model=log_model)
    try:
        trainer, checkpoint = _fit(tmp_path, logger, save_top_k=1)
        run_id = logger.version
    finally:
        logger.experiment.finish()
    records = _artifact_records(str(tmp_path))
    assert {r.name for r in records} == {f"model-{run_id}"}
    assert all(r.type == "model" for r in records)
    # "all": one version per epoch as saved; True: the one kept at the end
    assert len(records) == (3 if log_model == "all" else 1)
    final = records[-1]
    assert sorted(final.aliases) == ["best", "latest"]
    meta = json.loads(final.metadata)
    assert meta["original_filename"] == "epoch=2.ckpt"
    assert meta["score"] == pytest.approx(checkpoint.best_model_score)
    staged = _entry(final).local_path
    state = torch.load(staged, weights_only=False)
    assert state["global_step"] == trainer.global_step
    first = json.loads(records[0].metadata)
    assert first["original_filename"] == ("epoch=0.ckpt" if log_model == "all" else
                                          "epoch=2.ckpt")


# --- the worker path without Ray: rank 0's proxy -> the event stream -> the driver's logger ----
@pytest.mark.parametrize("log_model", ["all", True])
def test_rank0_proxy_forwards_saves_and_all_keeps_replaced_files_until_uploaded(
        tmp_path, file_store, log_model):
    from ray_lit.driver.reporting import DriverSink, replay
    from ray_lit.loop.reporting import RecordingSink
    from ray_lit.worker.logger_proxy import LoggerProxy

    logger = MLFlowLogger("exp", tracking_uri=file_store, log_model=log_model)
    proxy = LoggerProxy.of(logger)
    proxy.sink = RecordingSink()  # what global rank 0 gets
    folder = tmp_path / "ckpts"
    folder.mkdir()
    checkpoint = ModelCheckpoint(dirpath=str(folder), monitor="val_loss")
    for epoch, score in ((0, 2.0), (1, 1.0)):  # epoch 1 replaces epoch 0 (save_top_k=1)
        path = folder / f"epoch={epoch}.ckpt"
        torch.save({"epoch": epoch}, path)
        old = checkpoint.best_model_path
        checkpoint.best_k_models = {str(path): score}
        checkpoint.best_model_path, checkpoint.best_model_score = str(path), score
        proxy.after_save_checkpoint(checkpoint)
        if old:
            os.remove(old)
    proxy.sink.finalize("success")
    # the driver replays rank 0's events after both saves
    replay(proxy.sink.drain(), DriverSink([logger]))
    uploaded = set(_mlflow_artifacts(file_store, logger.run_id))
    assert uploaded == ({"epoch=0", "epoch=1"} if log_model == "all" else {"epoch=1"})
    assert sorted(os.listdir(folder)) == ["epoch=1.ckpt"]  # no staged link left behind
    local = _download(file_store, logger.run_id, "epoch=1", tmp_path / "dl")
    assert torch.load(os.path.join(local, "epoch=1.ckpt"))["epoch"] == 1
