"""A worker's start-up stamps (``Worker.startup_timings``): each phase of a group's start-up
(imports, constructor, process group, payload) is stamped once it happened, in order, so a
benchmark can tell where the time to the first step goes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import cloudpickle
import pytest

from ray_lit.messages import Job, WorkerState
from ray_lit.worker.actor import Worker
from ray_lit.worker.process_group import destroy_process_group, find_free_port
from ray_lit.worker.ranks import WorkerRanks


@pytest.fixture
def worker() -> Iterator[Worker]:
    previous = signal.getsignal(signal.SIGTERM)
    built = Worker()  # on the main thread it installs its SIGTERM handler: put ours back
    signal.signal(signal.SIGTERM, previous)
    yield built


def _wait_for(worker: Worker, key: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while key not in worker.startup_timings() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_constructor_stamps_imports_and_itself_in_order(worker: Worker) -> None:
    stamps = worker.startup_timings()
    assert stamps["import_start"] <= stamps["imported"] <= stamps["init_start"] \
        <= stamps["init_done"] <= time.time()
    assert "setup_start" not in stamps and "run_start" not in stamps  # not happened yet
    _wait_for(worker, "warm_imports_done")
    assert worker.startup_timings()["warm_imports_done"] >= stamps["init_start"]


def test_the_stamps_handed_out_are_a_copy(worker: Worker) -> None:
    worker.startup_timings()["init_done"] = 0.0
    assert worker.startup_timings()["init_done"] > 0.0


def test_joining_the_process_group_is_stamped(worker: Worker) -> None:
    saved = dict(os.environ)  # setup exports MASTER_ADDR, RANK, ... as torchrun would
    try:
        worker.setup(ranks=WorkerRanks(0, 0, 0, 1, 1), master_addr="127.0.0.1",
                     master_port=find_free_port("127.0.0.1"), backend="gloo", timeout_s=30,
                     env={}, num_threads=None)
    finally:
        destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
    stamps = worker.startup_timings()
    assert stamps["init_done"] <= stamps["setup_start"] <= stamps["process_group_joined"]


def test_a_run_stamps_its_start_and_the_unpickled_payload(worker: Worker) -> None:
    # a payload that unpickles but cannot run here (no process group): the loop fails at once
    worker.run(cloudpickle.dumps({}), Job(stage="fit"))
    worker._thread.join(30)
    assert worker.poll().state is WorkerState.FAILED
    stamps = worker.startup_timings()
    assert stamps["init_done"] <= stamps["run_start"] <= stamps["payload_unpickled"]
