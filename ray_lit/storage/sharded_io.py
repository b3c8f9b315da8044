"""Sharded checkpoints: one ``torch.distributed.checkpoint`` (DCP) directory per checkpoint.

A sharded checkpoint keeps the name a file would have (``epoch=1-step=20.ckpt`` is a directory)
and holds::

    .metadata             DCP's index of every tensor and where its chunks are (rank 0)
    __<rank>_0.distcp     each rank's own shards of the module and optimizer tensors
    ray_lit_meta.ckpt     the rest of the checkpoint (epoch, global_step, callbacks, hparams,
                          loops, optimizer param_groups, non-tensor state): torch.save, rank 0

The DCP keys are ``state_dict.<module key>`` and
``optimizer_states.<i>.state.<parameter index>.<name>`` (``exp_avg``, ``step``...), the same
nesting as a full checkpoint, in DCP's standard layout: ``torch.distributed.checkpoint.load``
and ``format_utils.dcp_to_torch_save`` read it as they read any DCP directory. Only tensors go
to DCP: its non-tensor entries would be unpickled with code execution allowed, and ray_lit never
runs code from a checkpoint (``storage.checkpoint_io``).

Reading (``load_sharded_checkpoint``) needs no process group: every tensor is read whole from
the chunks of all ranks, so the result is exactly the full checkpoint a ``state_dict_type="full"``
run writes, and it loads anywhere (a plain process, DDP, FSDP at any world size).

Storage: a local directory is written in a hidden staging directory beside the target and
renamed over it when complete, so a reader sees the old checkpoint or the new one. A local path
must be one filesystem for every rank (one machine, or a shared mount). For a URI (``s3://``,
``gs://``, ``file://``...) each rank writes its shards to a local temporary directory and
uploads them; rank 0 uploads ``.metadata`` last, after every rank's upload: a directory without
``.metadata`` is incomplete and refused on load. Overwriting a URI checkpoint (``last.ckpt``)
deletes the old one first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ray_lit.errors import MisconfigurationException
from ray_lit.storage.checkpoint_io import (
    CheckpointLoadError,
    checkpoint_from_bytes,
    checkpoint_to_bytes,
    save_checkpoint,
)
from ray_lit.storage.filesystem import Storage, resolve, split

__all__ = ["DCP_METADATA", "META_NAME", "SHARDED_MARKER", "consolidate_checkpoint", "dcp_reader",
           "is_sharded_checkpoint", "load_into", "load_sharded_checkpoint", "local_directory",
           "merge_checkpoint", "read_meta", "read_sharded_tensors", "save_sharded_checkpoint",
           "split_checkpoint"]

DCP_METADATA = ".metadata"
META_NAME = "ray_lit_meta.ckpt"
FORMAT_VERSION = 1
_MARKER = "ray_lit_sharded"  # in the meta file: the format and what went to DCP
# the same key, for the fault-tolerance writer: in a rank 0 part it also names the DCP
# directory (``dcp_dir``) beside the part
SHARDED_MARKER = _MARKER
_TENSOR_KEYS = ("state_dict", "optimizer_states")


class RankGroup(Protocol):
    """What the writer needs of the ranks (a ``Strategy`` has it)."""

    global_rank: int
    world_size: int

    def barrier(self, name: str | None = None) -> None: ...


def _is_uri(path: str) -> bool:
    return "://" in path


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` (local or URI) is a directory, i.e. a sharded checkpoint, complete or
    not (``load_sharded_checkpoint`` says what is missing)."""
    parent, name = split(path)
    return Storage(parent).isdir(name)


# --- split and merge ------------------------------------------------------------------------------
def split_checkpoint(checkpoint: dict[str, Any], world_size: int
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, meta)``: the module's and optimizers' tensors for DCP, the rest for the
    meta file (with a record of the order of the module's keys)."""
    meta = {k: v for k, v in checkpoint.items() if k not in _TENSOR_KEYS}
    module_state = checkpoint.get("state_dict", {})
    tensors: dict[str, Any] = {
        "state_dict": {k: v for k, v in module_state.items() if isinstance(v, torch.Tensor)}}
    meta["state_dict"] = {k: v for k, v in module_state.items()
                          if not isinstance(v, torch.Tensor)}
    meta[_MARKER] = {"format": FORMAT_VERSION, "world_size": world_size,
                     "state_dict_keys": list(module_state)}
    if "optimizer_states" in checkpoint:
        tensors["optimizer_states"] = {}
        meta["optimizer_states"] = []
        for i, optimizer in enumerate(checkpoint["optimizer_states"]):
            dcp_state: dict[str, Any] = {}
            rest_state: dict[Any, Any] = {}
            for idx, entry in optimizer.get("state", {}).items():
                # DCP keys are strings; the index comes back as the int it was
                dcp_state[str(idx)] = {k: v for k, v in entry.items()
                                       if isinstance(v, torch.Tensor)}
                rest_state[idx] = {k: v for k, v in entry.items()
                                   if not isinstance(v, torch.Tensor)}
            tensors["optimizer_states"][str(i)] = {"state": dcp_state}
            meta["optimizer_states"].append({**{k: v for k, v in optimizer.items()
                                                if k != "state"}, "state": rest_state})
    return tensors, meta


def merge_checkpoint(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The full checkpoint again from ``split_checkpoint``'s two parts."""
    checkpoint = {k: v for k, v in meta.items() if k not in (_MARKER, *_TENSOR_KEYS)}
    marker = meta[_MARKER]
    module_tensors = tensors.get("state_dict", {})
    rest = meta.get("state_dict", {})
    checkpoint["state_dict"] = {k: module_tensors[k] if k in module_tensors else rest[k]
                                for k in marker["state_dict_keys"]}
    if "optimizer_states" in meta:
        optimizer_tensors = tensors.get("optimizer_states", {})
        checkpoint["optimizer_states"] = []
        for i, optimizer in enumerate(meta["optimizer_states"]):
            dcp_state = optimizer_tensors.get(str(i), {}).get("state", {})
            state = {idx: {**entry, **dcp_state.get(str(idx), {})}
                     for idx, entry in optimizer["state"].items()}
            checkpoint["optimizer_states"].append({**optimizer, "state": state})
    return checkpoint


# --- save (every rank) ----------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns that it assumes one process when none is initialised: that is the intent here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _dcp_save(tensors: dict[str, Any], directory: str, group: RankGroup) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    no_dist = group.world_size == 1 or not (dist.is_available() and dist.is_initialized())
    with _quiet_single_process():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(directory), no_dist=no_dist)


def save_sharded_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike,
                            group: RankGroup) -> None:
    """Write ``checkpoint`` as a sharded checkpoint directory at ``path``.

    COLLECTIVE: every rank calls it at the same point with its own ``checkpoint`` (its module
    and optimizer tensors, DTensor shards under FSDP, or whole tensors); rank 0's non-tensor
    content is the one kept. Each rank writes its own shards; rank 0 the meta file and DCP's
    ``.metadata``.

    Args:
        checkpoint: the checkpoint dict (``loop.checkpoint_state.dump_checkpoint``).
        path: the directory, a local path or a storage URI (see the module docstring).
        group: the ranks (the run's strategy): ``global_rank``, ``world_size``, ``barrier``.
    """
    target = os.fspath(path)
    tensors, meta = split_checkpoint(checkpoint, group.world_size)
    if _is_uri(target):
        _save_remote(tensors, meta, target, group)
    else:
        _save_local(tensors, meta, os.path.abspath(os.path.expanduser(target)), group)


def _save_local(tensors: dict[str, Any], meta: dict[str, Any], target: str,
                group: RankGroup) -> None:
    parent, name = os.path.split(target)
    staging = os.path.join(parent, f".{name}.partial")
    if group.global_rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a crashed save's leftovers
        os.makedirs(staging)
        save_checkpoint(meta, os.path.join(staging, META_NAME))
    group.barrier()  # the staging directory exists (and is empty of old shards) on every rank
    _dcp_save(tensors, staging, group)  # rank 0 writes .metadata once every shard is written
    if group.global_rank == 0:
        _replace(staging, target)


def _replace(staging: str, target: str) -> None:
    """Put the complete ``staging`` directory at ``target`` (a directory cannot be renamed over
    a non-empty one: the old one steps aside first and is removed after)."""
    parent, name = os.path.split(target)
    old = os.path.join(parent, f".{name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(target):
        os.replace(target, old)
    os.replace(staging, target)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    elif os.path.lexists(old):
        os.remove(old)


def _save_remote(tensors: dict[str, Any], meta: dict[str, Any], target: str,
                 group: RankGroup) -> None:
    import pyarrow.fs as pafs

    fs, inner = resolve(target)
    local = tempfile.mkdtemp(prefix="ray_lit_dcp_")
    try:
        if group.global_rank == 0:
            Storage(target).delete("")  # an older checkpoint of this name (last.ckpt)
            save_checkpoint(meta, os.path.join(local, META_NAME))
        group.barrier()  # the old one is gone before anyone uploads
        _dcp_save(tensors, local, group)
        fs.create_dir(inner, recursive=True)
        last = [n for n in os.listdir(local) if n == DCP_METADATA]
        for file in sorted(set(os.listdir(local)) - set(last)):
            pafs.copy_files(os.path.join(local, file), f"{inner}/{file}",
                            destination_filesystem=fs)
        group.barrier()  # every rank's shards are up: .metadata may declare them
        for file in last:
            pafs.copy_files(os.path.join(local, file), f"{inner}/{file}",
                            destination_filesystem=fs)
    finally:
        shutil.rmtree(local, ignore_errors=True)


# --- load (any process, no process group) ---------------------------------------------------------
def load_sharded_checkpoint(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    """The full checkpoint of a sharded checkpoint directory, in this process.

    Needs no process group: every tensor is assembled whole from the shards of all ranks, so
    the result equals what ``state_dict_type="full"`` would have written (and loads at any
    world size). Memory: the full checkpoint, once.

    Args:
        path: the directory, local or a storage URI (downloaded to a temporary directory).
        map_location: as in ``torch.load``; default: CPU tensors.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointLoadError: ``path`` is not a complete sharded checkpoint written by ray_lit
            (no ``.metadata``: the save did not finish; no ``ray_lit_meta.ckpt``; a shard file
            missing or corrupt).
    """
    name = os.fspath(path)
    if not _is_uri(name):
        local = os.path.abspath(os.path.expanduser(name))
        if not os.path.exists(local):
            raise FileNotFoundError(f"Checkpoint not found: {name}")
        return _load_local(local, map_location, name)
    import pyarrow.fs as pafs

    fs, inner = resolve(name)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"Checkpoint not found: {name}")
    with tempfile.TemporaryDirectory(prefix="ray_lit_dcp_") as local:
        pafs.copy_files(inner, local, source_filesystem=fs)
        return _load_local(local, map_location, name)


def _load_local(directory: str, map_location: Any, name: str) -> dict[str, Any]:
    if not os.path.isdir(directory):
        raise CheckpointLoadError(
            f"{name} is a file, not a sharded checkpoint directory: load it with "
            "load_checkpoint / load_from_checkpoint, which read both kinds.")
    if not os.path.isfile(os.path.join(directory, DCP_METADATA)):
        raise CheckpointLoadError(
            f"{name} is a directory but not a complete sharded checkpoint: it has no "
            f"{DCP_METADATA} (the save did not finish, or files were lost). Resume from another "
            "checkpoint (ModelCheckpoint keeps the previous ones until a new one is complete).")
    if not os.path.isfile(os.path.join(directory, META_NAME)):
        raise CheckpointLoadError(
            f"{name} is a torch.distributed.checkpoint directory but not one ray_lit wrote (no "
            f"{META_NAME} with the epoch, hparams and loop state). Load it with "
            "torch.distributed.checkpoint yourself, or write it with ModelCheckpoint and "
            "FSDPStrategy(state_dict_type='sharded').")
    with open(os.path.join(directory, META_NAME), "rb") as src:
        meta = checkpoint_from_bytes(src.read(), name=f"{name}/{META_NAME}")
    if not isinstance(meta, dict) or _MARKER not in meta:
        raise CheckpointLoadError(f"{name}/{META_NAME} is not ray_lit's sharded checkpoint "
                                  "metadata; the directory was not written by ray_lit.")
    tensors = read_tensors(directory, name)
    checkpoint = merge_checkpoint(tensors, meta)
    if map_location is None or (isinstance(map_location, (str, torch.device))
                                and torch.device(map_location).type == "cpu"):
        return checkpoint
    # any other map_location (a device, a dict, a function) exactly as torch.load applies it
    return checkpoint_from_bytes(checkpoint_to_bytes(checkpoint), map_location, name=name)


class _ArrowFileSystem:
    """DCP's ``FileSystemBase`` (the part a reader uses) over a ``pyarrow.fs`` filesystem:
    every file is opened for random access, so DCP's reader fetches only the byte ranges
    (chunks) its load plan names (ranged GETs on object stores), never whole files."""

    def __init__(self, filesystem: Any) -> None:
        self.filesystem = filesystem

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        if mode != "rb":
            raise ValueError(f"read-only filesystem (mode {mode!r})")
        with self.filesystem.open_input_file(str(path)) as stream:
            yield stream

    def concat_path(self, path: Any, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path: Any) -> str:
        return str(path)

    def exists(self, path: Any) -> bool:
        import pyarrow.fs as pafs

        return self.filesystem.get_file_info(str(path)).type != pafs.FileType.NotFound


def _ranged_reader_class() -> type:
    import io

    import torch.distributed.checkpoint as dcp

    class RangedReader(dcp.FileSystemReader):
        """DCP's reader that fetches each chunk it loads with ONE read of exactly its byte
        range (``torch.load`` on a view of the file would issue many small reads, each a
        request on an object store, and re-read the chunk's zip directory)."""

        def _slice_file(self, file: Any, sinfo: Any) -> Any:
            file.seek(sinfo.offset)
            return io.BytesIO(file.read(sinfo.length))

    return RangedReader


def dcp_reader(location: str, filesystem: Any = None) -> Any:
    """A DCP ``StorageReader`` of the DCP directory ``location`` that reads only the chunks a
    load asks for: DCP's ``FileSystemReader`` for a local path, the same reader over
    ``pyarrow.fs`` (``_ArrowFileSystem``) for a URI or when ``filesystem`` (a ``pyarrow.fs``
    filesystem serving ``location``, e.g. a wrapper in tests) is given."""
    reader_class = _ranged_reader_class()
    if filesystem is None and not _is_uri(location):
        return reader_class(os.path.abspath(os.path.expanduser(location)))
    fs, inner = (filesystem, location) if filesystem is not None else resolve(location)
    reader = reader_class(inner)
    reader.fs = _ArrowFileSystem(fs)  # type: ignore[assignment]
    reader.path = inner  # type: ignore[assignment]
    return reader


def read_metadata(directory: str, name: str, filesystem: Any = None) -> Any:
    """DCP's ``Metadata`` of a DCP directory (its index of tensors and chunks): a local path,
    a URI, or a path inside ``filesystem``."""
    reader = dcp_reader(directory, filesystem)
    if not reader.fs.exists(reader.fs.concat_path(reader.path, DCP_METADATA)):
        raise CheckpointLoadError(
            f"{name} has no {DCP_METADATA}: the save did not finish, or files were lost. "
            "Resume from another checkpoint.")
    try:
        return reader.read_metadata()
    except OSError:
        raise  # an I/O error: the caller may retry
    except Exception as err:  # truncated or foreign .metadata: DCP raises many kinds
        raise CheckpointLoadError(
            f"{name}/{DCP_METADATA} cannot be read ({type(err).__name__}: {err}); the "
            "checkpoint is corrupt. Resume from another checkpoint.") from err


def load_into(targets: dict[str, Any], directory: str, name: str,
              filesystem: Any = None) -> None:
    """Fill ``targets`` (nested dicts of tensors, DCP's keys) in place from the DCP directory
    (a local path, a URI, or a path inside ``filesystem``), without a process group: a
    DTensor reads only the chunks that overlap its own shard (whatever world size wrote
    them), a plain tensor the whole tensor. Only those chunks' byte ranges are read
    (``dcp_reader``).

    Raises:
        OSError: reading a file failed (the caller may retry).
        CheckpointLoadError: a shard file is missing or truncated, or the index is corrupt.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_metadata(directory, name, filesystem)
    reader = dcp_reader(directory, filesystem)
    try:
        with _quiet_single_process():
            dcp.load(targets, storage_reader=reader, no_dist=True)
    except CheckpointException as wrapped:
        # DCP wraps every error in CheckpointException, a BaseException: an I/O error
        # goes back to the caller as itself (retried there), anything else is corruption
        err = next((exc for exc, _ in wrapped.failures.values()), wrapped)
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            raise err from wrapped
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointLoadError(
            f"Sharded checkpoint {name} is incomplete or corrupt: a shard file is missing or "
            f"truncated ({cause}). Resume from another checkpoint.") from wrapped
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointLoadError(
            f"Sharded checkpoint {name} cannot be read ({type(err).__name__}: {err}). Resume "
            "from another checkpoint.") from err


def read_meta(path: str, filesystem: Any = None) -> dict[str, Any]:
    """The meta file (``ray_lit_meta.ckpt``: everything but the tensors) of the sharded
    checkpoint directory ``path`` (local, URI, or a path inside ``filesystem``), checked like
    ``load_sharded_checkpoint`` checks it. Reads no shard file.

    Raises:
        CheckpointLoadError: no ``.metadata`` or no meta file, or a meta file ray_lit did not
            write.
    """
    reader = dcp_reader(path, filesystem)
    fs = reader.fs
    if not fs.exists(fs.concat_path(reader.path, DCP_METADATA)):
        raise CheckpointLoadError(
            f"{path} is a directory but not a complete sharded checkpoint: it has no "
            f"{DCP_METADATA} (the save did not finish, or files were lost). Resume from another "
            "checkpoint (ModelCheckpoint keeps the previous ones until a new one is complete).")
    meta_path = fs.concat_path(reader.path, META_NAME)
    if not fs.exists(meta_path):
        raise CheckpointLoadError(
            f"{path} is a torch.distributed.checkpoint directory but not one ray_lit wrote (no "
            f"{META_NAME} with the epoch, hparams and loop state).")
    with fs.create_stream(meta_path, "rb") as src:
        meta = checkpoint_from_bytes(src.read(), name=f"{path}/{META_NAME}")
    if not isinstance(meta, dict) or _MARKER not in meta:
        raise CheckpointLoadError(f"{path}/{META_NAME} is not ray_lit's sharded checkpoint "
                                  "metadata; the directory was not written by ray_lit.")
    return meta


@contextlib.contextmanager
def local_directory(path: str) -> Iterator[str]:
    """``path`` as a local directory: itself when local, else a temporary download of it
    (removed on exit)."""
    if not _is_uri(path):
        yield os.path.abspath(os.path.expanduser(path))
        return
    import pyarrow.fs as pafs

    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    with tempfile.TemporaryDirectory(prefix="ray_lit_dcp_") as local:
        pafs.copy_files(inner, local, source_filesystem=fs)
        yield local


def read_sharded_tensors(path: str) -> dict[str, Any]:
    """Every tensor of the DCP directory ``path`` (local or URI), whole, nested as saved (no
    process group)."""
    with local_directory(path) as directory:
        return read_tensors(directory, path)


def read_tensors(directory: str, name: str) -> dict[str, Any]:
    """Every tensor of the local DCP directory, whole, nested as saved (no process group)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(directory, name)
    flat = {key: torch.empty(item.size, dtype=item.properties.dtype)
            for key, item in metadata.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)}
    load_into(flat, directory, name)
    nested: dict[str, Any] = {}
    paths = metadata.planner_data or {}
    for key, tensor in flat.items():
        where = paths.get(key, tuple(key.split(".", 1)))
        node = nested
        for part in where[:-1]:
            node = node.setdefault(str(part), {})
        node[str(where[-1])] = tensor
    return nested


# --- consolidate ----------------------------------------------------------------------------------
def consolidate_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Write the sharded checkpoint directory ``src`` as one ordinary checkpoint file ``dst``.

    Runs in any process (no process group, no Ray). The file is what
    ``FSDPStrategy(state_dict_type="full")`` would have written at the same point:
    ``load_from_checkpoint`` and ``Trainer.fit(ckpt_path=...)`` read it anywhere.

    Args:
        src: the sharded checkpoint directory (local path or storage URI).
        dst: the file to write (local path or storage URI), atomically.

    Returns:
        ``dst`` as a string.

    Raises:
        FileNotFoundError: nothing at ``src``.
        MisconfigurationException: ``src`` is a file (already consolidated), ``dst`` is an
            existing directory, or ``src`` is not a complete sharded checkpoint
            (``CheckpointLoadError``).
    """
    source, target = os.fspath(src), os.fspath(dst)
    if not is_sharded_checkpoint(source):
        parent, name = split(source)
        if Storage(parent).exists(name):
            raise MisconfigurationException(
                f"{source} is a file: it is a single-file checkpoint already (nothing to "
                "consolidate). Load it as it is, or pass a sharded checkpoint directory.")
        raise FileNotFoundError(f"Checkpoint not found: {source}")
    if is_sharded_checkpoint(target):
        raise MisconfigurationException(
            f"The destination {target} is a directory; pass a file path such as "
            f"{target.rstrip('/')}/model.ckpt.")
    save_checkpoint(load_sharded_checkpoint(source), target)
    return target
