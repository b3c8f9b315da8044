"""Issue 15: ``log_model="all"`` with an ``s3://`` checkpoint folder (a moto server on
127.0.0.1) and an MLflow file store. A checkpoint rewritten in place (``last.ckpt``) before the
driver uploaded the earlier version still reaches the logger in every version: rank 0's proxy
copies each new version to a staging key, the driver uploads that copy and removes it.

The worker path without Ray: rank 0's ``LoggerProxy`` records into a ``RecordingSink``, and the
driver's ``DriverSink`` replays the events later, as the controller does with each poll."""

from __future__ import annotations

import io
import os
import socket
import uuid
from collections.abc import Iterator

import pytest
import torch

from ray_lit.callbacks import ModelCheckpoint
from ray_lit.driver.reporting import DriverSink, replay
from ray_lit.loggers import MLFlowLogger
from ray_lit.loggers.model_artifacts import CheckpointStager, CheckpointUploads, SavedCheckpoints
from ray_lit.loop.reporting import RecordingSink
from ray_lit.storage.filesystem import read_file, write_file
from ray_lit.worker.logger_proxy import LoggerProxy

mlflow = pytest.importorskip("mlflow")  # the dev extra installs it
boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as sock:  # a free port on loopback
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the local moto server, with dummy credentials."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    name = f"ray-lit-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(
        Bucket=name)
    return name


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"file:{tmp_path / 'mlruns'}"


def _keys(bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def _save(uri: str, version: int) -> None:
    buffer = io.BytesIO()
    torch.save({"version": version}, buffer)
    write_file(uri, buffer.getvalue())


def _uploaded_version(store: str, run_id: str, folder: str, dst) -> int:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{folder}/last.ckpt",
                                                dst_path=str(dst), tracking_uri=store)
    return torch.load(local)["version"]


def test_every_version_of_a_file_rewritten_in_place_reaches_mlflow(bucket, file_store,
                                                                   tmp_path):
    logger = MLFlowLogger("exp", tracking_uri=file_store, log_model="all")
    proxy = LoggerProxy.of(logger)
    proxy.sink = RecordingSink()  # what global rank 0 gets
    last = f"s3://{bucket}/run/ckpts/last.ckpt"
    checkpoint = ModelCheckpoint(dirpath=f"s3://{bucket}/run/ckpts", save_last=True)
    # rank 0 rewrites last.ckpt three times (within a second: S3's clock cannot tell them
    # apart) before the driver gets to any of the notices
    for version in (1, 2, 3):
        _save(last, version)
        checkpoint.last_model_path = last
        proxy.after_save_checkpoint(checkpoint)
    events = [e for e in proxy.sink.drain() if e[0] == "checkpoint_saved"]
    assert len(events) == 3
    sink = DriverSink([logger])
    for expected, event in enumerate(events, start=1):
        replay([event], sink)  # the driver uploads one notice; the artifact holds its version
        assert _uploaded_version(file_store, logger.run_id, "last",
                                 tmp_path / f"dl{expected}") == expected
    # the copies are gone once uploaded; the checkpoint itself stays
    assert [k for k in _keys(bucket) if not k.endswith("/")] == ["run/ckpts/last.ckpt"]
    assert torch.load(io.BytesIO(read_file(last)))["version"] == 3


def test_an_unchanged_object_is_not_copied_again_and_a_gone_one_is_skipped(bucket):
    stager = CheckpointStager()
    last = f"s3://{bucket}/ckpts/last.ckpt"
    _save(last, 1)
    saved = SavedCheckpoints(last_model_path=last)
    first = stager.stage(saved)
    assert list(first.staged) == [last] and first.staged[last] != last
    assert stager.stage(saved).staged == {}  # the same object: nothing new to keep
    _save(last, 2)
    again = stager.stage(saved)
    assert again.staged[last] not in (last, first.staged[last])
    assert torch.load(io.BytesIO(read_file(again.staged[last])))["version"] == 2
    gone = SavedCheckpoints(last_model_path=f"s3://{bucket}/ckpts/gone.ckpt")
    assert stager.stage(gone).staged == {}
    # the driver uploads both staged versions, whatever the store's clock says
    uploads = CheckpointUploads("all")
    assert len(uploads.after_save(first)) == len(uploads.after_save(again)) == 1
