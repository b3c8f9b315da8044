"""``ray_lit.storage.filesystem`` on a local directory and on S3 (a moto server on 127.0.0.1)."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest
import torch

from ray_lit.errors import MisconfigurationException
from ray_lit.storage.checkpoint_io import load_checkpoint, save_checkpoint
from ray_lit.storage.filesystem import Storage, read_file, resolve, split, write_file


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server_mod = pytest.importorskip("moto.server")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_root(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<fresh bucket>`` on the local moto server, with dummy credentials."""
    boto3 = pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a metadata service
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    bucket = f"ray-lit-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(params=["local", "file", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path) -> Storage:
    """A local directory (served by ``os``), the same through ``pyarrow`` (a ``file://`` URI),
    and S3."""
    if request.param == "local":
        return Storage(str(tmp_path / "run"))
    if request.param == "file":
        return Storage(f"file://{tmp_path}/run")
    return Storage(request.getfixturevalue("s3_root") + "/run")


# --- resolve ---------------------------------------------------------------------------------
def test_resolve_local_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = resolve("some/dir")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "some" / "dir")


def test_resolve_file_uri(tmp_path):
    fs, path = resolve(f"file://{tmp_path}/x")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/x"


def test_resolve_s3_uses_endpoint_env(s3_root, moto_endpoint):
    fs, path = resolve(f"{s3_root}/a/b/")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == f"{s3_root[len('s3://'):]}/a/b"
    assert fs.get_file_info(path.split("/")[0]).type == pafs.FileType.Directory  # the bucket


def test_resolve_unknown_scheme_names_the_uri():
    with pytest.raises(MisconfigurationException, match="nosuch://x/y"):
        resolve("nosuch://x/y")


def test_split_keeps_uri_query_with_parent(tmp_path):
    assert split("s3://b/dir/f.ckpt?endpoint_override=h:1") == ("s3://b/dir?endpoint_override=h:1",
                                                                 "f.ckpt")
    assert split(str(tmp_path / "a.pt")) == (str(tmp_path), "a.pt")
    with pytest.raises(MisconfigurationException, match="names no file"):
        split("s3://bucket")


# --- the Storage API on both backends ----------------------------------------------------------
def test_write_read_exists_listdir_delete(storage: Storage):
    assert not storage.exists("a/b.bin")
    assert storage.listdir("a") == []
    storage.write_bytes("a/b.bin", b"hello")
    storage.write_bytes("a/c/d.bin", b"x")
    storage.write_bytes("a/0.bin", b"0")
    assert storage.read_bytes("a/b.bin") == b"hello"
    assert storage.exists("a/b.bin") and storage.exists("a/c")
    assert storage.listdir("a") == ["0.bin", "b.bin", "c"]
    storage.write_bytes("a/b.bin", b"replaced")
    assert storage.read_bytes("a/b.bin") == b"replaced"
    storage.delete("a/c")  # a directory, recursively
    assert storage.listdir("a") == ["0.bin", "b.bin"]
    storage.delete("a/b.bin")
    storage.delete("a/b.bin")  # missing: no error
    storage.delete("never/was")
    assert storage.listdir("a") == ["0.bin"]


def test_read_missing_raises_file_not_found_with_uri(storage: Storage):
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        storage.read_bytes("dir/nothing.bin")


def test_makedirs_and_uri(storage: Storage):
    storage.makedirs("x/y")
    storage.makedirs("x/y")  # idempotent
    assert storage.exists("x/y")
    assert storage.uri("x/y") == f"{storage.root}/x/y"
    assert storage.uri() == storage.root


def test_check_writable_passes_and_leaves_nothing(storage: Storage):
    storage.check_writable()
    assert storage.listdir() == []


def test_pickles_without_filesystem_and_resolves_again(storage: Storage):
    storage.write_bytes("f", b"1")  # resolved now
    clone = pickle.loads(pickle.dumps(storage))
    assert clone._resolved is None
    assert clone.root == storage.root
    assert clone.read_bytes("f") == b"1"


def test_checkpoint_round_trip(storage: Storage):
    state = {"state_dict": {"w": torch.arange(4.0)}, "epoch": 3}
    save_checkpoint(state, storage.uri("ckpts/epoch=3.ckpt"))
    loaded = load_checkpoint(storage.uri("ckpts/epoch=3.ckpt"))
    assert loaded["epoch"] == 3
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))
    assert storage.listdir("ckpts") == ["epoch=3.ckpt"]  # no temp file left behind


# --- local specifics ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "file"])
def test_local_edge_cases_match_pyarrow(tmp_path, kind):
    """The os-served local root behaves like pyarrow's local filesystem (``file://``)."""
    root = tmp_path / "run"
    storage = Storage(str(root) if kind == "local" else f"file://{root}")
    storage.write_bytes("a.ckpt", b"1")
    with pytest.raises(FileNotFoundError, match="a.ckpt/part"):  # a path through a file
        storage.read_bytes("a.ckpt/part")
    assert not storage.exists("a.ckpt/part")
    # a link to a directory: deleting it removes the link, never what it points to
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_bytes(b"k")
    os.symlink(tmp_path / "target", root / "link")
    storage.delete("link")
    assert not os.path.lexists(root / "link")
    assert (tmp_path / "target" / "keep").read_bytes() == b"k"


def test_a_path_that_cannot_be_examined_is_an_error_not_missing(tmp_path):
    """Retention must not skip what it cannot see (a permission error, a name too long)."""
    storage = Storage(str(tmp_path))
    with pytest.raises(OSError, match="too long"):
        storage.exists("x" * 300)
    with pytest.raises(OSError, match="too long"):
        storage.delete("x" * 300)


def test_a_local_directory_never_imports_pyarrow(tmp_path):
    """pyarrow's libraries cost every worker ~27 MiB resident: local runs must not load them."""
    code = f"""
import sys, torch
from ray_lit.storage.checkpoint_io import load_checkpoint, save_checkpoint
from ray_lit.storage.filesystem import Storage, read_file, write_file
import ray_lit.core.saving, ray_lit.checkpoint.writer, ray_lit.checkpoint.manager
s = Storage({str(tmp_path / "run")!r})
s.check_writable()
s.write_bytes("a/b", b"1"); assert s.read_bytes("a/b") == b"1" and s.listdir("a") == ["b"]
assert s.exists("a") and s.isdir("a") and not s.isdir("a/b")
s.delete("a")
save_checkpoint({{"w": torch.ones(2)}}, s.uri("x.ckpt")); assert load_checkpoint(s.uri("x.ckpt"))
write_file(s.uri("y"), b"2"); assert read_file(s.uri("y")) == b"2"
loaded = [m for m in sys.modules if m.startswith("pyarrow")]
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_relative_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = Storage("runs/r1")
    assert storage.root == str(tmp_path / "runs" / "r1")
    monkeypatch.chdir("/")  # a Ray worker's working directory differs
    storage.write_bytes("f", b"x")
    assert (tmp_path / "runs" / "r1" / "f").read_bytes() == b"x"


def test_local_write_is_atomic_when_it_fails(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    storage.write_bytes("f.bin", b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes("f.bin", b"new")
    assert (tmp_path / "f.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # the temp file was removed


def test_check_writable_names_path_and_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(MisconfigurationException, match="storage_path") as info:
        Storage(str(blocker / "sub")).check_writable()
    assert str(blocker / "sub") in str(info.value)


def test_read_and_write_file_helpers(tmp_path):
    write_file(tmp_path / "deep" / "er" / "x.txt", b"data")
    assert read_file(str(tmp_path / "deep" / "er" / "x.txt")) == b"data"
