"""Each rank reads only its own chunks of a sharded ``ModelCheckpoint`` directory (issue 16).

A 2-rank FSDP2 model (gloo, plain processes: no Ray needed to shard) with Adam state is saved
as a sharded checkpoint directory, locally and in S3 (moto). Two ranks then load it as
``fit(ckpt_path=...)`` does under ``FSDPStrategy`` (``checkpoint.shard_restore.lazy_checkpoint``:
meta file and DCP index only, then ``load_into_module`` / ``load_into_optimizer``) through a
``pyarrow.fs`` wrapper that counts the bytes each rank reads from the shard files: each reads
about half of them (exactly its own chunks at the same world size), and the restored module
and Adam state equal the saved ones. A 1-rank load of the same directory reads all of it.
The last test runs ``fit(ckpt_path=dir)`` with ``strategy="fsdp"`` in process and checks that
the Trainer took the lazy path.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.storage.sharded_io import DCP_METADATA, META_NAME

pytestmark = pytest.mark.ray


class _CountingFile:
    """A random-access file that adds every byte it returns to ``counts[name]``."""

    def __init__(self, inner, name: str, counts: dict) -> None:
        self.inner, self.name, self.counts = inner, name, counts
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read() if n is None or n < 0 else self.inner.read(n)
        self.counts[self.name] = self.counts.get(self.name, 0) + len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.inner.seek(pos, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
        self.inner.close()


class CountingHandler(pafs.FileSystemHandler):
    """A ``pyarrow.fs`` filesystem that counts the bytes read per file name."""

    def __init__(self, base: pafs.FileSystem) -> None:
        self.base = base
        self.counts: dict[str, int] = {}

    def get_type_name(self) -> str:
        return "counting"

    def normalize_path(self, path):
        return path

    def equals(self, other) -> bool:
        return self is other

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def open_input_file(self, path):
        name = path.rsplit("/", 1)[-1]
        return pa.PythonFile(_CountingFile(self.base.open_input_file(path), name, self.counts),
                             mode="r")

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def create_dir(self, path, recursive):
        raise OSError("read-only")

    def delete_dir(self, path):
        raise OSError("read-only")

    def delete_dir_contents(self, path, missing_dir_ok=False):
        raise OSError("read-only")

    def delete_root_dir_contents(self):
        raise OSError("read-only")

    def delete_file(self, path):
        raise OSError("read-only")

    def move(self, src, dest):
        raise OSError("read-only")

    def copy_file(self, src, dest):
        raise OSError("read-only")

    def open_output_stream(self, path, metadata):
        raise OSError("read-only")

    def open_append_stream(self, path, metadata):
        raise OSError("read-only")


class _Group:
    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world

    def barrier(self, name=None) -> None:
        if self.world_size > 1:
            dist.barrier()


def _model(seed: int, world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    return model, optimizer


def _full(state: dict) -> dict:
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v.clone() for k, v in state.items()}


def _filesystem(kind: str) -> tuple[pafs.FileSystem, str]:
    if kind == "local":
        return pafs.LocalFileSystem(), ""
    return pafs.S3FileSystem(endpoint_override=os.environ["TEST_S3_ENDPOINT"], scheme="http",
                             access_key="testing", secret_key="testing", region="us-east-1",
                             allow_delayed_open=True), ""


def _rank(rank: int, world: int, port: int, task: dict) -> None:
    from ray_lit.checkpoint.shard_restore import lazy_checkpoint
    from ray_lit.storage.sharded_io import save_sharded_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    if task["save"]:
        model, optimizer = _model(1, world)
        model(torch.randn(8, 64)).sum().backward()
        optimizer.step()
        checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [
            optimizer.state_dict()], "lr_schedulers": [], "epoch": 0, "global_step": 1}
        save_sharded_checkpoint(checkpoint, task["uri"], _Group(rank, world))
        saved = {"model": _full(model.state_dict()),
                 "exp_avg": [_full({"t": optimizer.state[p]["exp_avg"]})["t"]
                             for p in model.parameters()]}
        if rank == 0:
            torch.save(saved, task["saved"])
    model, optimizer = _model(2, world)  # other weights, no Adam state yet
    handler = CountingHandler(_filesystem(task["fs"])[0]) if task["fs"] != "uri" else None
    lazy = lazy_checkpoint(task["path"], filesystem=pafs.PyFileSystem(handler)
                           if handler is not None else None)  # None: resolved from the URI
    lazy["state_dict"].load_into_module(model)
    lazy["optimizer_states"][0].load_into_optimizer(optimizer)
    if world > 1:
        dist.barrier()
    saved = torch.load(task["saved"])
    restored = _full(model.state_dict())
    exp_avg = [_full({"t": optimizer.state[p]["exp_avg"]})["t"] for p in model.parameters()]
    equal = all(torch.equal(restored[k], v) for k, v in saved["model"].items()) and all(
        torch.equal(a, b) for a, b in zip(exp_avg, saved["exp_avg"]))
    with open(f"{task['out']}.{rank}", "w") as f:
        json.dump({"counts": handler.counts if handler else {}, "equal": equal}, f)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(world: int, task: dict) -> list[dict]:
    if world == 1:  # no process group: in this process
        _rank(0, 1, 0, task)
    else:
        mp.spawn(_rank, args=(world, _free_port(), task), nprocs=world, join=True)
    results = []
    for rank in range(world):
        with open(f"{task['out']}.{rank}") as f:
            results.append(json.load(f))
    return results


def _shard_bytes(listing: dict[str, int]) -> int:
    return sum(size for name, size in listing.items() if name.endswith(".distcp"))


def _check_halves(results: list[dict], total: int) -> None:
    print("shard bytes", total, "read per rank",
          [_shard_bytes(r["counts"]) for r in results])
    for result in results:
        assert result["equal"]
        read = _shard_bytes(result["counts"])
        # each rank's own chunks: half of the shard bytes (both ranks hold equal halves here)
        assert 0.4 * total <= read <= 0.6 * total, (read, total)
        assert result["counts"].get(DCP_METADATA, 0) > 0  # the index is read, by every rank


def test_each_rank_reads_only_its_chunks_of_a_local_directory(tmp_path) -> None:
    directory = str(tmp_path / "epoch=0-step=1.ckpt")
    task = {"save": True, "uri": directory, "path": directory, "fs": "local",
            "saved": str(tmp_path / "saved.pt"), "out": str(tmp_path / "two")}
    results = _run(2, task)
    files = {n: os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)}
    assert sorted(files) == sorted([DCP_METADATA, META_NAME, "__0_0.distcp", "__1_0.distcp"])
    _check_halves(results, _shard_bytes(files))
    # one rank (a plain process) needs every chunk: it reads all the shard bytes once
    (one,) = _run(1, {**task, "save": False, "out": str(tmp_path / "one")})
    assert one["equal"] and _shard_bytes(one["counts"]) == _shard_bytes(files)


@pytest.fixture
def s3_bucket(monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{endpoint}",
                       "TEST_S3_ENDPOINT": endpoint}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=f"http://{endpoint}").create_bucket(Bucket="ckpts")
    yield "ckpts"
    server.stop()


def test_each_rank_reads_only_its_chunks_from_s3(tmp_path, s3_bucket) -> None:
    task = {"save": True, "uri": f"s3://{s3_bucket}/run/last.ckpt",
            "path": f"{s3_bucket}/run/last.ckpt", "fs": "s3",
            "saved": str(tmp_path / "saved.pt"), "out": str(tmp_path / "two")}
    results = _run(2, task)
    s3, _ = _filesystem("s3")
    listing = {info.base_name: info.size for info in s3.get_file_info(
        pafs.FileSelector(f"{s3_bucket}/run/last.ckpt"))}
    assert "__1_0.distcp" in listing
    _check_halves(results, _shard_bytes(listing))
    # the s3:// URI itself (AWS_ENDPOINT_URL), as fit(ckpt_path=...) passes it: one rank
    (one,) = _run(1, {**task, "save": False, "fs": "uri", "path": task["uri"],
                      "out": str(tmp_path / "one")})
    assert one["equal"]


class Small(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.state_types: list[str] = []

    def on_load_checkpoint(self, checkpoint) -> None:
        self.state_types.append(type(checkpoint["state_dict"]).__name__)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_fit_ckpt_path_of_a_sharded_directory_loads_lazily_under_fsdp(tmp_path) -> None:
    from ray_lit.callbacks import ModelCheckpoint
    from ray_lit.strategies import FSDPStrategy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

    def fit(epochs: int, ckpt_path=None, strategy="fsdp"):
        pl.seed_everything(3)
        model = Small()
        trainer = pl.Trainer(max_epochs=epochs, strategy=strategy, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path), callbacks=[ModelCheckpoint(
                                 dirpath=str(tmp_path / "ckpts"), save_last=True)])
        if strategy != "fsdp":
            trainer.checkpoint_callback.dirpath = str(tmp_path / "other")
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, trainer

    first, trainer = fit(1, strategy=FSDPStrategy(state_dict_type="sharded"))
    last = trainer.checkpoint_callback.last_model_path
    assert os.path.isdir(last)
    resumed, resumed_trainer = fit(2, ckpt_path=last)
    assert resumed.state_types == ["ShardedModuleState"]  # the Trainer read it lazily
    assert resumed_trainer.global_step == 8
    reference, _ = fit(2)  # the same two epochs without interruption
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


if __name__ == "__main__":  # the spawned ranks import this module by path
    sys.exit(0)
