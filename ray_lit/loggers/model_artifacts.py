"""``log_model``: which checkpoints a logger uploads as artifacts, and when (Lightning 2.x).

- ``log_model=False``: none.
- ``log_model=True``: the checkpoints ``ModelCheckpoint`` holds when the stage ends (the
  logger's ``finalize``): its top-k, best and last files; with ``save_top_k=-1`` each one as it
  is saved instead.
- ``log_model="all"``: each checkpoint as it is saved.

``ModelCheckpoint`` calls ``logger.after_save_checkpoint(callback)`` after each save, on global
rank 0. In process that is the real logger; in a Ray worker it is the logger's proxy, which sends
a ``SavedCheckpoints`` snapshot of the callback through rank 0's event stream, and the driver's
real logger receives it in order with the metrics. So loggers always upload from the driver,
reading the files the workers wrote (a local path the driver can see, or a storage URI).

A checkpoint is uploaded again only when its file changed since (``last.ckpt``, a name
reused). With ``"all"`` on workers the notice reaches the driver after rank 0 moved on, and a
top-k file may be gone or replaced in place (``last.ckpt``) by then: rank 0 keeps each new
version (``CheckpointStager``, in ``.ray_lit_log_model/`` beside it: a hard link of a local file,
a server-side copy of a storage URI's object) that the driver uploads and then removes, so
every saved version reaches the logger. A file gone before the driver reached it anyway (one
not staged: ``log_model=True`` uploads what is kept at the end) is skipped with a warning.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from ray_lit.errors import MisconfigurationException

# the ModelCheckpoint options recorded with each upload (as Lightning's loggers do)
_OPTIONS = ("monitor", "mode", "save_last", "save_top_k", "save_weights_only",
            "every_n_train_steps", "every_n_epochs")
_STAGE_DIR = ".ray_lit_log_model"


def _score(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item()) if hasattr(value, "item") else float(value)


@dataclass(frozen=True)
class SavedCheckpoints:
    """What a logger reads of a ``ModelCheckpoint`` after a save: its paths, scores and options.

    A plain value, so rank 0 of the workers can send it to the driver.
    """

    best_k_models: dict[str, float | None] = field(default_factory=dict)
    best_model_path: str = ""
    best_model_score: float | None = None
    last_model_path: str = ""
    current_score: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    kind: str = "ModelCheckpoint"
    # checkpoint path -> the hard link rank 0 kept of it for the upload (``CheckpointStager``)
    staged: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, callback: Any) -> SavedCheckpoints:
        """The snapshot of ``callback`` (a ``ModelCheckpoint`` or a snapshot already)."""
        if isinstance(callback, SavedCheckpoints):
            return callback
        return cls(
            best_k_models={p: _score(s) for p, s in
                           dict(getattr(callback, "best_k_models", {}) or {}).items()},
            best_model_path=getattr(callback, "best_model_path", "") or "",
            best_model_score=_score(getattr(callback, "best_model_score", None)),
            last_model_path=getattr(callback, "last_model_path", "") or "",
            current_score=_score(getattr(callback, "current_score", None)),
            options={k: getattr(callback, k) for k in _OPTIONS if hasattr(callback, k)},
            kind=getattr(callback, "kind", None) or type(callback).__name__,
        )

    @property
    def save_top_k(self) -> int:
        return int(self.options.get("save_top_k", 1))

    def paths(self) -> dict[str, float | None]:
        """Each checkpoint the callback holds (last, best, top-k) and its score."""
        scored: dict[str, float | None] = {}
        if self.last_model_path:
            scored[self.last_model_path] = self.current_score
        if self.best_model_path:
            scored[self.best_model_path] = self.best_model_score
        scored.update(self.best_k_models)
        return scored


@dataclass(frozen=True)
class Upload:
    """One checkpoint to upload: where it is, its score, and Lightning's aliases for it."""

    path: str
    score: float | None
    aliases: tuple[str, ...]
    metadata: dict[str, Any]
    staged: str | None = None  # rank 0's hard link of ``path``: read this, then remove it

    @property
    def stem(self) -> str:
        """The file name without its extension (MLflow's artifact folder)."""
        return os.path.splitext(os.path.basename(self.path.rstrip("/")))[0]

    @contextmanager
    def local_copy(self) -> Iterator[str]:
        """A path the driver can read: the file itself, or a copy of a storage URI's file
        (removed afterwards). A staged link is named like the checkpoint and removed after
        the upload."""
        if self.staged is not None and "://" not in self.staged:
            try:
                yield self.staged
            finally:
                _remove_staged(self.staged)
            return
        source = self.staged or self.path
        if "://" not in source:
            yield source
            return
        try:
            with tempfile.TemporaryDirectory(prefix="ray_lit-model-") as folder:
                local = os.path.join(folder, os.path.basename(self.path.rstrip("/")))
                _download(source, local)
                yield local
        finally:
            if self.staged is not None:
                _remove_staged(self.staged)


def check_log_model(log_model: Any, owner: str) -> bool | str:
    """``log_model`` validated once, at the logger's construction.

    Raises:
        MisconfigurationException: anything but True, False or ``"all"``.
    """
    if log_model is True or log_model is False or log_model == "all":
        return log_model
    raise MisconfigurationException(
        f"{owner}(log_model={log_model!r}): use False (no checkpoints), True (the checkpoints "
        "kept when training ends) or 'all' (every checkpoint as it is saved).")


class CheckpointUploads:
    """One logger's ``log_model`` policy and memory of what it uploaded (driver only).

    Args:
        log_model: False, True or ``"all"`` (validated by ``check_log_model``).
    """

    def __init__(self, log_model: bool | str) -> None:
        self.log_model = log_model
        self._pending: SavedCheckpoints | None = None  # True: the state to upload at the end
        self._uploaded: dict[str, float] = {}  # path -> modification time when uploaded

    def after_save(self, callback: Any) -> list[Upload]:
        """The uploads due now that ``callback`` saved a checkpoint (none for ``True`` unless
        ``save_top_k=-1``: those wait for ``at_end``)."""
        if not self.log_model:
            return []
        saved = SavedCheckpoints.of(callback)
        if self.log_model == "all" or saved.save_top_k == -1:
            return self._new_uploads(saved)
        self._pending = saved
        return []

    def at_end(self) -> list[Upload]:
        """The uploads due when a stage ends (``log_model=True``)."""
        pending, self._pending = self._pending, None
        return self._new_uploads(pending) if pending is not None else []

    def _new_uploads(self, saved: SavedCheckpoints) -> list[Upload]:
        """The callback's checkpoints not uploaded yet (or changed since), oldest first."""
        found = []
        for path, score in saved.paths().items():
            staged = saved.staged.get(path)
            mtime = _modified(staged or path)
            if mtime is None:
                warnings.warn(f"log_model: the checkpoint {path} was gone before the logger "
                              "could upload it (a newer one replaced it).", RuntimeWarning,
                              stacklevel=3)
                continue
            # a staged copy is a version rank 0 saw change: uploaded even when the store's
            # clock (whole seconds on S3) cannot tell it from the previous one
            if staged is None and self._uploaded.get(path, -1.0) >= mtime:
                continue
            found.append((mtime, path, score))
        uploads = []
        for mtime, path, score in sorted(found):
            aliases = ("latest", "best") if path == saved.best_model_path else ("latest",)
            metadata = {"score": score, "original_filename": os.path.basename(path.rstrip("/")),
                        saved.kind: dict(saved.options)}
            uploads.append(Upload(path, score, aliases, metadata, saved.staged.get(path)))
            self._uploaded[path] = max(self._uploaded.get(path, -1.0), mtime)
        return uploads


def _download(uri: str, local: str) -> None:
    """Copy a storage URI's file, or directory of shards, to the local path ``local``."""
    import pyarrow.fs as pafs

    from ray_lit.storage.filesystem import resolve

    fs, inner = resolve(uri)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        pafs.copy_files(inner, local, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return
    with fs.open_input_stream(inner) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _modified(path: str) -> float | None:
    """The modification time of a local file or directory, or of a storage URI's file; None
    when it does not exist."""
    if "://" not in path:
        try:
            return os.stat(path).st_mtime
        except OSError:
            return None
    import pyarrow.fs as pafs

    from ray_lit.storage.filesystem import resolve

    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return None
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def stages_every_checkpoint(logger: Any) -> bool:
    """Whether ``logger`` uploads each checkpoint as saved (``log_model="all"``), so that its
    proxy in rank 0 must keep each new file until the driver uploaded it."""
    uploads = getattr(logger, "_uploads", None)
    return isinstance(uploads, CheckpointUploads) and uploads.log_model == "all"


class CheckpointStager:
    """Rank 0 of the workers: a copy of each new checkpoint version, so a file removed or
    replaced in place before the driver uploads it is still there to upload (the driver
    removes the copy). A local file gets a hard link (no data copied); a storage URI's object
    a server-side copy under a unique key (S3 ``CopyObject``: the bytes do not pass through
    the worker)."""

    def __init__(self) -> None:
        self._staged: dict[str, float] = {}  # path -> modification time when linked
        self._versions: dict[str, Any] = {}  # storage URI -> its version when copied
        self._count = itertools.count()

    def stage(self, saved: SavedCheckpoints) -> SavedCheckpoints:
        """``saved`` with copies of its files that are new since the last call."""
        staged = {}
        for path in saved.paths():
            if "://" in path:
                copy = self._stage_uri(path)
                if copy is not None:
                    staged[path] = copy
                continue
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                continue
            if self._staged.get(path, -1.0) >= mtime:
                continue
            folder = os.path.join(os.path.dirname(path), _STAGE_DIR, str(next(self._count)))
            os.makedirs(folder, exist_ok=True)
            link = os.path.join(folder, os.path.basename(path))
            _link(path, link)
            staged[path] = link
            self._staged[path] = mtime
        return replace(saved, staged=staged)

    def _stage_uri(self, uri: str) -> str | None:
        """A copy of ``uri``'s object (or directory of shards) at a new key beside it; None
        when it is gone or unchanged since it was last staged."""
        import pyarrow.fs as pafs

        from ray_lit.storage.filesystem import resolve, split

        fs, inner = resolve(uri)
        version = _object_version(fs, inner)
        if version is None or self._versions.get(uri) == version:
            return None
        parent, name = split(uri)
        base, sep, query = parent.partition("?")
        # a unique key: a restarted rank 0 never reuses a copy the driver has not removed
        copy = f"{base.rstrip('/')}/{_STAGE_DIR}/{uuid.uuid4().hex}/{name}{sep}{query}"
        _, copy_inner = resolve(copy)
        if fs.get_file_info(inner).type == pafs.FileType.Directory:
            pafs.copy_files(inner, copy_inner, source_filesystem=fs, destination_filesystem=fs)
        else:
            fs.copy_file(inner, copy_inner)
        self._versions[uri] = version
        return copy


def _object_version(fs: Any, inner: str) -> Any:
    """What identifies the version of a storage object (None when it is gone): its ETag where
    the store has one (S3), since modification times there have whole seconds and a checkpoint
    rewritten within the same second must still count as new; else the modification time. For
    a directory of shards: every file's name, size and time."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        return tuple(sorted((f.path, f.size, f.mtime) for f in found))
    try:
        with fs.open_input_file(inner) as f:
            etag = (f.metadata() or {}).get("ETag")
    except (OSError, NotImplementedError):
        etag = None
    return etag or info.mtime


def _link(src: str, dst: str) -> None:
    """A hard link (no data copied), or a copy where links are not allowed."""
    if os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _remove_staged(link: str) -> None:
    """Remove a staged link (or a storage copy), its numbered folder, and the stage folder
    once empty."""
    if "://" in link:
        from ray_lit.storage.filesystem import resolve

        fs, inner = resolve(link)
        # the copy's own key folder; the stage "folder" of an object store has no object of
        # its own and vanishes with its last key
        fs.delete_dir(inner.rsplit("/", 1)[0])
        return
    folder = os.path.dirname(link)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(folder))  # the stage folder, when no other link is pending
    except OSError:
        pass
