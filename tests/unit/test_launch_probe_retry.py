"""A rerun of a named run waits out a storage outage at launch; a new run fails fast.

The driver's write probe before workers start (``driver.launch.launch_fit``, and
``Trainer._probe_remote_storage`` for URIs) used to try once, so a driver restarted during an
outage (a preempted job resubmitted while S3 is briefly down) failed at once, although the run
it continues would have waited out the same outage (``storage_retry_timeout_s``)."""

from __future__ import annotations

import dataclasses
import time

import pyarrow.fs as pafs
import pytest
from test_storage_faults import Faults, FaultyHandler

from ray_lit.errors import MisconfigurationException
from ray_lit.storage.filesystem import Storage
from ray_lit.storage.retry import StorageRetry, StorageUnavailableError, launch_retry


@pytest.mark.parametrize("run_name, resume, waits", [
    ("nightly", "auto", True),  # a rerun continuing its run: the storage was there before
    (None, "auto", False),  # a new run: a mistyped endpoint must fail in seconds
    ("nightly", "never", False),  # a fresh start under a reused name
    ("nightly", "/ckpts/a.ckpt", False),  # resumes from a given file, not the run directory
])
def test_only_a_rerun_of_a_named_run_waits(run_name, resume, waits) -> None:
    retry = launch_retry(run_name, resume, 42.0)
    assert (retry is not None) == waits
    if waits:
        assert retry.timeout_s == 42.0


def _faulty(root: str, faults: Faults, retry: StorageRetry | None) -> Storage:
    return Storage(root, retry=retry, filesystem=pafs.PyFileSystem(FaultyHandler(faults)))


def test_the_probe_of_a_rerun_succeeds_once_storage_is_back(tmp_path) -> None:
    faults = Faults()
    faults.fail_writes = 3  # refused connections, then the endpoint is back
    retry = StorageRetry(10.0, base_delay_s=0.01, max_delay_s=0.05)
    _faulty(str(tmp_path / "run"), faults, retry).check_writable()
    assert faults.writes_tried == 4 and retry.outages == 1


def test_without_a_retry_the_probe_fails_at_once_naming_the_option(tmp_path) -> None:
    faults = Faults()
    faults.fail_writes = 1
    start = time.monotonic()
    with pytest.raises(MisconfigurationException, match="storage_path .* is not writable"):
        _faulty(str(tmp_path / "run"), faults, None).check_writable()
    assert time.monotonic() - start < 5 and faults.writes_tried == 1


def test_a_rerun_s_probe_gives_up_past_the_bound(tmp_path) -> None:
    faults = Faults()
    faults.fail_writes = 10**6  # the outage does not end
    retry = StorageRetry(0.3, base_delay_s=0.01, max_delay_s=0.05)
    with pytest.raises(StorageUnavailableError, match="storage_retry_timeout_s"):
        _faulty(str(tmp_path / "run"), faults, retry).check_writable()


def test_launch_fit_probes_a_named_rerun_with_the_run_s_bound(monkeypatch, tmp_path) -> None:
    """``launch_fit`` builds its probe's Storage with the retry of ``launch_retry``."""
    import ray_lit as pl
    from ray_lit.driver import launch

    seen: list = []

    class Stop(Exception):
        pass

    def probe(self: Storage) -> None:
        seen.append(self.retry)
        raise Stop

    monkeypatch.setattr(Storage, "check_writable", probe)
    for run_name, waits in (("nightly", True), (None, False)):
        trainer = pl.Trainer(num_workers=2, run_name=run_name, storage_retry_timeout_s=7,
                             default_root_dir=str(tmp_path), logger=False,
                             enable_progress_bar=False)
        with pytest.raises(Stop):
            launch.launch_fit(trainer, None, None, None, None, None)
        assert (seen[-1] is not None) == waits
        if waits:
            assert seen[-1].timeout_s == 7


def test_the_remote_probe_of_a_named_rerun_waits_too(monkeypatch, tmp_path) -> None:
    """``s3://`` and other URIs are probed (bounded, in a thread) when ``fit`` starts: a named
    rerun's probe gets the same retry."""
    import ray_lit as pl
    from ray_lit.storage import probe

    seen: list = []
    monkeypatch.setattr(probe, "probe_storage",
                        lambda uri, timeout_s=None, retry=None: seen.append((uri, retry)))
    trainer = pl.Trainer(num_workers=2, run_name="nightly", storage_retry_timeout_s=9,
                         default_root_dir=str(tmp_path), logger=False,
                         enable_progress_bar=False)
    trainer.config = dataclasses.replace(trainer.config, storage_path="s3://bucket/runs")
    trainer._probe_remote_storage()
    assert seen[-1][0] == "s3://bucket/runs" and seen[-1][1].timeout_s == 9
