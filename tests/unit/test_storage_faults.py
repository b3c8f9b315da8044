"""Storage faults lose nothing (issue 19, item 3), without Ray: a fault-injecting ``pyarrow.fs``
wrapper under ``ray_lit.storage`` (failed writes, cut uploads, a full disk, a read-only
directory), the checkpoint manager's commit, the worker-side part writer, and the loggers."""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch

import ray_lit
from ray_lit.checkpoint.layout import part_uri
from ray_lit.checkpoint.manager import CheckpointManager
from ray_lit.checkpoint.writer import CheckpointWriter, _Write
from ray_lit.errors import MisconfigurationException
from ray_lit.loggers import CSVLogger, TensorBoardLogger
from ray_lit.messages import PartWritten
from ray_lit.storage.checkpoint_io import load_checkpoint
from ray_lit.storage.filesystem import Storage
from ray_lit.storage.retry import (
    StorageRetry,
    StorageUnavailableError,
    is_transient,
    needs_operator,
)


# --- a pyarrow filesystem that fails on purpose ----------------------------------------------
class Faults:
    """What the faulty filesystem does next; tests change it while a write retries."""

    def __init__(self) -> None:
        self.fail_writes = 0  # the next N writes fail as a refused connection would
        self.cut_uploads = 0  # the next N uploads stop half-way (the stream breaks)
        self.enospc = False  # every write: the disk is full
        self.read_only = False  # every write: the directory is read-only
        self.fail_lists = 0  # the next N listings fail
        self.slow_s = 0.0  # every write takes this long (a slow but healthy upload)
        self.writes_tried = 0
        self.lock = threading.Lock()

    def on_write(self) -> None:
        time.sleep(self.slow_s)
        with self.lock:
            self.writes_tried += 1
            if self.enospc:
                raise OSError(errno.ENOSPC, "No space left on device")
            if self.read_only:
                raise OSError(errno.EROFS, "Read-only file system")
            if self.fail_writes > 0:
                self.fail_writes -= 1
                raise OSError("AWS Error NETWORK_CONNECTION: curlCode: 7, Couldn't connect "
                              "to server (Connection refused)")

    def cut(self) -> bool:
        with self.lock:
            if self.cut_uploads > 0:
                self.cut_uploads -= 1
                return True
            return False


class _CutStream(io.RawIOBase):
    """An output stream that takes half of what it is given, then breaks (a cut upload)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.target.write(data[: len(data) // 2])
        raise OSError("AWS Error NETWORK_CONNECTION: Encountered network error when sending "
                      "or receiving data (upload cut short)")

    def close(self) -> None:
        self.target.close()
        super().close()


class FaultyHandler(pafs.FileSystemHandler):
    """``LocalFileSystem`` with the faults of a ``Faults`` object injected."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.base = pafs.LocalFileSystem()

    def get_type_name(self) -> str:
        return "faulty"

    def normalize_path(self, path: str) -> str:
        return path

    def equals(self, other: Any) -> bool:
        return self is other

    def get_file_info(self, paths: Any) -> Any:
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector: Any) -> Any:
        with self.faults.lock:
            if self.faults.fail_lists > 0:
                self.faults.fail_lists -= 1
                raise OSError("AWS Error SLOW_DOWN during ListObjectsV2 operation: Please "
                              "reduce your request rate. (HTTP 503)")
        return self.base.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.base.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("not in tests")

    def delete_file(self, path: str) -> None:
        self.base.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.base.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.base.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self.base.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.base.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        self.faults.on_write()
        stream = self.base.open_output_stream(path)
        if self.faults.cut():
            return pa.PythonFile(_CutStream(stream), mode="w")
        return stream

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        self.faults.on_write()
        return self.base.open_append_stream(path)


def faulty_storage(root: str, faults: Faults, timeout_s: float = 10.0) -> Storage:
    retry = StorageRetry(timeout_s, base_delay_s=0.01, max_delay_s=0.05)
    return Storage(root, retry=retry, filesystem=pafs.PyFileSystem(FaultyHandler(faults)))


def _visible(root: str) -> list[str]:
    """Every file under ``root`` (temp files included), relative."""
    out = []
    for parent, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(parent, f), root) for f in files]
    return sorted(out)


# --- which errors retry ----------------------------------------------------------------------
@pytest.mark.parametrize(("err", "transient", "operator"), [
    (OSError("AWS Error SLOW_DOWN ... (HTTP 503)"), True, False),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True, False),
    (OSError(errno.ENOSPC, "No space left on device"), True, True),
    (OSError(errno.EROFS, "Read-only file system"), True, True),
    (PermissionError(errno.EACCES, "Permission denied"), True, True),
    (OSError("AWS Error ACCESS_DENIED ... AccessDenied"), True, True),
    (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos; "
                  "PytorchStreamWriter failed writing file data/0: file write failed"), True,
     False),
    (FileNotFoundError("gone"), False, False),
    (IsADirectoryError("a dir"), False, False),
    (ValueError("bad uri"), False, False),
    (RuntimeError("something else"), False, False),
])
def test_transient_errors_are_told_from_answers(err, transient, operator):
    assert is_transient(err) is transient
    if transient:
        assert needs_operator(err) is operator


def test_backoff_grows_with_jitter_and_stops_at_the_bound():
    retry = StorageRetry(timeout_s=1000, base_delay_s=0.1, max_delay_s=0.8)
    delays = [retry.failed(OSError("x"), what="write", uri="u") for _ in range(8)]
    for i, delay in enumerate(delays):
        step = min(0.8, 0.1 * 2 ** i)
        assert step / 2 <= delay <= step  # half fixed, half random
    assert max(delays) <= 0.8
    retry.succeeded("u")
    assert retry.failing_for_s == 0.0 and retry.outages == 1 and retry.retries == 8


def test_the_bound_counts_from_the_first_failure_and_names_uri_and_option():
    retry = StorageRetry(timeout_s=0.3, base_delay_s=0.01, max_delay_s=0.02)
    calls = []

    def always_fails():
        calls.append(time.monotonic())
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageUnavailableError) as info:
        retry.call(always_fails, what="write", uri="s3://bucket/run/x.pt")
    assert "s3://bucket/run/x.pt" in str(info.value)
    assert "storage_retry_timeout_s=0.3" in str(info.value)
    assert info.value.uri == "s3://bucket/run/x.pt"
    assert 0.3 <= calls[-1] - calls[0] < 1.0 and len(calls) > 3


def test_zero_timeout_tries_once_and_answers_are_raised_at_once():
    calls = []

    def fails():
        calls.append(1)
        raise OSError("refused")

    with pytest.raises(StorageUnavailableError):
        StorageRetry(0).call(fails, what="write", uri="u")
    assert calls == [1]
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such file")

    with pytest.raises(FileNotFoundError):
        StorageRetry(60).call(missing, what="read", uri="u")
    assert calls == [1]


def test_cancel_stops_retrying_without_an_error():
    cancel = threading.Event()
    retry = StorageRetry(60, base_delay_s=0.05, max_delay_s=0.05)

    def fails():
        cancel.set()  # a newer checkpoint came meanwhile
        raise OSError("refused")

    assert retry.call(fails, what="write", uri="u", cancel=cancel) is None


def test_storage_unavailable_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(StorageUnavailableError("msg", uri="s3://b/k")))
    assert str(err) == "msg" and err.uri == "s3://b/k"


# --- Storage through the faulty filesystem ---------------------------------------------------
def test_failed_writes_are_retried_until_the_file_is_whole(tmp_path):
    faults = Faults()
    faults.fail_writes = 3
    storage = faulty_storage(str(tmp_path / "run"), faults)
    data = os.urandom(100_000)
    storage.write_bytes("checkpoints/a/part.pt", data)
    assert faults.writes_tried == 4
    assert storage.read_bytes("checkpoints/a/part.pt") == data
    assert _visible(str(tmp_path / "run")) == ["checkpoints/a/part.pt"]  # no temp files left


def test_a_cut_upload_is_never_visible_and_is_written_again(tmp_path):
    faults = Faults()
    faults.cut_uploads = 2
    storage = faulty_storage(str(tmp_path / "run"), faults)
    data = os.urandom(50_000)
    storage.write_bytes("x.pt", data)
    assert faults.writes_tried == 3
    assert (tmp_path / "run" / "x.pt").read_bytes() == data
    assert _visible(str(tmp_path / "run")) == ["x.pt"]


def test_listing_is_retried_after_throttling(tmp_path):
    faults = Faults()
    storage = faulty_storage(str(tmp_path / "run"), faults)
    storage.write_bytes("checkpoints/step-1/a", b"1")
    faults.fail_lists = 4
    assert storage.listdir("checkpoints") == ["step-1"]
    assert faults.fail_lists == 0


def test_a_full_disk_warns_at_once_and_writes_once_space_is_freed(tmp_path, caplog):
    faults = Faults()
    faults.enospc = True
    storage = faulty_storage(str(tmp_path / "run"), faults)
    warned = threading.Event()

    def operator_frees_space():
        # the warning comes at the first failure, long before the bound
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "No space left" not in caplog.text:
            time.sleep(0.01)
        warned.set()
        time.sleep(0.2)
        faults.enospc = False

    helper = threading.Thread(target=operator_frees_space)
    with caplog.at_level(logging.WARNING, logger="ray_lit"):
        helper.start()
        storage.write_bytes("m.json", b"{}")
        helper.join()
    assert warned.is_set()
    assert "free space" in caplog.text and "storage_retry_timeout_s" in caplog.text
    assert "works again" in caplog.text
    assert storage.read_bytes("m.json") == b"{}"


def test_a_read_only_directory_stops_with_a_clear_error_past_the_bound(tmp_path):
    faults = Faults()
    faults.read_only = True
    storage = faulty_storage(str(tmp_path / "run"), faults, timeout_s=0.3)
    with pytest.raises(StorageUnavailableError, match="storage_retry_timeout_s=0.3") as info:
        storage.write_bytes("m.json", b"{}")
    assert str(tmp_path / "run" / "m.json") in str(info.value)
    assert "Read-only" in str(info.value)
    assert not (tmp_path / "run" / "m.json").exists()


def test_storage_without_a_retry_policy_tries_once(tmp_path):
    faults = Faults()
    faults.fail_writes = 1
    storage = Storage(str(tmp_path), filesystem=pafs.PyFileSystem(FaultyHandler(faults)))
    with pytest.raises(OSError, match="Connection refused"):
        storage.write_bytes("a", b"1")
    assert faults.writes_tried == 1


def test_the_retry_policy_travels_with_a_pickled_storage(tmp_path):
    import pickle

    storage = Storage(str(tmp_path), retry=StorageRetry(42))
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.retry is not None and copy.retry.timeout_s == 42


# --- the commit protocol ---------------------------------------------------------------------
def _write_part(root: str, name: str, rank: int, fence: str = "f", step: int = 2) -> None:
    from ray_lit.storage.checkpoint_io import save_checkpoint

    save_checkpoint({"rank": rank, "global_step": step, "state_dict": {"w": torch.ones(2) * step}},
                    part_uri(root, name, rank, fence))


def _commit(manager: CheckpointManager, root: str, step: int) -> bool:
    name = f"step-{step:010d}-e00000"
    meta = {"global_step": step, "epoch": 0}
    for rank in range(2):
        _write_part(root, name, rank, step=step)
    manager.confirm(name, 1, 2, meta, "f")
    return manager.confirm(name, 0, 2, meta, "f")


def test_a_manifest_write_that_fails_is_retried_and_commits(tmp_path):
    root = str(tmp_path / "run")
    manager = CheckpointManager(root)
    faults = Faults()
    manager.storage = faulty_storage(root, faults)
    faults.fail_writes = 3
    assert _commit(manager, root, 2)
    latest = manager.latest()
    assert latest is not None and latest.global_step == 2
    assert load_checkpoint(latest.part_uri(0))["global_step"] == 2


def test_a_manifest_past_the_bound_leaves_the_checkpoint_uncommitted(tmp_path):
    root = str(tmp_path / "run")
    manager = CheckpointManager(root)
    faults = Faults()
    manager.storage = faulty_storage(root, faults, timeout_s=0.2)
    assert _commit(manager, root, 2)
    faults.enospc = True
    with pytest.raises(StorageUnavailableError, match="storage_retry_timeout_s"):
        _commit(manager, root, 4)
    faults.enospc = False
    # the half-done checkpoint (parts without a manifest) is never read ...
    assert [c.global_step for c in manager.committed()] == [2]
    latest = manager.latest()
    # ... and the latest committed one still loads
    assert load_checkpoint(latest.part_uri(1))["global_step"] == 2
    manager.clean_uncommitted()
    assert manager.storage.listdir("checkpoints") == ["step-0000000002-e00000"]


def test_a_failing_prune_does_not_fail_the_commit(tmp_path, monkeypatch, caplog):
    root = str(tmp_path / "run")
    manager = CheckpointManager(root, keep=1)

    def broken_delete(self, rel):
        raise OSError(errno.EROFS, "Read-only file system")

    assert _commit(manager, root, 2)
    monkeypatch.setattr(Storage, "_delete_once", broken_delete)
    with caplog.at_level(logging.WARNING, logger="ray_lit"):
        assert _commit(manager, root, 4)
    assert "pruning" in caplog.text
    monkeypatch.undo()
    assert [c.global_step for c in manager.committed()] == [2, 4]
    assert _commit(manager, root, 6)  # the next commit prunes what is due
    assert [c.global_step for c in manager.committed()] == [6]


def test_the_manager_takes_the_option_timeout():
    assert CheckpointManager("/tmp/x", retry_timeout_s=7).storage.retry.timeout_s == 7


# --- the worker-side part writer -------------------------------------------------------------
class _Worker:
    def __init__(self) -> None:
        self.posted: list[Any] = []

    def post(self, message: Any) -> None:
        self.posted.append(message)


class _Ranks:
    world_rank, world_size = 0, 1


def _writer(root: str, storage: Storage) -> tuple[CheckpointWriter, _Worker]:
    writer = CheckpointWriter(root, every_n_steps=1)
    worker = _Worker()
    writer.attach(worker, _Ranks(), attempt=0, fence="f")
    writer.storage = storage
    return writer, worker


def _start(writer: CheckpointWriter, root: str, step: int) -> _Write:
    """What ``take`` does after the capture: the write in its thread."""
    name = f"step-{step:010d}-e00000"
    job = _Write(name)
    state = {"global_step": step, "state_dict": {"w": torch.full((1000,), float(step))}}
    job.thread = threading.Thread(target=writer._write, daemon=True, args=(
        state, part_uri(root, name, 0, "f"), name, {"global_step": step, "epoch": 0}, job))
    writer._thread, writer._write_job = job.thread, job
    job.thread.start()
    return job


def test_a_part_write_is_retried_and_confirmed_once_written(tmp_path):
    root = str(tmp_path / "run")
    faults = Faults()
    faults.fail_writes = 2
    writer, worker = _writer(root, faulty_storage(root, faults))
    _start(writer, root, 3)
    writer.wait()
    assert [type(m) for m in worker.posted] == [PartWritten]
    assert load_checkpoint(part_uri(root, "step-0000000003-e00000", 0, "f"))["global_step"] == 3


def test_a_newer_checkpoint_supersedes_a_write_still_retrying(tmp_path, caplog):
    root = str(tmp_path / "run")
    faults = Faults()
    faults.read_only = True
    writer, worker = _writer(root, faulty_storage(root, faults, timeout_s=30))
    old = _start(writer, root, 2)
    old.released.wait(5)  # serialised: the host buffers are free, training went on
    with caplog.at_level(logging.WARNING, logger="ray_lit"):
        writer._settle_previous()  # what the next take does first
    assert "gives up writing checkpoint step-0000000002" in caplog.text
    assert writer.superseded == 1
    faults.read_only = False
    _start(writer, root, 4)
    writer.wait()
    old.thread.join(5)
    assert not old.thread.is_alive()
    # only the newer part is confirmed: the superseded one can never be committed
    assert [m.name for m in worker.posted] == ["step-0000000004-e00000"]


def test_a_slow_healthy_write_is_waited_for_not_superseded(tmp_path):
    root = str(tmp_path / "run")
    faults = Faults()
    faults.slow_s = 0.4
    writer, worker = _writer(root, faulty_storage(root, faults))
    _start(writer, root, 2)
    writer._settle_previous()  # the next checkpoint comes while the upload still runs
    assert writer.superseded == 0
    assert [m.name for m in worker.posted] == ["step-0000000002-e00000"]


def test_a_part_write_past_the_bound_raises_on_the_loop_thread(tmp_path):
    root = str(tmp_path / "run")
    faults = Faults()
    faults.enospc = True
    writer, worker = _writer(root, faulty_storage(root, faults, timeout_s=0.2))
    _start(writer, root, 2)
    with pytest.raises(StorageUnavailableError, match="storage_retry_timeout_s=0.2"):
        writer.wait()
    assert worker.posted == []


def test_a_local_part_write_falls_back_to_retrying_from_memory(tmp_path, monkeypatch):
    """A local run directory streams the part to disk; when that fails (torch reports a full
    disk as RuntimeError) the part is serialised to memory and retried."""
    import ray_lit.storage.checkpoint_io as checkpoint_io

    root = str(tmp_path / "run")
    writer, worker = _writer(root, Storage(root, retry=StorageRetry(10, 0.01, 0.02)))
    failures = {"n": 1}
    real = checkpoint_io._save_local

    def full_once(checkpoint, path):
        if failures["n"]:
            failures["n"] -= 1
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write "
                               "failed")
        real(checkpoint, path)

    monkeypatch.setattr(checkpoint_io, "_save_local", full_once)
    _start(writer, root, 5)
    writer.wait()
    assert failures["n"] == 0 and len(worker.posted) == 1
    assert load_checkpoint(part_uri(root, "step-0000000005-e00000", 0, "f"))["global_step"] == 5


def test_the_writer_builds_its_storage_from_the_option(tmp_path):
    class _Config:
        storage_retry_timeout_s = 12.5

    class _Trainer:
        config = _Config()

    writer = CheckpointWriter(str(tmp_path), every_n_steps=1)
    assert writer._storage(_Trainer()).retry.timeout_s == 12.5


# --- the option ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, "300", True, float("nan"), float("inf"), None])
def test_a_bad_storage_retry_timeout_is_refused_by_name(bad):
    with pytest.raises(MisconfigurationException, match="storage_retry_timeout_s"):
        ray_lit.Trainer(storage_retry_timeout_s=bad)


def test_the_storage_retry_timeout_option_is_accepted():
    assert ray_lit.Trainer().config.storage_retry_timeout_s == 300
    assert ray_lit.Trainer(storage_retry_timeout_s=0).config.storage_retry_timeout_s == 0


# --- loggers on a full disk ------------------------------------------------------------------
class _Disk:
    """``open`` for a logger module that fails while ``full`` (after writing ``torn`` bytes
    of an append, as a disk that fills up half-way does)."""

    def __init__(self) -> None:
        self.full = False
        self.torn = 0

    def open(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not self.full or "r" in mode:
            return open(path, mode, *args, **kwargs)  # noqa: SIM115 - handed to the caller
        if "a" in mode and self.torn:
            with open(path, mode, *args, **kwargs) as f:
                f.write("9" * self.torn)  # a torn row
        raise OSError(errno.ENOSPC, "No space left on device")


def _rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_survives_a_full_disk_and_writes_every_row_once(tmp_path, monkeypatch,
                                                                  caplog):
    import ray_lit.loggers.csv_logs as csv_logs
    import ray_lit.loggers.disk_faults as disk_faults

    disk = _Disk()
    monkeypatch.setattr(csv_logs, "open", disk.open, raising=False)
    monkeypatch.setattr(disk_faults, "_FIRST_PAUSE_S", 0.0)
    logger = CSVLogger(str(tmp_path), name="run", flush_logs_every_n_steps=1)
    logger.log_metrics({"loss": 1.0}, step=0)
    disk.full, disk.torn = True, 7
    with caplog.at_level(logging.WARNING, logger="ray_lit"):
        for step in range(1, 4):
            logger.log_metrics({"loss": float(step)}, step=step)
        logger.log_metrics({"loss": 4.0, "acc": 0.5}, step=4)  # a new column meanwhile
        logger.log_hyperparams({"lr": 0.1})
    assert caplog.text.count("could not") == 1  # one warning for the outage
    disk.full = False
    logger.log_metrics({"loss": 5.0}, step=5)
    logger.finalize("success")
    rows = _rows(logger.experiment.metrics_file_path)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert rows[4]["acc"] == "0.5"
    assert "writes again" in caplog.text
    assert "lr: 0.1" in (tmp_path / "run" / "version_0" / "hparams.yaml").read_text()


def test_csv_logger_finalize_on_a_full_disk_does_not_raise(tmp_path, monkeypatch):
    import ray_lit.loggers.csv_logs as csv_logs

    disk = _Disk()
    monkeypatch.setattr(csv_logs, "open", disk.open, raising=False)
    logger = CSVLogger(str(tmp_path), name="run")
    logger.log_metrics({"loss": 1.0}, step=0)
    disk.full = True
    logger.finalize("success")
    logger.save()
    assert logger.experiment.metrics  # kept for a later try


def test_tensorboard_logger_survives_a_dead_event_writer(tmp_path, monkeypatch, caplog):
    from tensorboardX import record_writer

    import ray_lit.loggers.disk_faults as disk_faults

    monkeypatch.setattr(disk_faults, "_FIRST_PAUSE_S", 0.0)
    logger = TensorBoardLogger(str(tmp_path), name="tb", max_queue=2, flush_secs=0.01)
    logger.log_metrics({"a": 1.0}, step=0)
    time.sleep(0.3)  # the event thread writes and flushes it (flush_secs) before the disk fills
    logger.save()
    full = {"on": True}
    real_write = record_writer.RecordWriter.write

    def write(self, data):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    monkeypatch.setattr("threading.excepthook", lambda args: None)  # the thread's own report
    with caplog.at_level(logging.WARNING, logger="ray_lit"):
        done = threading.Event()

        def log_many():
            for step in range(1, 60):  # far more than the queue holds
                logger.log_metrics({"a": float(step), "b": 1.0}, step=step)
                time.sleep(0.002)
            logger.save()
            done.set()

        runner = threading.Thread(target=log_many, daemon=True)
        runner.start()
        assert done.wait(20), "a logger call blocked on a dead event writer"
    assert "could not" in caplog.text
    full["on"] = False
    logger.log_metrics({"a": 100.0}, step=100)
    logger.finalize("success")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for event_file in (tmp_path / "tb" / "version_0").glob("events.*"):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        if "a" in acc.Tags()["scalars"]:
            steps |= {e.step for e in acc.Scalars("a")}
    assert {0, 100} <= steps


def test_tensorboard_logger_without_a_writable_directory_keeps_going(tmp_path, monkeypatch,
                                                                    caplog):
    import ray_lit.loggers.tensorboard as tensorboard

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monkeypatch.setattr(tensorboard.os, "makedirs", read_only)
    with caplog.at_level(logging.WARNING, logger="ray_lit"):
        logger.log_hyperparams({"lr": 0.1})
        logger.log_metrics({"a": 1.0}, step=0)
        logger.save()
        logger.finalize("success")
    assert "Read-only" in caplog.text
    monkeypatch.undo()
    logger.disk._next_try = 0.0
    logger.save()  # hparams.yaml written now
    assert "lr: 0.1" in (tmp_path / "tb" / "version_0" / "hparams.yaml").read_text()


def test_a_dead_tensorboard_writer_is_replaced_for_direct_experiment_calls(tmp_path,
                                                                          monkeypatch):
    from ray_lit.loggers import tensorboard

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    first = logger.experiment
    monkeypatch.setattr(tensorboard, "_alive", lambda writer: writer is not first)
    second = logger.experiment  # a user's add_image must not block on the dead writer's queue
    assert second is not first and logger.disk.failing
    logger.finalize("success")
