"""Elastic worker groups on a multi-node ``ray.cluster_utils.Cluster`` (loopback): a lost node
shrinks the group and the unseen rest of the epoch is re-sharded; a new node grows it back."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import cloudpickle
import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from torch.utils.data import DataLoader, Dataset

import ray_lit
import ray_lit as pl
from ray_lit.checkpoint.manager import CheckpointManager

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Indexed(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i


class Recorder(pl.LightningModule):
    def __init__(self, out_dir: str, sleep_s: float) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.out_dir = out_dir
        self.sleep_s = sleep_s

    def training_step(self, batch, batch_idx):
        x, idx = batch
        time.sleep(self.sleep_s)
        line = f"{self.trainer.world_size} {self.current_epoch} {self.global_step} " + \
            " ".join(str(int(i)) for i in idx)
        with open(os.path.join(self.out_dir, f"seen-{os.getpid()}.txt"), "a") as f:
            f.write(line + "\n")
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _seen(out_dir) -> list[tuple[int, int, int, list[int]]]:
    rows = []
    for name in os.listdir(out_dir):
        if name.startswith("seen-"):
            with open(os.path.join(out_dir, name)) as f:
                for line in f:
                    world, epoch, step, *idx = (int(v) for v in line.split())
                    rows.append((world, epoch, step, idx))
    return rows


@contextlib.contextmanager
def _local_cluster(**head_args):
    """A one-CPU head node on loopback, torn down afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **head_args})
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def cluster():
    with _local_cluster() as cluster:
        yield cluster


@pytest.fixture
def quick_cluster():
    """A cluster whose GCS declares a lost node dead within ~2 s (Ray's default takes ~15 s
    here), so that its placement-group bundles are re-placed while the test still trains."""
    checks = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
              "health_check_timeout_ms": 500}
    with _local_cluster(_system_config=checks) as cluster:
        yield cluster


def _fit(tmp_path, out_dir, **extra):
    model = Recorder(str(out_dir), extra.pop("sleep_s"))
    return ray_lit.fit(model, DataLoader(Indexed(64), batch_size=4, shuffle=True),
                       num_workers=(1, 2), storage_path=str(tmp_path / "runs"),
                       run_name="elastic", logger=False, enable_progress_bar=False,
                       enable_model_summary=False, enable_checkpointing=False,
                       placement_timeout_s=20, **extra)


def _after_first_commit(tmp_path, action) -> threading.Thread:
    """A thread that runs ``action`` once the run has committed its first checkpoint."""
    run_dir = str(tmp_path / "runs" / "elastic")

    def wait_then_act():
        manager = CheckpointManager(run_dir)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.isdir(os.path.join(run_dir, "checkpoints")) and manager.committed():
                action()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def _pids_by_world(out_dir) -> dict[int, set[str]]:
    """Which worker processes trained at each world size (from the ``seen-<pid>`` files)."""
    pids: dict[int, set[str]] = {}
    for name in os.listdir(out_dir):
        if name.startswith("seen-"):
            with open(os.path.join(out_dir, name)) as f:
                for line in f:
                    pids.setdefault(int(line.split()[0]), set()).add(name[5:-4])
    return pids


def test_lost_node_shrinks_and_the_epoch_is_seen_once(cluster, tmp_path):
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "seen"
    out.mkdir()
    killer = _after_first_commit(tmp_path, lambda: cluster.remove_node(node,
                                                                       allow_graceful=False))
    trainer = _fit(tmp_path, out, max_epochs=1, checkpoint_every_n_steps=2, sleep_s=0.3)
    killer.join()
    assert trainer.world_size_history[0] == 2 and trainer.world_size_history[-1] == 1
    rows = _seen(out)
    restored = min(step for world, _, step, _ in rows if world == 1)
    kept = [i for world, _, step, idx in rows if (world == 2 and step < restored) or world == 1
            for i in idx]
    assert sorted(kept) == list(range(64))  # every sample of the epoch once
    assert trainer.global_step == 8  # the global batch per optimizer step stayed 8 samples
    # the worker on the surviving node was kept: the same process trained at both sizes
    pids = _pids_by_world(out)
    assert len(pids[1]) == 1 and pids[1] <= pids[2]


def test_a_lost_node_coming_back_grows_the_group_around_the_kept_worker(quick_cluster,
                                                                       tmp_path, capsys):
    cluster = quick_cluster
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "seen"
    out.mkdir()
    result: dict = {}

    def train():  # in a thread: Cluster.add_node and remove_node run on the main thread
        result["trainer"] = _fit(tmp_path, out, max_epochs=6, checkpoint_every_n_steps=2,
                                 sleep_s=0.2)

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    manager = CheckpointManager(str(tmp_path / "runs" / "elastic"))
    deadline = time.monotonic() + 120
    while not (os.path.isdir(tmp_path / "runs" / "elastic" / "checkpoints")
               and manager.committed()) and time.monotonic() < deadline:
        time.sleep(0.1)
    cluster.remove_node(node, allow_graceful=False)
    while 1 not in _pids_by_world(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    cluster.add_node(num_cpus=1)  # the spot node is back: Ray re-places the lost bundle there
    runner.join(timeout=180)
    trainer = result["trainer"]
    assert trainer.world_size_history == [2, 1, 2]
    pids = _pids_by_world(out)
    # one process trained through all three groups; the lost one's place got a new worker
    assert pids[1] <= pids[2] and len(pids[2]) == 3
    assert "kept 1 worker(s), started 1 new" in capsys.readouterr().out
    assert trainer.global_step == 48  # 8 samples per optimizer step throughout


def test_new_node_grows_the_group(cluster, tmp_path):
    out = tmp_path / "seen"
    out.mkdir()
    result: dict = {}

    def train():  # in a thread: Cluster.add_node must run on the main thread
        result["trainer"] = _fit(tmp_path, out, max_epochs=3, sleep_s=0.15)

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    deadline = time.monotonic() + 120
    while not _seen(out) and time.monotonic() < deadline:  # the first group is training
        time.sleep(0.2)
    cluster.add_node(num_cpus=1)
    runner.join(timeout=180)
    trainer = result["trainer"]
    assert trainer.world_size_history[0] == 1
    assert trainer.world_size_history[-1] == 2
    worlds = {world for world, *_ in _seen(out)}
    assert worlds == {1, 2}
    assert trainer.global_step == 24  # 8 samples per optimizer step at either size


def _drain(cluster_address: str, node_id: str, deadline_s: float) -> None:
    """What the autoscaler (or KubeRay) does before reclaiming a spot node."""
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=cluster_address)
    accepted, why = gcs.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot instance reclaimed", int((time.time() + deadline_s) * 1000))
    assert accepted, why


def test_a_drain_notice_checkpoints_then_continues_without_the_node(cluster, tmp_path, capsys):
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "seen"
    out.mkdir()
    notifier = _after_first_commit(tmp_path, lambda: _drain(cluster.address, node.node_id,
                                                            deadline_s=60))
    # two epochs: room for the notice to be read (every second) and acted on before the end
    trainer = _fit(tmp_path, out, max_epochs=2, checkpoint_every_n_steps=2, sleep_s=0.3,
                   max_failures=0)
    notifier.join()
    assert "is draining" in capsys.readouterr().out
    assert trainer.world_size_history == [2, 1]
    assert trainer.num_restarts == 0  # planned: no failure used up (max_failures=0)
    rows = _seen(out)
    # nothing redone: the checkpoint was taken where the two-worker group stopped
    assert max(s for w, _, s, _ in rows if w == 2) < min(s for w, _, s, _ in rows if w == 1)
    for epoch in (0, 1):  # every sample once per epoch, across the resize
        seen = sorted(i for _, e, _, idx in rows if e == epoch for i in idx)
        assert seen == list(range(64)), (epoch, sorted(rows))
    assert trainer.global_step == 16, sorted(rows)
