"""A ``storage_path`` on a file system that does not exist (issue 19 item 5): a clear
``MisconfigurationException`` naming ``storage_path`` and the fix, before any worker starts.

What can never work is refused when the Trainer is built (an unknown scheme, a file system this
``pyarrow`` lacks, a local path under a file); a storage that does not answer or refuses writes
is found by ``fit``'s write probe on the driver, before Ray is asked for anything.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    x = torch.ones(4, 2)
    return DataLoader(TensorDataset(x, x[:, :1]), batch_size=2)


def _trainer(tmp_path, storage_path: str) -> pl.Trainer:
    return pl.Trainer(num_workers=2, storage_path=storage_path, logger=False,
                      enable_progress_bar=False, default_root_dir=str(tmp_path))


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if a run got as far as connecting to Ray (workers would start next)."""

    def refuse() -> None:
        raise AssertionError("Ray was started: the bad storage_path was not caught first")

    monkeypatch.setattr("ray_lit.driver.launch.ensure_ray", refuse)


def test_an_unknown_scheme_is_refused_when_the_trainer_is_built(tmp_path) -> None:
    with pytest.raises(pl.MisconfigurationException, match=r"storage_path='foo://bar'") as info:
        _trainer(tmp_path, "foo://bar")
    assert "s3://" in str(info.value) and "local directory" in str(info.value)


@pytest.mark.parametrize("form", ["{}", "file://{}"])
def test_a_local_path_under_a_file_is_refused_when_the_trainer_is_built(tmp_path, form) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(pl.MisconfigurationException, match="storage_path=") as info:
        _trainer(tmp_path, form.format(blocker / "runs" / "deeper"))
    assert f"{blocker} is a file" in str(info.value)


@pytest.mark.parametrize(("uri", "needed"), [("gs://bucket/runs", "GcsFileSystem"),
                                             ("hdfs://namenode/runs", "HadoopFileSystem"),
                                             ("s3://bucket/runs", "S3FileSystem")])
def test_a_file_system_pyarrow_lacks_is_refused_when_the_trainer_is_built(
        tmp_path, monkeypatch, uri, needed) -> None:
    import pyarrow.fs

    monkeypatch.delattr(pyarrow.fs, needed, raising=False)  # a pyarrow built without it
    with pytest.raises(pl.MisconfigurationException, match=f"storage_path='{uri}'") as info:
        _trainer(tmp_path, uri)
    assert needed in str(info.value) and "pip install" in str(info.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_an_s3_endpoint_that_refuses_fails_fit_before_workers_start(tmp_path, monkeypatch,
                                                                    no_workers) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    uri = f"s3://bucket/runs?endpoint_override=127.0.0.1:{_closed_port()}&scheme=http"
    trainer = _trainer(tmp_path, uri)  # the URI itself is fine
    start = time.monotonic()
    with pytest.raises(pl.MisconfigurationException, match="storage_path") as info:
        trainer.fit(Tiny(), _loader())
    assert "not writable" in str(info.value) and "s3://bucket/runs" in str(info.value)
    assert time.monotonic() - start < 60  # one try, not storage_retry_timeout_s of retries


def test_gs_without_credentials_fails_fit_in_seconds_before_workers_start(tmp_path, monkeypatch,
                                                                         no_workers) -> None:
    """Without credentials (and no Google metadata server) the GCS client retries for many
    minutes; the driver's probe gives up after its bound and names the fix."""
    import pyarrow.fs

    if not hasattr(pyarrow.fs, "GcsFileSystem"):  # then Trainer(...) refuses it (test above)
        monkeypatch.setattr(pyarrow.fs, "GcsFileSystem", object, raising=False)
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("ray_lit.storage.probe.PROBE_TIMEOUT_S", 3.0)
    trainer = _trainer(tmp_path, "gs://ray-lit-no-such-bucket/runs")
    start = time.monotonic()
    with pytest.raises(pl.MisconfigurationException, match="storage_path") as info:
        trainer.fit(Tiny(), _loader())
    message = str(info.value)
    assert "gs://ray-lit-no-such-bucket/runs" in message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message or "not writable" in message
    assert time.monotonic() - start < 30
