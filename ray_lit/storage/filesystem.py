"""Where run state and checkpoints live: a local directory or a ``pyarrow.fs`` URI.

``Storage`` is a root directory with relative-path file methods; for a URI it works through the
``(filesystem, path)`` pair that ``resolve`` returns. Other modules read and write run files
through it (``storage/checkpoint_io.py`` streams local checkpoint files itself, with the same
temp-file-and-rename write), so local disks, ``file://``, ``s3://``, ``gs://`` and ``hdfs://``
behave alike.

Writes are atomic for readers: on a local disk (and HDFS) a temporary file in the same directory
is renamed over the target; on object stores (S3, GCS) one PUT (or a completed multipart upload)
makes the object appear whole.

A local directory is served by ``os`` alone, and ``pyarrow`` is imported only for a URI: loading
its libraries costs every process ~25 MiB of resident memory and a fifth of a second, and most
runs never leave the local disk.

With a ``StorageRetry`` (``Storage(root, retry=...)``) every operation is retried after
transient errors (``storage/retry.py``); without one it is tried once, as ``check_writable``
wants (a bad ``storage_path`` must fail in seconds).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ray_lit.errors import MisconfigurationException
from ray_lit.storage.retry import StorageRetry

if TYPE_CHECKING:
    from collections.abc import Callable

    import pyarrow.fs as pafs

__all__ = ["Storage", "read_file", "resolve", "split", "write_file"]

# Filesystems where a single upload is already atomic, so a temp file plus rename would only
# double the traffic (S3 has no rename: a "move" is a copy and a delete).
_OBJECT_STORES = ("s3", "gcs")


def _is_uri(path: str) -> bool:
    return "://" in path


def _s3_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """An ``S3FileSystem`` that honours ``AWS_ENDPOINT_URL[_S3]`` (MinIO, moto, LocalStack).

    ``pyarrow.fs.FileSystem.from_uri`` would ask AWS for the bucket's region over the network,
    which hangs or fails against a local endpoint, so the filesystem is built explicitly.
    """
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    if parts.query:  # explicit options in the URI (?endpoint_override=...&scheme=http) win
        return pafs.FileSystem.from_uri(uri)
    # delayed open: a file smaller than one part goes up in a single PutObject instead of a
    # multipart upload (fewer requests, and what S3-compatible test servers handle best)
    options: dict[str, Any] = {"allow_delayed_open": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        ep = urlsplit(endpoint if _is_uri(endpoint) else f"https://{endpoint}")
        options["endpoint_override"] = ep.netloc + ep.path.rstrip("/")
        options["scheme"] = ep.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    path = f"{parts.netloc}{parts.path}".rstrip("/")
    return pafs.S3FileSystem(**options), path


def resolve(path_or_uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or a URI.

    Args:
        path_or_uri: a local path (relative paths are made absolute against the current
            directory), or a ``file://``, ``s3://``, ``gs://``/``gcs://`` or ``hdfs://`` URI.
            For ``s3://`` the environment variables ``AWS_ENDPOINT_URL_S3`` /
            ``AWS_ENDPOINT_URL`` select a custom endpoint (``http://`` ones connect without TLS)
            and ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` the region.

    Returns:
        ``(filesystem, path)``; the path has no trailing slash.

    Raises:
        MisconfigurationException: the URI's scheme is not supported by ``pyarrow.fs``.
    """
    import pyarrow.fs as pafs

    path = os.fspath(path_or_uri)
    if not _is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    scheme = path.split("://", 1)[0].lower()
    try:
        if scheme in ("s3", "s3a"):
            return _s3_from_uri(path)
        fs, inner = pafs.FileSystem.from_uri(path)
    except (ValueError, OSError, NotImplementedError) as err:  # pyarrow's ArrowInvalid & co.
        raise MisconfigurationException(
            f"Cannot open storage {path!r}: {err}. Use a local path or a file://, s3://, gs:// "
            "or hdfs:// URI (the last two need pyarrow built with GCS/HDFS support)."
        ) from err
    return fs, inner.rstrip("/") or inner


def split(path_or_uri: str | os.PathLike) -> tuple[str, str]:
    """``(parent, name)`` of a file path or URI, keeping the scheme and any ``?query`` on parent.

    Example: ``"s3://bucket/run/a.ckpt"`` -> ``("s3://bucket/run", "a.ckpt")``.
    """
    path = os.fspath(path_or_uri)
    if not _is_uri(path):
        parent, name = os.path.split(os.path.abspath(os.path.expanduser(path)))
        return parent, name
    base, sep, query = path.partition("?")
    parent, _, name = base.rstrip("/").rpartition("/")
    if parent.endswith(":/"):  # "s3://bucket" has no parent: the bucket itself is the file
        raise MisconfigurationException(
            f"{path!r} names no file (only a bucket); add a file name, e.g. {base}/model.ckpt.")
    return parent + (sep + query if sep else ""), name


class Storage:
    """A root directory (local or remote) with relative-path file operations.

    Picklable: only the root string travels, and the filesystem is resolved again on first use
    in the receiving process (Ray workers), because ``pyarrow`` filesystems hold connections.

    Args:
        root: a local path or a ``pyarrow.fs`` URI (see ``resolve``).
        retry: retry transient errors of every operation with this policy (None: one try).
        filesystem: serve ``root`` (a path inside it) through this ``pyarrow`` filesystem
            instead of resolving it; for wrappers such as a fault-injecting one in tests. It
            stays in this process: a pickled copy resolves ``root`` again.
    """

    def __init__(self, root: str | os.PathLike, retry: StorageRetry | None = None,
                 filesystem: pafs.FileSystem | None = None) -> None:
        root = os.fspath(root)
        # absolute now: a Ray worker runs in another working directory
        self.root = root if _is_uri(root) or filesystem is not None else \
            os.path.abspath(os.path.expanduser(root))
        self.retry = retry
        self._custom = filesystem is not None
        self._resolved: tuple[pafs.FileSystem, str] | None = \
            (filesystem, self.root.rstrip("/")) if filesystem is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "retry": self.retry}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = state["root"]
        self.retry = state.get("retry")
        self._custom = False
        self._resolved = None

    def once(self) -> Storage:
        """The same storage (and filesystem) without the retry policy: one try per call."""
        copy = Storage.__new__(Storage)
        copy.__dict__.update(self.__dict__)
        copy.retry = None
        return copy

    def _retrying(self, what: str, rel: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` under the retry policy, or once without one."""
        if self.retry is None:
            return fn()
        return self.retry.call(fn, what=what, uri=self.uri(rel))

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # --- paths ------------------------------------------------------------------------------
    @property
    def local(self) -> bool:
        """Whether the root is a local directory (served by ``os``, without ``pyarrow``)."""
        return not _is_uri(self.root) and not self._custom

    @property
    def fs(self) -> pafs.FileSystem:
        """The ``pyarrow`` filesystem of the root (imports ``pyarrow``; local roots never need
        it for the methods below)."""
        return self._resolve()[0]

    def _resolve(self) -> tuple[pafs.FileSystem, str]:
        if self._resolved is None:
            self._resolved = resolve(self.root)
        return self._resolved

    def _path(self, rel: str) -> str:
        base = self.root if self.local else self._resolve()[1]
        rel = rel.strip("/")
        return f"{base}/{rel}" if rel else base

    def uri(self, rel: str = "") -> str:
        """The full path or URI of ``rel`` (what users see in logs and ``best_model_path``)."""
        rel = rel.strip("/")
        if not _is_uri(self.root):
            return os.path.join(self.root, rel) if rel else self.root
        base, sep, query = self.root.partition("?")
        full = f"{base.rstrip('/')}/{rel}" if rel else base.rstrip("/")
        return full + (sep + query if sep else "")

    @property
    def _renames_atomically(self) -> bool:
        return self.local or self.fs.type_name not in _OBJECT_STORES

    # --- files ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` so that readers see the old file or the new one, never half.

        Parent directories are created as needed. With a retry policy a failed write (a cut
        upload, a full disk) is written again whole.
        """
        self._retrying("write", rel, lambda: self._write_once(rel, data))

    def _write_once(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        if self.local:
            _atomic_local_write(path, data)
            return
        fs = self.fs
        parent = path.rpartition("/")[0]
        if self._renames_atomically:
            if parent:
                fs.create_dir(parent, recursive=True)
            tmp = f"{parent}/.{path.rpartition('/')[2]}.tmp-{uuid.uuid4().hex}"
            try:
                with fs.open_output_stream(tmp) as out:
                    out.write(data)
                fs.move(tmp, path)
            except BaseException:
                _discard(fs, tmp)  # a failed try leaves no temp file behind
                raise
        else:
            with fs.open_output_stream(path) as out:
                out.write(data)

    def read_bytes(self, rel: str) -> bytes:
        """The whole content of ``rel``.

        Raises:
            FileNotFoundError: ``rel`` does not exist (the message names the full URI).
        """
        return self._retrying("read", rel, lambda: self._read_once(rel))

    def _read_once(self, rel: str) -> bytes:
        path = self._path(rel)
        if self.local:
            try:
                with open(path, "rb") as src:
                    return src.read()
            except (FileNotFoundError, NotADirectoryError) as err:
                raise FileNotFoundError(f"No such file: {path}") from err
        import pyarrow.fs as pafs

        fs = self.fs
        try:
            with fs.open_input_stream(path) as src:
                return src.read()
        except (FileNotFoundError, OSError) as err:
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"No such file: {self.uri(rel)}") from err
            raise

    def _kind(self, rel: str) -> str:
        """``"file"``, ``"dir"`` or ``"missing"``."""
        return self._retrying("stat", rel, lambda: self._kind_once(rel))

    def _kind_once(self, rel: str) -> str:
        path = self._path(rel)
        if self.local:
            try:  # os.stat, not os.path.exists: a path we may not read is an error, not "missing"
                mode = os.stat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return "missing"
            return "dir" if stat.S_ISDIR(mode) and not os.path.islink(path) else "file"
        import pyarrow.fs as pafs

        kind = self.fs.get_file_info(path).type
        return ("dir" if kind == pafs.FileType.Directory
                else "missing" if kind == pafs.FileType.NotFound else "file")

    def exists(self, rel: str = "") -> bool:
        """Whether ``rel`` is a file or a directory (on object stores: a key or a prefix)."""
        return self._kind(rel) != "missing"

    def isdir(self, rel: str = "") -> bool:
        return self._kind(rel) == "dir"

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``, sorted; ``[]`` if it does not exist."""
        return self._retrying("list", rel, lambda: self._listdir_once(rel))

    def _listdir_once(self, rel: str) -> list[str]:
        path = self._path(rel)
        if self.local:
            try:
                return sorted(os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                return []
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
        try:
            infos = self.fs.get_file_info(selector)
        except NotADirectoryError:
            return []
        return sorted(info.base_name for info in infos)

    def delete(self, rel: str) -> None:
        """Remove the file or directory tree ``rel``; a missing path is not an error, because
        retention and cleanup may race with each other after a restart."""
        self._retrying("delete", rel, lambda: self._delete_once(rel))

    def _delete_once(self, rel: str) -> None:
        path, kind = self._path(rel), self._kind_once(rel)
        if kind == "dir" and self.local:
            _rmtree(path)
        elif kind == "dir":
            self.fs.delete_dir(path)
        elif kind == "file" and self.local:
            try:  # a file, or a symbolic link (only the link goes)
                os.remove(path)
            except FileNotFoundError:  # removed by someone else meanwhile
                pass
        elif kind == "file":
            self.fs.delete_file(path)

    def makedirs(self, rel: str = "") -> None:
        """Create ``rel`` and its parents (a no-op where it exists)."""
        if self.local:
            self._retrying("mkdir", rel, lambda: os.makedirs(self._path(rel), exist_ok=True))
        else:
            self._retrying("mkdir", rel,
                           lambda: self.fs.create_dir(self._path(rel), recursive=True))

    def check_writable(self) -> None:
        """Create the root and write, read back and delete a probe file in it.

        Called on the driver before workers start, so a bad ``storage_path`` fails in seconds.

        Raises:
            MisconfigurationException: the root cannot be created or written.
        """
        probe = f".ray_lit_write_probe-{uuid.uuid4().hex}"
        try:
            if self._renames_atomically:
                self.makedirs()
            self.write_bytes(probe, b"ok")
            if self.read_bytes(probe) != b"ok":
                raise OSError("the probe file read back different bytes")
            self.delete(probe)
        except (OSError, MisconfigurationException, ValueError) as err:
            raise MisconfigurationException(
                f"storage_path {self.uri()!r} is not writable: {err}. Pass a writable "
                "storage_path= (a local directory you own, or an s3:// / gs:// URI whose bucket "
                "exists and whose credentials allow writes)."
            ) from err


def write_file(path_or_uri: str | os.PathLike, data: bytes) -> None:
    """``Storage.write_bytes`` for one file given by its full path or URI (atomic, parents made)."""
    parent, name = split(path_or_uri)
    Storage(parent).write_bytes(name, data)


def read_file(path_or_uri: str | os.PathLike) -> bytes:
    """The content of one file given by its full path or URI.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
    """
    parent, name = split(path_or_uri)
    return Storage(parent).read_bytes(name)


def _discard(fs: pafs.FileSystem, path: str) -> None:
    """Delete ``path`` if it can be deleted (the storage may be the thing that failed)."""
    with contextlib.suppress(Exception):  # a leftover temp file is never read
        fs.delete_file(path)


def _rmtree(path: str) -> None:
    """``shutil.rmtree`` where an entry removed meanwhile is fine and anything else raises."""

    def ignore_missing(function: Any, failed: str, exc: Any) -> None:
        err = exc if isinstance(exc, BaseException) else exc[1]  # onexc / onerror
        if not isinstance(err, FileNotFoundError):
            raise err

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=ignore_missing)
    else:
        shutil.rmtree(path, onerror=ignore_missing)


def _atomic_local_write(path: str, data: bytes) -> None:
    """Temp file in the target's directory, fsync, rename: a crash leaves the old file intact."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
