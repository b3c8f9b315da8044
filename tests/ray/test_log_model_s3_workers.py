"""Issue 15 on 2 Ray workers: ``MLFlowLogger(log_model="all")`` with ``ModelCheckpoint`` writing
``last.ckpt`` into an ``s3://`` folder (a moto server on 127.0.0.1) at every step. The file is
rewritten in place long before the driver gets each notice; every version still reaches MLflow
(each upload is read back from the MLflow file store as it is made)."""

from __future__ import annotations

import os
import socket
import sys
import uuid

import cloudpickle
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
from ray_lit.callbacks import ModelCheckpoint
from ray_lit.loggers import MLFlowLogger

mlflow = pytest.importorskip("mlflow")  # the dev extra installs it
pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def s3_cluster():
    """A moto S3 server, a bucket, and a Ray cluster whose workers see its endpoint."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": endpoint,
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init: the workers inherit it
    bucket = f"ray-lit-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        yield bucket
    finally:
        ray.shutdown()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Regression(ray_lit.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class ReadBack(MLFlowLogger):
    """Reads each uploaded checkpoint back from the store right after its upload."""

    def __init__(self, *args, download_to: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.download_to = download_to
        self.read_back: list[int] = []

    def _log_checkpoint(self, upload) -> None:
        super()._log_checkpoint(upload)
        local = mlflow.artifacts.download_artifacts(
            run_id=self.run_id, artifact_path=f"{upload.stem}/{os.path.basename(upload.path)}",
            dst_path=os.path.join(self.download_to, str(len(self.read_back))),
            tracking_uri=self._tracking_uri)
        self.read_back.append(torch.load(local, weights_only=False)["global_step"])


def test_every_version_of_last_ckpt_on_s3_reaches_mlflow_from_two_workers(s3_cluster,
                                                                          tmp_path):
    logger = ReadBack("exp", tracking_uri=f"file:{tmp_path / 'mlruns'}", log_model="all",
                      download_to=str(tmp_path / "dl"))
    checkpoint = ModelCheckpoint(dirpath=f"s3://{s3_cluster}/run/ck", save_last=True,
                                 save_top_k=0, every_n_train_steps=1)
    x = torch.randn(96, 4, generator=torch.Generator().manual_seed(0))
    trainer = ray_lit.Trainer(num_workers=2, max_epochs=1, logger=logger,
                              callbacks=[checkpoint], default_root_dir=str(tmp_path),
                              enable_progress_bar=False,
                              enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Regression(), DataLoader(TensorDataset(x, x.sum(1)), batch_size=8))
    steps = trainer.global_step
    assert steps == 6
    # each version of last.ckpt, in order: the one saved at step 1, 2, ... (one per save)
    assert logger.read_back == list(range(1, steps + 1))
