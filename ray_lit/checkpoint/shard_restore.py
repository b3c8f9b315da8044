"""Restoring a sharded fault-tolerance checkpoint: each rank reads only its own shards.

A sharded fault-tolerance checkpoint (``FSDPStrategy``, ``checkpoint.writer``) is rank 0's part
file (everything but the module's and optimizers' tensors) plus a DCP directory beside it.
``restore_checkpoint`` turns the part into the checkpoint dict the loop restores from:

* for ``FSDPStrategy`` (``lazy``), the module state and each optimizer state are placeholders
  (``ShardedModuleState``, ``ShardedOptimizerState``: dicts of the non-tensor entries) that
  ``FSDPStrategy.load_model_state_dict`` / ``load_optimizer_state_dict`` fill on every rank
  after sharding, reading only the chunks that overlap the rank's own DTensor shards
  (resharding for any world size; nothing is gathered, no process group is used);
* for any other strategy (a rerun with ``strategy="ddp"``), the tensors are read whole, so the
  dict is exactly the full checkpoint.

``lazy_checkpoint`` gives the same lazy dict for a ``ModelCheckpoint`` sharded directory
(``fit(ckpt_path=...)`` under ``FSDPStrategy``; the driver reads only the meta file and DCP's
index). Reads are ranged: only the byte ranges of the chunks a rank needs, from a local
directory or straight from object storage (``storage.sharded_io.dcp_reader``).

Hooks that read ``checkpoint["state_dict"]`` (``on_load_checkpoint``) see only its
non-tensor entries with a lazy restore (and, from ``lazy_checkpoint``, meta-device tensors of
the saved shapes). Every read is retried like the writes
(``storage/retry.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from ray_lit.storage.retry import StorageRetry
from ray_lit.storage.sharded_io import (
    SHARDED_MARKER,
    load_into,
    merge_checkpoint,
    read_sharded_tensors,
)

__all__ = ["ShardedModuleState", "ShardedOptimizerState", "ShardSource", "lazy_checkpoint",
           "restore_checkpoint", "sharded_dir"]


def sharded_dir(part: dict[str, Any]) -> str | None:
    """The DCP directory's name (beside the part) of a sharded fault-tolerance checkpoint's
    rank 0 part; None for a full-state part."""
    marker = part.get(SHARDED_MARKER) if isinstance(part, dict) else None
    return marker.get("dcp_dir") if isinstance(marker, dict) else None


class ShardSource:
    """A DCP directory (local path or URI) read with a retry policy. Nothing is downloaded:
    each load reads only the byte ranges of the chunks it needs (``sharded_io.dcp_reader``:
    ranged reads through ``pyarrow.fs`` for a URI). Picklable (the driver sends one to the
    workers inside a lazy ``ckpt_path`` checkpoint).

    Args:
        uri: the directory.
        retry: the retry policy of every read (None: one try).
        filesystem: a ``pyarrow.fs`` filesystem serving ``uri`` (a path inside it), instead
            of resolving ``uri``; for wrappers (tests count the bytes read through one).
    """

    def __init__(self, uri: str, retry: StorageRetry | None = None,
                 filesystem: Any = None) -> None:
        self.uri = uri
        self.retry = retry or StorageRetry(0)
        self.filesystem = filesystem
        self._metadata: Any = None

    def metadata(self) -> Any:
        """DCP's ``Metadata`` of the directory (read once)."""
        if self._metadata is None:
            from ray_lit.storage.sharded_io import read_metadata

            self._metadata = self.retry.call(
                lambda: read_metadata(self.uri, self.uri, self.filesystem),
                what="checkpoint read", uri=self.uri)
        return self._metadata

    def load_into(self, targets: dict[str, Any]) -> None:
        """``targets`` filled in place (``sharded_io.load_into``), retried on I/O errors."""
        self.retry.call(lambda: load_into(targets, self.uri, self.uri, self.filesystem),
                        what="checkpoint read", uri=self.uri)

    def keys(self) -> dict[str, tuple]:
        """Every tensor's DCP key and its path in the saved nesting."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = self.metadata()
        paths = metadata.planner_data or {}
        return {key: tuple(str(p) for p in paths.get(key, tuple(key.split(".", 1))))
                for key, item in metadata.state_dict_metadata.items()
                if isinstance(item, TensorStorageMetadata)}

    def close(self) -> None:
        """Nothing to release (kept for callers of the downloading version)."""


class ShardedModuleState(dict):
    """``checkpoint["state_dict"]`` of a lazy sharded restore: the module's non-tensor entries;
    ``load_into_module`` reads the tensors into the module's own (sharded) parameters."""

    def __init__(self, rest: dict[str, Any], source: ShardSource) -> None:
        super().__init__(rest)
        self.source = source

    def load_into_module(self, module: torch.nn.Module, strict: bool = True) -> Any:
        """Every rank, after sharding: each parameter and buffer of ``module`` reads the
        chunks of its own shard (a plain tensor: the whole tensor). Returns what
        ``load_state_dict`` returns."""
        saved = {path[1] for path in self.source.keys().values()
                 if len(path) == 2 and path[0] == "state_dict"}
        current = {k: v for k, v in module.state_dict().items()
                   if isinstance(v, torch.Tensor) and k in saved}
        targets = {"state_dict": current}
        self.source.load_into(targets)
        return module.load_state_dict({**dict(self), **targets["state_dict"]}, strict=strict)


class ShardedOptimizerState(dict):
    """One entry of ``checkpoint["optimizer_states"]`` of a lazy sharded restore: the
    optimizer's non-tensor state and ``param_groups``; ``load_into_optimizer`` reads each
    state tensor shaped like this rank's shard of its parameter."""

    def __init__(self, rest: dict[str, Any], index: int, source: ShardSource) -> None:
        super().__init__(rest)
        self.index = index
        self.source = source

    def load_into_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Every rank, after the optimizer is built over the sharded parameters."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        from torch.distributed.tensor import DTensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        indices = [i for group in self["param_groups"] for i in group["params"]]
        by_index = {str(i): p for i, p in zip(indices, params)}
        original = {str(i): i for i in self.get("state", {})}
        items = self.source.metadata().state_dict_metadata
        targets: dict[str, dict[str, torch.Tensor]] = {}
        for key, path in self.source.keys().items():
            if len(path) != 5 or path[:3] != ("optimizer_states", str(self.index), "state"):
                continue
            idx, name = path[3], path[4]
            item = items[key]
            assert isinstance(item, TensorStorageMetadata)
            param = by_index.get(idx)
            if isinstance(param, DTensor) and tuple(item.size) == tuple(param.shape):
                target = torch.empty_like(param, dtype=item.properties.dtype)
            else:  # a step counter, or a parameter that is not sharded
                device = param.device if param is not None and not isinstance(
                    param, DTensor) else "cpu"
                target = torch.empty(item.size, dtype=item.properties.dtype, device=device)
            targets.setdefault(idx, {})[name] = target
        nested = {"optimizer_states": {str(self.index): {"state": targets}}}
        self.source.load_into(nested)
        state = {original.get(idx, int(idx) if idx.isdigit() else idx):
                 {**self.get("state", {}).get(original.get(idx), {}), **loaded}
                 for idx, loaded in targets.items()}
        for idx, rest in self.get("state", {}).items():
            state.setdefault(idx, dict(rest))
        optimizer.load_state_dict({"state": state, "param_groups": self["param_groups"]})


def restore_checkpoint(part: dict[str, Any], dcp_uri: str, lazy: bool,
                       retry: StorageRetry | None = None,
                       source: ShardSource | None = None) -> dict[str, Any]:
    """The checkpoint dict of a sharded fault-tolerance checkpoint (every rank of the new
    attempt calls it with rank 0's part).

    Args:
        part: rank 0's part (loaded).
        dcp_uri: the DCP directory beside it.
        lazy: placeholders that the strategy fills with each rank's own shards
            (``FSDPStrategy``); False: every tensor read whole now.
        retry: the retry policy of the reads.
        source: the directory's reader, when the caller built one already.
    """
    source = source or ShardSource(dcp_uri, retry)
    if not lazy:
        tensors = source.retry.call(lambda: read_sharded_tensors(dcp_uri),
                                    what="checkpoint read", uri=dcp_uri)
        return merge_checkpoint(tensors, part)
    checkpoint = {k: v for k, v in part.items()
                  if k not in (SHARDED_MARKER, "state_dict", "optimizer_states")}
    checkpoint["state_dict"] = ShardedModuleState(part.get("state_dict", {}), source)
    if "optimizer_states" in part:
        checkpoint["optimizer_states"] = [ShardedOptimizerState(opt, i, source)
                                          for i, opt in enumerate(part["optimizer_states"])]
    return checkpoint


def lazy_checkpoint(path: str, retry: StorageRetry | None = None,
                    filesystem: Any = None) -> dict[str, Any]:
    """A ``ModelCheckpoint`` sharded directory (``FSDPStrategy(state_dict_type="sharded")``)
    as a lazy checkpoint dict, for ``fit(ckpt_path=...)`` / ``resume=`` under a sharding
    strategy: only the meta file and DCP's ``.metadata`` are read (on the driver); every rank
    then reads only the chunks that overlap its own shards when ``FSDPStrategy`` loads the
    module and optimizer state (``ShardedModuleState`` / ``ShardedOptimizerState``).

    ``checkpoint["state_dict"]`` also holds, for each saved tensor, a meta-device tensor of
    its shape and dtype (no data), so the driver's checks of keys and shapes work as with a
    full checkpoint; the module's own tensors replace them when loading.

    Args:
        path: the directory (local path or URI).
        retry: the retry policy of every read.
        filesystem: a ``pyarrow.fs`` filesystem serving ``path`` (see ``ShardSource``).

    Raises:
        CheckpointLoadError: not a complete sharded checkpoint written by ray_lit.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ray_lit.storage.sharded_io import read_meta

    retry = retry or StorageRetry(0)
    meta = retry.call(lambda: read_meta(path, filesystem), what="checkpoint read", uri=path)
    source = ShardSource(path, retry, filesystem)
    items = source.metadata().state_dict_metadata
    checkpoint = restore_checkpoint(meta, path, lazy=True, retry=retry, source=source)
    state = checkpoint["state_dict"]
    order = meta[SHARDED_MARKER].get("state_dict_keys", [])
    for key, where in source.keys().items():
        item = items[key]
        if len(where) == 2 and where[0] == "state_dict" and isinstance(
                item, TensorStorageMetadata):
            state[where[1]] = torch.empty(item.size, dtype=item.properties.dtype,
                                          device="meta")
    # the saved order of the module's keys (on_load_checkpoint hooks may iterate it)
    ordered = {k: state[k] for k in order if k in state}
    ordered.update({k: v for k, v in state.items() if k not in ordered})
    state.clear()
    state.update(ordered)
    return checkpoint
