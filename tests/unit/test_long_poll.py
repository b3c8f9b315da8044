"""A worker's long poll: it waits for news, and news (a checkpoint part, the loop's end, a
wake from the driver) ends the wait at once."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

from ray_lit.messages import Job, PartWritten, SnapshotPart, WorkerState
from ray_lit.worker.actor import Worker


@pytest.fixture
def worker() -> Iterator[Worker]:
    previous = signal.getsignal(signal.SIGTERM)
    built = Worker()  # on the main thread it installs its SIGTERM handler: put ours back
    signal.signal(signal.SIGTERM, previous)
    yield built


def _later(delay_s: float, fn, *args) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), fn(*args)), daemon=True)
    thread.start()
    return thread


def test_a_quiet_poll_waits_for_its_time(worker: Worker) -> None:
    start = time.monotonic()
    status = worker.poll(wait_s=0.3)
    assert time.monotonic() - start >= 0.3
    assert status.state is WorkerState.IDLE and status.handed_over == ()


def test_a_posted_part_ends_the_wait_and_is_handed_over(worker: Worker) -> None:
    part = PartWritten("step-4", 0, 2, {"global_step": 4})
    _later(0.1, worker.post, part)
    start = time.monotonic()
    status = worker.poll(wait_s=30)
    assert time.monotonic() - start < 10
    assert status.handed_over == (part,)
    assert worker.poll().handed_over == ()  # handed over once


def test_a_wake_ends_the_wait(worker: Worker) -> None:
    _later(0.1, worker.wake)
    start = time.monotonic()
    worker.poll(wait_s=30)
    assert time.monotonic() - start < 10


def test_the_loop_ending_ends_the_wait(worker: Worker) -> None:
    # a payload that does not unpickle: the loop thread fails at once
    worker._main([b"not a pickle", Job(stage="fit")])
    start = time.monotonic()
    status = worker.poll(wait_s=30)
    assert time.monotonic() - start < 10
    assert status.state is WorkerState.FAILED and "Traceback" in status.failure.traceback


def test_news_before_the_poll_is_not_lost(worker: Worker) -> None:
    worker.post(SnapshotPart((0, 2), 1, 2, b"part"))
    start = time.monotonic()
    assert worker.poll(wait_s=30).handed_over == (SnapshotPart((0, 2), 1, 2, b"part"),)
    assert time.monotonic() - start < 10
    # and once it was read, the next poll waits again
    start = time.monotonic()
    worker.poll(wait_s=0.2)
    assert time.monotonic() - start >= 0.2
