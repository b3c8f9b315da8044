"""Sharded checkpoints (issue 16, item 3): ``FSDPStrategy(state_dict_type="sharded")``.

Two real FSDP2 ranks (gloo on loopback, spawned as ``test_fsdp`` does, no Ray) write one DCP
directory each holding its own shards; a plain process (no process group) reads it back whole
and equal to the gathered full state. In process (a world of one) the whole ModelCheckpoint
path runs: directories under the ModelCheckpoint names, top-k removal, ``last.ckpt``,
``load_from_checkpoint``, resume, consolidation (function and command) and the bad inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.__main__ import main as cli_main
from ray_lit.callbacks import ModelCheckpoint
from ray_lit.checkpoint.sharded import consolidate
from ray_lit.errors import MisconfigurationException
from ray_lit.storage.checkpoint_io import CheckpointLoadError, load_checkpoint, save_checkpoint
from ray_lit.storage.sharded_io import (
    DCP_METADATA,
    META_NAME,
    is_sharded_checkpoint,
    load_sharded_checkpoint,
)
from ray_lit.strategies import FSDPStrategy


class Blocks(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.automatic_optimization = True

    def training_step(self, batch: Any, batch_idx: int = 0) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.head(self.body(x)), y)


# --- two FSDP ranks write, one plain process reads ------------------------------------------------
def _scenario_save(rank: int, directory: str) -> dict[str, Any]:
    from ray_lit.storage.sharded_io import save_sharded_checkpoint
    from ray_lit.strategies.fsdp import sharded_state_dicts

    strategy = FSDPStrategy(state_dict_type="sharded")
    strategy.connect(global_rank=rank, world_size=2, local_rank=rank, node_rank=0,
                     device=torch.device("cpu"))
    model = Blocks(seed=rank)
    strategy.setup_module(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(2):
        gen = torch.Generator().manual_seed(10 * step + rank)
        batch = torch.randn(4, 8, generator=gen), torch.randn(4, 1, generator=gen)
        strategy.call_step("training_step", batch).backward()
        opt.step()
        opt.zero_grad()
    with sharded_state_dicts(strategy):  # what save_sharded dumps: the local shards
        local = {"state_dict": strategy.lightning_module_state_dict(model),
                 "optimizer_states": [strategy.optimizer_state(opt)]}
    checkpoint = {"epoch": 3, "global_step": 2, "hyper_parameters": {"lr": 0.01}, **local}
    for target in (os.path.join(directory, "local.ckpt"),
                   "file://" + os.path.join(directory, "uri.ckpt")):
        save_sharded_checkpoint(checkpoint, target, strategy)
    # the reference: the gathered full state (COLLECTIVE, as state_dict_type="full" saves it)
    return {"full": strategy.lightning_module_state_dict(model),
            "full_optimizer": strategy.optimizer_state(opt),
            "local_numel": sum(t.to_local().numel() for t in local["state_dict"].values())}


def _on_rank(rank: int, port: int, directory: str, out: dict) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=120))
    try:
        out[rank] = _scenario_save(rank, directory)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_save(tmp_path_factory) -> tuple[str, dict[int, dict[str, Any]]]:
    import torch.multiprocessing as mp

    from ray_lit.worker.process_group import find_free_port

    directory = str(tmp_path_factory.mktemp("sharded"))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_on_rank, args=(find_free_port(), directory, out), nprocs=2,
                           start_method="spawn")
        return directory, dict(out)


def test_each_rank_writes_its_own_shards_in_the_standard_dcp_layout(two_rank_save) -> None:
    directory, out = two_rank_save
    path = os.path.join(directory, "local.ckpt")
    assert is_sharded_checkpoint(path)
    assert sorted(os.listdir(path)) == [DCP_METADATA, "__0_0.distcp", "__1_0.distcp", META_NAME]
    total = sum(t.numel() for t in out[0]["full"].values())
    assert out[0]["local_numel"] + out[1]["local_numel"] == total  # shards, not copies
    assert not [n for n in os.listdir(directory) if n.startswith(".")]  # no staging left
    # the user's own DCP tools read it: torch's dcp_to_torch_save, keys as documented
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, os.path.join(directory, "torch.pt"))
    raw = torch.load(os.path.join(directory, "torch.pt"), weights_only=True)
    torch.testing.assert_close(raw["state_dict"]["head.weight"], out[0]["full"]["head.weight"])
    assert set(raw["optimizer_states"]["0"]["state"]["0"]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("name", ["local.ckpt", "uri.ckpt"])
def test_a_plain_process_reads_the_shards_whole_equal_to_the_full_state(two_rank_save,
                                                                         name) -> None:
    directory, out = two_rank_save
    path = os.path.join(directory, name)
    source = path if name == "local.ckpt" else "file://" + path  # uploaded through pyarrow
    loaded = load_checkpoint(source)
    assert not torch.distributed.is_initialized()
    assert loaded["epoch"] == 3 and loaded["hyper_parameters"] == {"lr": 0.01}
    full, full_optimizer = out[0]["full"], out[0]["full_optimizer"]
    assert list(loaded["state_dict"]) == list(full)  # the module's key order too
    for key, value in full.items():
        assert type(loaded["state_dict"][key]) is torch.Tensor
        assert torch.equal(loaded["state_dict"][key], value), key
    (optimizer,) = loaded["optimizer_states"]
    assert optimizer["param_groups"] == full_optimizer["param_groups"]
    assert set(optimizer["state"]) == set(full_optimizer["state"])  # int parameter indices
    for idx, entry in full_optimizer["state"].items():
        for k, v in entry.items():
            assert torch.equal(optimizer["state"][idx][k], v), (idx, k)
    # the consolidated file is that same full checkpoint
    target = os.path.join(directory, f"{name}.consolidated")
    consolidate(source, target)
    again = load_checkpoint(target)
    assert all(torch.equal(again["state_dict"][k], v) for k, v in full.items())
    assert again.keys() == loaded.keys()


# --- a world of one: the whole ModelCheckpoint path in process ------------------------------------
class LitBlocks(pl.LightningModule):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        # decreasing by epoch: the newest checkpoint is the best, so top-k removes older ones
        self.log("score", -float(self.current_epoch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 8, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


# Not the shared ``fit`` fixture: an FSDP fit with a ModelCheckpoint (and resume).
def _fit(make_trainer, dirpath, max_epochs: int = 2, ckpt_path: str | None = None,
         state_dict_type: str = "sharded", strategy: Any = None
         ) -> tuple[LitBlocks, pl.Trainer, ModelCheckpoint]:
    torch.manual_seed(0)
    model = LitBlocks()
    checkpoint = ModelCheckpoint(dirpath=str(dirpath), monitor="score", save_top_k=1,
                                 save_last=True)
    trainer = make_trainer(strategy=strategy or FSDPStrategy(state_dict_type=state_dict_type),
                           max_epochs=max_epochs, callbacks=[checkpoint],
                           enable_checkpointing=True, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=_loader(),
                ckpt_path=ckpt_path)
    return model, trainer, checkpoint


@pytest.fixture
def sharded_run(make_trainer, tmp_path):
    return (*_fit(make_trainer, tmp_path / "ckpts"), tmp_path)


def test_model_checkpoint_writes_directories_keeps_top_k_and_last(sharded_run) -> None:
    model, trainer, checkpoint, tmp_path = sharded_run
    best = checkpoint.best_model_path
    assert best == str(tmp_path / "ckpts" / "epoch=1-step=8.ckpt")
    assert checkpoint.last_model_path == str(tmp_path / "ckpts" / "last.ckpt")
    # top-k removed epoch 0's directory; no staging directories remain
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["epoch=1-step=8.ckpt", "last.ckpt"]
    for path in (best, checkpoint.last_model_path):
        assert is_sharded_checkpoint(path)
        assert {DCP_METADATA, META_NAME, "__0_0.distcp"} == set(os.listdir(path))
    loaded = LitBlocks.load_from_checkpoint(best)  # a directory, read in this process
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    # validate(ckpt_path="best") reads the directory too
    assert trainer.validate(dataloaders=_loader(), ckpt_path="best", verbose=False)
    assert trainer.tested_ckpt_path == best


def test_sharded_and_full_checkpoints_hold_the_same_content(make_trainer, tmp_path) -> None:
    _, _, sharded = _fit(make_trainer, tmp_path / "sharded")
    _, _, full = _fit(make_trainer, tmp_path / "full", state_dict_type="full")
    assert os.path.isfile(full.best_model_path)
    a, b = load_checkpoint(sharded.best_model_path), load_checkpoint(full.best_model_path)
    # the same run, the same checkpoint: only the paths in the callback states differ
    assert set(a) == set(b)
    for key in ("epoch", "global_step", "hyper_parameters", "lr_schedulers"):
        assert a[key] == b[key], key
    for key, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], value)
    for idx, entry in b["optimizer_states"][0]["state"].items():
        for k, v in entry.items():
            assert torch.equal(a["optimizer_states"][0]["state"][idx][k], v)
    assert a["loops"]["progress"] == b["loops"]["progress"]


def test_resume_from_a_directory_continues_like_the_uninterrupted_run(make_trainer,
                                                                      tmp_path) -> None:
    whole, _, _ = _fit(make_trainer, tmp_path / "whole", max_epochs=3)
    _, _, first = _fit(make_trainer, tmp_path / "part", max_epochs=2)
    resumed, trainer, _ = _fit(make_trainer, tmp_path / "resumed", max_epochs=3,
                               ckpt_path=first.last_model_path)
    assert trainer.global_step == 12
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_full_and_sharded_checkpoints_are_interchangeable_at_load(make_trainer,
                                                                 tmp_path) -> None:
    whole, _, _ = _fit(make_trainer, tmp_path / "whole", max_epochs=3)
    # a one-device run's file resumes a sharded FSDP run, and its directory resumes a DDP-like
    # one-device run: the same weights as the uninterrupted sharded run either way
    _, _, plain = _fit(make_trainer, tmp_path / "plain", strategy="single_device")
    assert os.path.isfile(plain.last_model_path)
    from_file, _, _ = _fit(make_trainer, tmp_path / "from_file", max_epochs=3,
                           ckpt_path=plain.last_model_path)
    _, _, sharded = _fit(make_trainer, tmp_path / "sharded")
    from_dir, _, _ = _fit(make_trainer, tmp_path / "from_dir", max_epochs=3,
                          ckpt_path=sharded.last_model_path, strategy="single_device")
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(from_file.state_dict()[key], value)
        torch.testing.assert_close(from_dir.state_dict()[key], value)


def test_consolidate_function_and_command(sharded_run, capsys) -> None:
    model, _, checkpoint, tmp_path = sharded_run
    target = tmp_path / "out" / "model.ckpt"
    cli_main(["consolidate", checkpoint.best_model_path, str(target)])
    assert f"wrote {target}" in capsys.readouterr().out
    assert os.path.isfile(target)
    loaded = LitBlocks.load_from_checkpoint(str(target))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    # the real command line (`python -m ray_lit consolidate`), in a fresh interpreter
    second = tmp_path / "second.ckpt"
    done = subprocess.run([sys.executable, "-m", "ray_lit", "consolidate",
                           checkpoint.last_model_path, str(second)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert torch.equal(load_checkpoint(second)["state_dict"]["net.0.weight"],
                       load_checkpoint(checkpoint.last_model_path)["state_dict"]["net.0.weight"])


def test_the_script_runner_still_takes_scripts(tmp_path, monkeypatch) -> None:
    script = tmp_path / "consolidate_me.py"
    marker = tmp_path / "ran"
    script.write_text(f"import sys\nopen({str(marker)!r}, 'w').write(' '.join(sys.argv[1:]))\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    cli_main([str(script), "consolidate", "x"])
    assert marker.read_text() == "consolidate x"


# --- bad input ------------------------------------------------------------------------------------
def test_a_directory_without_metadata_is_refused_by_name(sharded_run) -> None:
    _, _, checkpoint, tmp_path = sharded_run
    os.remove(os.path.join(checkpoint.best_model_path, DCP_METADATA))
    with pytest.raises(CheckpointLoadError, match=r"no \.metadata \(the save did not finish"):
        LitBlocks.load_from_checkpoint(checkpoint.best_model_path)
    with pytest.raises(SystemExit, match="no .metadata"):
        cli_main(["consolidate", checkpoint.best_model_path, str(tmp_path / "x.ckpt")])
    empty = tmp_path / "empty.ckpt"
    empty.mkdir()
    with pytest.raises(CheckpointLoadError, match="not a complete sharded checkpoint"):
        load_checkpoint(empty)


def test_a_missing_shard_or_meta_file_is_refused_by_name(sharded_run) -> None:
    _, _, checkpoint, _ = sharded_run
    os.remove(os.path.join(checkpoint.best_model_path, "__0_0.distcp"))
    with pytest.raises(CheckpointLoadError, match="a shard file is missing"):
        load_checkpoint(checkpoint.best_model_path)
    os.remove(os.path.join(checkpoint.last_model_path, META_NAME))
    with pytest.raises(CheckpointLoadError, match="not one ray_lit wrote"):
        load_checkpoint(checkpoint.last_model_path)


def test_consolidate_refuses_a_file_a_missing_source_and_a_directory_target(sharded_run) -> None:
    _, _, checkpoint, tmp_path = sharded_run
    single = tmp_path / "single.ckpt"
    consolidate(checkpoint.best_model_path, single)
    with pytest.raises(MisconfigurationException, match="single-file checkpoint already"):
        consolidate(single, tmp_path / "again.ckpt")
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        consolidate(tmp_path / "missing.ckpt", tmp_path / "again.ckpt")
    with pytest.raises(MisconfigurationException, match="is a directory; pass a file path"):
        consolidate(checkpoint.best_model_path, checkpoint.last_model_path)
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        load_sharded_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointLoadError, match="is a file, not a sharded checkpoint"):
        load_sharded_checkpoint(single)


def test_a_full_file_and_a_sharded_directory_replace_each_other(sharded_run) -> None:
    _, _, checkpoint, _ = sharded_run
    last = checkpoint.last_model_path
    content = load_checkpoint(last)
    save_checkpoint(content, last)  # a run resumed with another strategy writes last.ckpt
    assert os.path.isfile(last)
    assert torch.equal(load_checkpoint(last)["state_dict"]["net.0.weight"],
                       content["state_dict"]["net.0.weight"])
    from ray_lit.storage.sharded_io import save_sharded_checkpoint
    from ray_lit.strategies.single_device import SingleDeviceStrategy

    save_sharded_checkpoint(content, last, SingleDeviceStrategy())  # and back
    assert is_sharded_checkpoint(last)
    assert load_checkpoint(last)["global_step"] == content["global_step"]
    assert not [n for n in os.listdir(os.path.dirname(last)) if n.startswith(".")]


def test_map_location_applies_to_a_directory(sharded_run) -> None:
    _, _, checkpoint, _ = sharded_run
    loaded = load_checkpoint(checkpoint.best_model_path,
                             map_location=lambda storage, location: storage)
    assert loaded["state_dict"]["net.0.weight"].device.type == "cpu"
    meta = load_checkpoint(checkpoint.best_model_path, map_location="meta")
    assert meta["state_dict"]["net.0.weight"].is_meta


def test_state_dict_type_is_validated_with_the_fix() -> None:
    with pytest.raises(MisconfigurationException, match="use 'full'.*or 'sharded'"):
        FSDPStrategy(state_dict_type="distributed")
    assert FSDPStrategy(state_dict_type="sharded").state_dict_type == "sharded"
