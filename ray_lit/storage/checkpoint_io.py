"""Checkpoint files: ``torch.save`` bytes written atomically, read back without running code.

Loading always uses ``torch.load(weights_only=True)``: a checkpoint may hold tensors, numbers,
strings, containers and the few types in ``CHECKPOINT_ALLOWLIST``, never an object whose
unpickling calls a function. A file that asks for anything else is refused with
``CheckpointLoadError``; extend the allow-list for types you trust::

    from ray_lit.storage.checkpoint_io import CHECKPOINT_ALLOWLIST
    CHECKPOINT_ALLOWLIST.append(MyConfig)

``collections.defaultdict`` cannot be on the list: the weights-only unpickler cannot fill one.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import pathlib
import pickle
import pickletools
import re
import threading
from typing import Any

import torch

from ray_lit.errors import MisconfigurationException
from ray_lit.storage.filesystem import Storage, read_file, split, write_file

# What ray_lit (and a user saving m.hparams or a Path-valued option) puts into checkpoints
# besides what torch's weights-only unpickler accepts by default (tensors, optimizer and
# scheduler state dicts, containers of numbers and strings, torch.device, torch.dtype).
# (``core.hparams`` adds its ``AttributeDict``: this module is a leaf and imports no model code)
CHECKPOINT_ALLOWLIST: list[Any] = [
    argparse.Namespace,
    collections.OrderedDict,
    pathlib.PosixPath,
    pathlib.PurePosixPath,
]

# torch's safe_globals context adds to and removes from one process-wide set: two loads
# overlapping in threads would remove each other's entries, so deserialisation is serialised.
_LOAD_LOCK = threading.Lock()
_ZIP_MAGIC = b"PK\x03\x04"
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


class CheckpointLoadError(MisconfigurationException):
    """A checkpoint file exists but cannot be loaded (corrupt, or it would run code)."""


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` with ``torch.save``, atomically.

    The caller decides which rank writes (global rank 0 for model checkpoints). Parent
    directories are created; a reader never sees a half-written file.

    Args:
        checkpoint: the checkpoint dict (see ``ray_lit.loop.checkpoint_state``).
        path: a local path or a storage URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``).
    """
    target = os.fspath(path)
    if "://" not in target:
        _save_local(checkpoint, target)
        return
    write_file(target, checkpoint_to_bytes(checkpoint))


def _save_local(checkpoint: dict[str, Any], path: str) -> None:
    """``torch.save`` straight into a temp file beside ``path``, fsync, rename: no in-memory
    copy of the whole file (it can be GBs), and a reader never sees half a file."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save(checkpoint, out)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; checkpoints are ordinary files
        if os.path.isdir(path) and not os.path.islink(path):
            _replace_directory(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _replace_directory(tmp: str, path: str) -> None:
    """A file where a sharded checkpoint directory of the same name was (``last.ckpt`` of a
    run resumed with another strategy): a file cannot be renamed over a directory, so the
    directory steps aside, then goes."""
    import shutil

    old = f"{path}.old-{os.getpid()}"
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (or by PyTorch Lightning), or a sharded
    checkpoint directory (``FSDPStrategy(state_dict_type="sharded")``), consolidated in this
    process (``storage.sharded_io``): both kinds load wherever a checkpoint is expected.

    Args:
        path: a local path or a storage URI, of a file or a sharded checkpoint directory.
        map_location: as in ``torch.load`` (a device, a string such as ``"cpu"``, a dict or a
            function).

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CheckpointLoadError: the file is truncated or corrupt, or it references code (a class
            or function not in ``CHECKPOINT_ALLOWLIST``), which is never run; or the directory
            is not a complete sharded checkpoint.
    """
    name = os.fspath(path)
    parent, base = split(name)
    if Storage(parent).isdir(base):
        _refuse_run_directory(Storage(name), name)
        from ray_lit.storage.sharded_io import load_sharded_checkpoint

        return load_sharded_checkpoint(name, map_location)
    try:
        data = read_file(name)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Checkpoint not found: {name}") from err
    return checkpoint_from_bytes(data, map_location, name=name)


# the names of a run directory (``checkpoint/layout.py`` spells them; this module is a leaf)
_RUN_CHECKPOINTS = "checkpoints"
_MANIFEST = "manifest.json"


def _refuse_run_directory(storage: Storage, name: str) -> None:
    """A run directory (``storage_path/run_name``) or one fault-tolerance checkpoint directory
    passed where one checkpoint is expected: say how to continue that run instead.

    Raises:
        CheckpointLoadError: naming the directory and the fix.
    """
    if storage.isdir(_RUN_CHECKPOINTS):
        parent, run = split(name)
        raise CheckpointLoadError(
            f"{name} is a ray_lit run directory, not a checkpoint. To continue that run from "
            f"its latest committed checkpoint, pass Trainer(storage_path={parent!r}, "
            f"run_name={run!r}) (resume='auto' is the default); to load one checkpoint, pass "
            "a checkpoint file (a ModelCheckpoint .ckpt, or a rank_0 part under "
            f"{name}/{_RUN_CHECKPOINTS}/).")
    if storage.exists(_MANIFEST):
        try:  # the part the manifest commits (a straggler's may lie beside it)
            import json

            parts = [p for p in json.loads(storage.read_bytes(_MANIFEST))["parts"]
                     if str(p).startswith(("rank_0-", "rank_0."))]
        except (ValueError, KeyError, TypeError):
            parts = []
        hint = f"{name.rstrip('/')}/{parts[0]}" if parts else f"a rank_0 part file in {name}"
        raise CheckpointLoadError(
            f"{name} is one fault-tolerance checkpoint of a ray_lit run (a directory of "
            f"per-rank parts), not a checkpoint file. Pass its rank 0 part, {hint}, or "
            "continue the whole run with the same storage_path and run_name.")


def checkpoint_to_bytes(checkpoint: dict[str, Any]) -> bytes:
    """``checkpoint`` as the bytes ``save_checkpoint`` would write (for memory, not a file)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def checkpoint_from_bytes(data: bytes, map_location: Any = None,
                          name: str = "<in memory>") -> dict[str, Any]:
    """Load checkpoint bytes as ``load_checkpoint`` does (weights only, no code run)."""
    try:
        with _LOAD_LOCK, torch.serialization.safe_globals(_missing_globals()):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_global(str(err), data)
        if refused is not None:
            raise CheckpointLoadError(
                f"Checkpoint {name} references {refused}, and ray_lit refuses to run code from "
                "a checkpoint (it loads with weights_only=True). If you trust this file and "
                "that type is safe to construct, append it to "
                "ray_lit.storage.checkpoint_io.CHECKPOINT_ALLOWLIST.") from err
        raise _corrupt(name, err) from err
    except MemoryError:
        raise
    except Exception as err:  # nothing in the file ran (weights only): any failure is damage
        raise _corrupt(name, err) from err


def _missing_globals() -> list[Any]:
    # only what is not already allowed: leaving the context removes what it added, and must
    # not take away a user's own torch.serialization.add_safe_globals entries
    present = set(torch.serialization.get_safe_globals())
    return [g for g in CHECKPOINT_ALLOWLIST if g not in present]


def _refused_global(message: str, data: bytes) -> str | None:
    """What the file asked to call, or None when the unpickling failed for another reason."""
    # torch's wording changed over releases: "Unsupported global: GLOBAL m.f" (2.4-2.6),
    # "unsupported GLOBAL m.f whose module m is blocked" (later)
    match = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", message, re.IGNORECASE)
    if match:
        return match.group(1)
    if "Trying to call reduce" in message or "Can only build" in message:
        return "a callable"
    if not data.startswith(_ZIP_MAGIC):
        # A plain pickle (not torch's zip format) trips the unpickler on its framing before it
        # reaches any global; its opcodes can be listed without executing them.
        # Only a stream that parses to its end is a pickle asking for code; random or cut
        # bytes can look like such an opcode on the way to their parse error (corrupt).
        found = None
        try:
            for opcode, arg, _ in pickletools.genops(data):
                if found is None and opcode.name in _CODE_OPCODES:
                    found = f"a {opcode.name} of {arg}" if arg else "a callable"
        except Exception:  # not a pickle at all: corrupt
            return None
        return found
    return None


def _corrupt(name: str, err: BaseException) -> CheckpointLoadError:
    return CheckpointLoadError(
        f"Checkpoint {name} is truncated or corrupt ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else 'unexpected end of data'}). Write it again, "
        "or resume from another checkpoint.")
