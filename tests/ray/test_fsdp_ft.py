"""Sharded fault-tolerance checkpoints with ``strategy="fsdp"`` on Ray workers (issue 16, item 4).

Each rank writes only its own shards of a DCP directory beside its part, in its background
thread; the driver writes the directory's ``.metadata`` and then the manifest. A rank killed
mid-epoch resumes exactly (the final weights equal an uninterrupted run's), and reruns of the
same run at 1 and at 3 workers reshard the 2-worker checkpoint on load and train on.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl
from ray_lit.callbacks import Callback
from ray_lit.checkpoint.manager import CheckpointManager
from ray_lit.storage.checkpoint_io import load_checkpoint
from ray_lit.storage.sharded_io import DCP_METADATA, read_sharded_tensors

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class DropoutNet(pl.LightningModule):
    """Dropout + Adam + a scheduler + a shuffled loader: exact resume needs every piece."""

    def __init__(self, kill_marker: str = "") -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.3), torch.nn.Linear(32, 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, 1))
        self.kill_marker = kill_marker

    def training_step(self, batch, batch_idx):
        if (self.kill_marker and self.global_rank == 1 and self.global_step == 5
                and not os.path.exists(self.kill_marker)):
            open(self.kill_marker, "w").close()
            os._exit(1)  # the worker process dies mid-epoch: no exception, no cleanup
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


class RecordStart(Callback):
    """Rank 0 saves the full weights and Adam state it starts training from."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        def full(v):
            return v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()

        weights = {k: full(v) for k, v in pl_module.state_dict().items()}  # every rank gathers
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        exp_avg = {names[id(p)]: full(opt.state[p]["exp_avg"])
                   for group in opt.param_groups for p in group["params"] if p in opt.state}
        if trainer.is_global_zero:
            torch.save({"weights": weights, "exp_avg": exp_avg, "restored": self.restored},
                       self.path)

    restored = ""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # which restore ran: the lazy one reads each rank's own chunks after sharding
        self.restored = type(checkpoint["state_dict"]).__name__


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)


def _fit(tmp_path, name: str, num_workers: int = 2, max_epochs: int = 2, resume="never",
         callbacks=(), **extra):
    pl.seed_everything(11)
    model = DropoutNet(**extra)
    trainer = ray_lit.fit(model, _data(), num_workers=num_workers, max_epochs=max_epochs,
                          strategy="fsdp", storage_path=str(tmp_path / "runs"), run_name=name,
                          resume=resume, checkpoint_every_n_steps=2, callbacks=list(callbacks),
                          enable_progress_bar=False, enable_model_summary=False, logger=False,
                          enable_checkpointing=False)
    return model, trainer


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fsdp_ft")
    reference, ref_trainer = _fit(tmp_path, "reference")
    return tmp_path, reference, ref_trainer


def test_checkpoints_are_sharded_dcp_directories_committed_by_the_manifest(runs) -> None:
    tmp_path, reference, trainer = runs
    assert trainer.global_step == 12
    manager = CheckpointManager(str(tmp_path / "runs" / "reference"))
    committed = manager.committed()
    assert committed and len(committed) <= 2
    for ckpt in committed:
        folder = ckpt.uri
        manifest = json.loads(Path(folder, "manifest.json").read_text())
        model_dir = os.path.join(folder, manifest["model"])
        # the standard DCP layout, one shard file per rank, each rank's part beside it
        assert sorted(os.listdir(model_dir)) == [DCP_METADATA, "__0_0.distcp", "__1_0.distcp"]
        assert len(manifest["parts"]) == 2
        sizes = [os.path.getsize(os.path.join(model_dir, f"__{r}_0.distcp")) for r in (0, 1)]
        # each rank wrote about half of the tensors (not a full copy each)
        assert max(sizes) < 0.75 * sum(sizes)
        part = load_checkpoint(os.path.join(folder, ckpt.parts[0]))
        assert part["state_dict"] == {}  # rank 0's part: everything but the tensors
        assert all(not entry for entry in part["optimizer_states"][0]["state"].values())
    # the last one holds exactly the weights the driver got back
    tensors = read_sharded_tensors(os.path.join(committed[-1].uri, manifest["model"]))
    for key, value in reference.state_dict().items():
        assert torch.equal(tensors["state_dict"][key], value), key


def test_a_killed_rank_resumes_exactly_from_the_sharded_checkpoint(runs) -> None:
    tmp_path, reference, _ = runs
    marker = str(tmp_path / "killed")
    model, trainer = _fit(tmp_path, "killed", kill_marker=marker)
    assert os.path.exists(marker), "the kill did not happen"
    assert trainer.num_restarts == 1
    assert trainer.global_step == 12
    # same seed, world size and sampler position, the shards read back bit for bit
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize("num_workers", [1, 3])
def test_a_rerun_at_another_world_size_reshards_on_load(runs, num_workers) -> None:
    tmp_path, reference, _ = runs
    start = str(tmp_path / f"start{num_workers}.pt")
    latest = CheckpointManager(str(tmp_path / "runs" / "reference")).latest()
    manifest = json.loads(Path(latest.uri, "manifest.json").read_text())
    saved = read_sharded_tensors(os.path.join(latest.uri, manifest["model"]))
    # the same run (a copy, so that each rerun starts from the 2-worker run's checkpoint)
    name = f"rerun{num_workers}"
    shutil.copytree(tmp_path / "runs" / "reference", tmp_path / "runs" / name)
    model, trainer = _fit(tmp_path, name, num_workers=num_workers, max_epochs=3,
                          resume="auto", callbacks=[RecordStart(start)])
    began = torch.load(start, weights_only=True)
    assert began["restored"] == "ShardedModuleState"
    # DCP stores bytes and resharding only re-cuts them: every rank's new shard holds exactly
    # the saved values, parameters and Adam state alike (the whole tensors compare equal)
    for key, value in reference.state_dict().items():
        assert torch.equal(began["weights"][key], value), key
    for key, exp_avg in began["exp_avg"].items():
        index = list(dict(reference.named_parameters())).index(key)
        assert torch.equal(exp_avg, saved["optimizer_states"]["0"]["state"][str(index)]
                           ["exp_avg"]), key
    # and it trained on: one more epoch of 96 samples over the new ranks (padding rounds up)
    assert trainer.global_step == 12 + -(-96 // (8 * num_workers))
    assert trainer.world_size_history[-1] == num_workers
    assert not torch.equal(model.state_dict()["net.0.weight"],
                           reference.state_dict()["net.0.weight"])
