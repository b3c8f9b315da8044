"""Run state on s3:// (issue 5): the fault-tolerance checkpoints of a 2-worker run go to an
S3-compatible server on 127.0.0.1 (moto), so the real protocol path runs, and a killed rank is
recovered from the committed checkpoint read back from it."""

from __future__ import annotations

import os
import socket
import sys
import uuid

import cloudpickle
import pytest
import torch

import ray_lit
from ray_lit.checkpoint.manager import CheckpointManager

pytestmark = pytest.mark.ray
sys.path.insert(0, os.path.dirname(__file__))
import test_fault_tolerance as ft  # noqa: E402  (the same module and data)

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(ft)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_cluster():
    """A moto S3 server and a Ray cluster whose workers see its endpoint."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init: the workers inherit it
    bucket = f"ray-lit-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        yield f"s3://{bucket}"
    finally:
        ray.shutdown()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_killed_rank_recovers_from_s3(s3_cluster, tmp_path):
    marker = str(tmp_path / "killed")
    ray_lit.seed_everything(11)
    model = ft.DropoutNet(kill_marker=marker, kill_step=3)
    trainer = ray_lit.fit(model, ft._data(), num_workers=2, max_epochs=1,
                          storage_path=f"{s3_cluster}/runs", run_name="s3run",
                          checkpoint_every_n_steps=2, enable_progress_bar=False,
                          enable_model_summary=False, logger=False, enable_checkpointing=False)
    assert os.path.exists(marker)
    assert trainer.num_restarts == 1
    assert trainer.global_step == 6
    committed = CheckpointManager(f"{s3_cluster}/runs/s3run").committed()
    assert committed and committed[-1].global_step == 6
    from ray_lit.storage.checkpoint_io import load_checkpoint

    state = load_checkpoint(committed[-1].part_uri(0))
    for key, value in model.state_dict().items():
        assert torch.equal(state["state_dict"][key], value)
