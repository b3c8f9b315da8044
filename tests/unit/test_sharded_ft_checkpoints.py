"""Sharded fault-tolerance checkpoints without Ray (one process, a world of one): the DCP save
cut into plan, write and commit (``storage.dcp_plan``, ``checkpoint.manager``), the lazy
restore (``checkpoint.shard_restore``) and the retried restore reads (``worker.job``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ray_lit.checkpoint.manager import CheckpointManager
from ray_lit.checkpoint.shard_restore import (
    ShardedModuleState,
    ShardedOptimizerState,
    restore_checkpoint,
    sharded_dir,
)
from ray_lit.messages import FromStorage
from ray_lit.storage.checkpoint_io import load_checkpoint, save_checkpoint
from ray_lit.storage.dcp_plan import plan_shards, write_shards
from ray_lit.storage.retry import StorageUnavailableError
from ray_lit.storage.sharded_io import (
    DCP_METADATA,
    SHARDED_MARKER,
    read_sharded_tensors,
    split_checkpoint,
)
from ray_lit.worker import job


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Linear(6, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    return model, opt


def _write(tmp_path, model, opt, world_size: int = 1) -> tuple[CheckpointManager, str]:
    """What every rank's writer does, then what the driver does on their confirmations."""
    checkpoint = {"epoch": 1, "global_step": 3, "state_dict": model.state_dict(),
                  "optimizer_states": [opt.state_dict()], "loops": {"rng": None}}
    tensors, meta = split_checkpoint(checkpoint, 1)
    plan = plan_shards(tensors, 0, 1)  # a world of one: no process group, no gather
    meta[SHARDED_MARKER]["dcp_dir"] = "model-f0"
    folder = tmp_path / "run" / "checkpoints" / "step-0000000003-e00001"
    host = {k: v.clone() for k, v in plan.tensors.items()}  # the host copies
    results = write_shards(plan, host, str(folder / "model-f0"))
    save_checkpoint(meta, str(folder / "rank_0-f0.pt"))
    manager = CheckpointManager(str(tmp_path / "run"))
    dcp = {"dir": "model-f0", "results": results, "metadata": plan.metadata}
    for rank in range(1, world_size):  # other ranks confirmed first: nothing commits yet
        assert not manager.confirm("step-0000000003-e00001", rank, world_size, {}, "f0")
    committed = manager.confirm("step-0000000003-e00001", 0, world_size,
                                {"global_step": 3, "epoch": 1, "dcp": dcp}, "f0")
    assert committed
    return manager, str(folder)


def test_shards_written_without_collectives_commit_as_a_standard_dcp_directory(tmp_path):
    model, opt = _trained()
    manager, folder = _write(tmp_path, model, opt)
    manifest = json.loads(Path(folder, "manifest.json").read_text())
    assert manifest["model"] == "model-f0"
    assert sorted(os.listdir(os.path.join(folder, "model-f0"))) == [DCP_METADATA,
                                                                    "__0_0.distcp"]
    # any DCP reader reads it: ray_lit's, and torch's own conversion to one file
    tensors = read_sharded_tensors(os.path.join(folder, "model-f0"))
    for key, value in model.state_dict().items():
        assert torch.equal(tensors["state_dict"][key], value), key
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(os.path.join(folder, "model-f0"), str(tmp_path / "one.pt"))
    flat = torch.load(tmp_path / "one.pt", weights_only=False)
    assert torch.equal(flat["state_dict"]["0.weight"], model[0].weight.detach())
    assert manager.latest().global_step == 3


def test_no_metadata_and_no_manifest_until_every_rank_confirmed(tmp_path):
    model, opt = _trained()
    manager = CheckpointManager(str(tmp_path / "run"))
    assert not manager.confirm("step-0000000003-e00001", 1, 2,
                               {"global_step": 3, "dcp": {"dir": "model-f0", "results": [],
                                                          "metadata": None}}, "f0")
    assert manager.latest() is None
    assert not (tmp_path / "run" / "checkpoints" / "step-0000000003-e00001" / "model-f0"
                / DCP_METADATA).exists()


def test_lazy_restore_reads_the_tensors_into_the_module_and_optimizer(tmp_path):
    model, opt = _trained()
    _, folder = _write(tmp_path, model, opt)
    part = load_checkpoint(os.path.join(folder, "rank_0-f0.pt"))
    assert sharded_dir(part) == "model-f0"
    checkpoint = restore_checkpoint(part, os.path.join(folder, "model-f0"), lazy=True)
    assert isinstance(checkpoint["state_dict"], ShardedModuleState)
    assert isinstance(checkpoint["optimizer_states"][0], ShardedOptimizerState)
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Linear(6, 1))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    checkpoint["state_dict"].load_into_module(fresh)
    checkpoint["optimizer_states"][0].load_into_optimizer(fresh_opt)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert got["param_groups"][0]["lr"] == 0.1
    for idx, entry in want["state"].items():
        for name, value in entry.items():
            assert torch.equal(got["state"][idx][name], value), (idx, name)
    # the same steps from both: the restored optimizer continues exactly
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_eager_restore_for_a_strategy_that_holds_the_full_state(tmp_path):
    model, opt = _trained()
    _, folder = _write(tmp_path, model, opt)
    restore = FromStorage(os.path.join(folder, "rank_0-f0.pt"), {})
    checkpoint = job.load_restore(restore, 0, sharded=False)
    assert SHARDED_MARKER not in checkpoint
    assert torch.equal(checkpoint["state_dict"]["0.weight"], model[0].weight.detach())
    assert torch.equal(checkpoint["optimizer_states"][0]["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])


def test_restore_reads_are_retried_like_the_writes(tmp_path, monkeypatch):
    path = str(tmp_path / "rank_0.pt")
    save_checkpoint({"loops": {"rng": None}, "state_dict": {}}, path)
    fails = [2]
    import ray_lit.storage.checkpoint_io as checkpoint_io

    original = checkpoint_io.load_checkpoint

    def flaky(uri, map_location=None):
        if fails[0]:
            fails[0] -= 1
            raise OSError("SlowDown: please reduce your request rate")
        return original(uri, map_location)

    monkeypatch.setattr(checkpoint_io, "load_checkpoint", flaky)
    restore = FromStorage(path, {})
    assert job.load_restore(restore, 0, retry_timeout_s=30)["state_dict"] == {}
    assert fails[0] == 0
    fails[0] = 5
    with pytest.raises(StorageUnavailableError, match="storage_retry_timeout_s"):
        job.load_restore(restore, 0, retry_timeout_s=0)


def test_a_uri_run_directory_uploads_the_shards_with_retries_and_restores(tmp_path,
                                                                           monkeypatch):
    """``file://`` goes through pyarrow like s3://: the shard file and the part are uploaded
    from memory with retries, and the restore downloads the DCP directory."""
    from ray_lit.checkpoint.writer import CheckpointWriter, _Shards, _Write
    from ray_lit.storage.filesystem import Storage

    model, opt = _trained()
    tensors, meta = split_checkpoint({"epoch": 0, "global_step": 3,
                                      "state_dict": model.state_dict(),
                                      "optimizer_states": [opt.state_dict()],
                                      "loops": {"rng": None}}, 1)
    meta[SHARDED_MARKER]["dcp_dir"] = "model-f0"
    plan = plan_shards(tensors, 0, 1)
    run_uri = f"file://{tmp_path}/run"
    writer = CheckpointWriter(run_uri, every_n_steps=1)
    writer._storage()
    failures = [1]
    original = Storage._write_once

    def flaky(self, rel, data):
        if failures[0]:
            failures[0] -= 1
            raise OSError("503 SlowDown")
        return original(self, rel, data)

    monkeypatch.setattr(Storage, "_write_once", flaky)
    name = "step-0000000003-e00000"
    part = f"{run_uri}/checkpoints/{name}/rank_0-f0.pt"
    results = writer._save_sharded({"part": meta, "shards": dict(plan.tensors)}, part, name,
                                   _Shards(plan, "model-f0"), _Write(name))
    assert results and failures == [0]  # one failed upload, retried
    manager = CheckpointManager(run_uri)
    assert manager.confirm(name, 0, 1, {"global_step": 3, "epoch": 0, "dcp": {
        "dir": "model-f0", "results": results, "metadata": plan.metadata}}, "f0")
    folder = tmp_path / "run" / "checkpoints" / name
    assert sorted(os.listdir(folder / "model-f0")) == [DCP_METADATA, "__0_0.distcp"]
    restore = FromStorage(part, {})
    lazy = job.load_restore(restore, 0, sharded=True)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Linear(6, 1))
    lazy["state_dict"].load_into_module(fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)
    whole = job.load_restore(restore, 0, sharded=False)
    assert torch.equal(whole["state_dict"]["2.bias"], model[2].bias.detach())


def test_the_plan_is_kept_while_the_layout_stays_the_same():
    from ray_lit.storage.dcp_plan import ShardPlanner

    model, opt = _trained()
    tensors, _ = split_checkpoint({"state_dict": model.state_dict(),
                                   "optimizer_states": [opt.state_dict()]}, 1)
    planner = ShardPlanner()
    first = planner.plan(tensors, 0, 1)
    again = planner.plan(tensors, 0, 1)
    assert again.plan is first.plan and again.metadata is first.metadata
    assert again.tensors.keys() == first.tensors.keys()
    tensors["state_dict"]["extra"] = torch.zeros(2)  # another layout: planned again
    changed = planner.plan(tensors, 0, 1)
    assert changed.plan is not first.plan and "state_dict.extra" in changed.tensors
