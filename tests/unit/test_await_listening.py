"""The driver asks the other ranks to join only once rank 0's rendezvous store listens
(``worker_group.await_listening``, issue 17): a rank that connects too early backs off in
torch's connect loop for 0.5-1 s, most of a warm start at 16 workers."""

from __future__ import annotations

import socket
import threading
import time

from ray_lit.driver.worker_group import await_listening
from ray_lit.worker.process_group import find_free_port


def _listen_after(port: int, delay_s: float, stop: threading.Event) -> threading.Thread:
    def serve() -> None:
        time.sleep(delay_s)
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()
            stop.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_it_returns_once_the_store_listens_and_not_before():
    port, stop = find_free_port("127.0.0.1"), threading.Event()
    _listen_after(port, 0.3, stop)
    begin = time.monotonic()
    try:
        assert await_listening("127.0.0.1", port, timeout_s=5.0, failed=lambda: False)
    finally:
        stop.set()
    assert 0.3 <= time.monotonic() - begin < 2.0


def test_rank_0_failing_ends_the_wait_at_once():
    port = find_free_port("127.0.0.1")  # nothing will listen there
    begin = time.monotonic()
    assert not await_listening("127.0.0.1", port, timeout_s=5.0, failed=lambda: True)
    assert time.monotonic() - begin < 1.0


def test_a_store_that_never_listens_is_waited_for_only_until_the_timeout():
    port = find_free_port("127.0.0.1")
    begin = time.monotonic()
    assert not await_listening("127.0.0.1", port, timeout_s=0.3,
                               failed=lambda: time.sleep(0.005) or False)
    assert 0.3 <= time.monotonic() - begin < 2.0
