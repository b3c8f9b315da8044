"""Storage faults lose nothing on a real 2-worker run (issue 19, item 3): the run's storage is
an S3-compatible server on 127.0.0.1 (moto) reached through a proxy process this module
starts, and that proxy is killed mid-run and started again (the endpoint vanishes, uploads are
cut, then it comes back), or comes back answering ``503 SlowDown``. Training goes on without
a restart, the final checkpoint is committed and loads, and every committed checkpoint is
readable."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid

import cloudpickle
import pytest
import torch

import ray_lit
from ray_lit.checkpoint.manager import CheckpointManager
from ray_lit.storage.checkpoint_io import load_checkpoint

pytestmark = pytest.mark.ray
sys.path.insert(0, os.path.dirname(__file__))
import test_fault_tolerance as ft  # noqa: E402  (the same module and data)
from s3_fault_proxy import start_proxy, stop_proxy  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(ft)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Endpoint:
    """moto in this process, the proxy the workers talk to in a process of its own."""

    def __init__(self, moto_port: int, port: int) -> None:
        self.moto_port, self.port = moto_port, port
        self.proc = start_proxy(port, moto_port)

    def restart(self, down_s: float, slowdown: int = 0) -> None:
        stop_proxy(self.proc)  # only the pid this module started
        time.sleep(down_s)
        self.proc = start_proxy(self.port, self.moto_port, slowdown)


@pytest.fixture(scope="module")
def s3_endpoint():
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    moto_port, port = _free_port(), _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init: the workers inherit it
    bucket = f"ray-lit-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    endpoint = _Endpoint(moto_port, port)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        yield endpoint, f"s3://{bucket}"
    finally:
        ray.shutdown()
        stop_proxy(endpoint.proc)
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _outage_after_first_commit(endpoint: _Endpoint, run_uri: str, down_s: float,
                               slowdown: int = 0) -> tuple[threading.Thread, dict]:
    """Once the run committed its first checkpoint, take the endpoint away for ``down_s``."""
    seen: dict = {}

    def watch() -> None:
        manager = CheckpointManager(run_uri)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not manager.committed():
            time.sleep(0.05)
        seen["first"] = [c.global_step for c in manager.committed()]
        seen["down_at"] = time.monotonic()
        endpoint.restart(down_s, slowdown)
        seen["up_at"] = time.monotonic()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


def _fit(run_uri_root: str, name: str):
    ray_lit.seed_everything(11)
    model = ft.DropoutNet(step_sleep_s=0.3)
    trainer = ray_lit.fit(model, ft._data(), num_workers=2, max_epochs=2,
                          storage_path=run_uri_root, run_name=name, checkpoint_every_n_steps=2,
                          storage_retry_timeout_s=60, keep_checkpoints=10,
                          enable_progress_bar=False, enable_model_summary=False, logger=False,
                          enable_checkpointing=False)
    return model, trainer


def _check_run(model, trainer, run_uri: str) -> None:
    assert trainer.num_restarts == 0  # training went on: no step redone
    assert trainer.global_step == 12
    committed = CheckpointManager(run_uri).committed()
    assert committed[-1].global_step == 12  # the final checkpoint is committed
    for checkpoint in committed:  # and no committed checkpoint is unreadable
        for rank in range(checkpoint.world_size):
            assert "loops" in load_checkpoint(checkpoint.part_uri(rank))
    final = load_checkpoint(committed[-1].part_uri(0))
    for key, value in model.state_dict().items():
        assert torch.equal(final["state_dict"][key], value)


def test_the_s3_endpoint_goes_away_mid_run_and_comes_back(s3_endpoint):
    endpoint, bucket = s3_endpoint
    run_uri = f"{bucket}/runs/outage"
    watcher, seen = _outage_after_first_commit(endpoint, run_uri, down_s=2.5)
    model, trainer = _fit(f"{bucket}/runs", "outage")
    ended = time.monotonic()
    watcher.join(30)
    # the endpoint went away and came back while the run trained
    assert seen["first"] and seen["first"][-1] < 12 and seen["up_at"] < ended
    _check_run(model, trainer, run_uri)


def test_the_s3_endpoint_throttles_mid_run(s3_endpoint):
    endpoint, bucket = s3_endpoint
    run_uri = f"{bucket}/runs/throttled"
    watcher, seen = _outage_after_first_commit(endpoint, run_uri, down_s=0.0, slowdown=15)
    model, trainer = _fit(f"{bucket}/runs", "throttled")
    ended = time.monotonic()
    watcher.join(30)
    assert seen["first"] and seen["first"][-1] < 12 and seen["up_at"] < ended
    _check_run(model, trainer, run_uri)


def test_storage_down_past_the_bound_stops_the_run_with_a_clear_error(s3_endpoint):
    from ray_lit.storage.retry import StorageUnavailableError

    endpoint, bucket = s3_endpoint
    run_uri = f"{bucket}/runs/gone"
    watcher, seen = _outage_after_first_commit(endpoint, run_uri, down_s=10.0)
    ray_lit.seed_everything(11)
    try:
        with pytest.raises(StorageUnavailableError) as info:
            ray_lit.fit(ft.DropoutNet(step_sleep_s=0.3), ft._data(), num_workers=2,
                        max_epochs=2, storage_path=f"{bucket}/runs", run_name="gone",
                        checkpoint_every_n_steps=2, storage_retry_timeout_s=3,
                        enable_progress_bar=False, enable_model_summary=False, logger=False,
                        enable_checkpointing=False)
        assert run_uri in str(info.value) and "storage_retry_timeout_s=3" in str(info.value)
    finally:
        watcher.join(60)  # the endpoint is back for the next test
    # what was committed before the outage still loads
    latest = CheckpointManager(run_uri).latest()
    assert latest is not None and latest.global_step == seen["first"][-1]
    assert "loops" in load_checkpoint(latest.part_uri(0))
