"""The driver's long polls on real Ray (``driver.news.NewsFeed``): only the ranks that had news
are polled again, a quiet rank answers at its heartbeat, a dead one at once, and the polls of
an ended attempt are closed with what they carried."""

from __future__ import annotations

import sys
import time

import cloudpickle
import pytest

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def actors(ray_cluster):  # one start for the module (the second test kills the last one)
    import ray

    from ray_lit.driver.worker_group import _RemoteWorker

    started = [_RemoteWorker.options(num_cpus=0, max_concurrency=2).remote() for _ in range(3)]
    ray.get([a.poll.remote() for a in started], timeout=120)
    yield started
    for actor in started:
        ray.kill(actor)


def test_only_ranks_with_news_are_polled_again(actors):
    from ray_lit.driver.news import NewsFeed
    from ray_lit.messages import PartWritten

    feed = NewsFeed(actors)
    start = time.monotonic()
    assert feed.collect(wait_s=0.3, heartbeat_s=60, timeout_s=30) == {}  # nobody has news
    assert time.monotonic() - start < 10 and feed.calls == 3
    part = PartWritten("step-2", 1, 3, {"global_step": 2})
    actors[1].post.remote(part)
    news = {}
    deadline = time.monotonic() + 30
    while not news and time.monotonic() < deadline:
        news = feed.collect(wait_s=1.0, heartbeat_s=60, timeout_s=30)
    assert list(news) == [1] and news[1].handed_over == (part,)
    assert feed.collect(wait_s=0.3, heartbeat_s=60, timeout_s=30) == {}
    assert feed.calls == 4  # rank 1 polled again; ranks 0 and 2 still on their first poll
    closed = feed.close(timeout_s=30)  # every poll in flight ends now, with its status
    assert sorted(closed) == [0, 1, 2]


def test_a_quiet_rank_answers_at_its_heartbeat_and_a_dead_one_at_once(actors):
    import ray

    from ray_lit.driver.news import NewsFeed, WorkerGone

    feed = NewsFeed(actors)
    start = time.monotonic()
    heard: dict = {}
    while len(heard) < 3 and time.monotonic() - start < 30:
        heard.update(feed.collect(wait_s=0.5, heartbeat_s=1.0, timeout_s=30))
    assert sorted(heard) == [0, 1, 2] and time.monotonic() - start >= 1.0  # the heartbeat
    ray.kill(actors[2], no_restart=True)
    gone: dict = {}
    start = time.monotonic()
    while 2 not in gone and time.monotonic() - start < 30:
        gone.update(feed.collect(wait_s=0.5, heartbeat_s=60, timeout_s=30))
    assert isinstance(gone[2], WorkerGone) and gone[2].kind == "actor_died"
    assert time.monotonic() - start < 10  # not the heartbeat, nor the poll timeout
    feed.close(timeout_s=5)


def test_a_poll_never_answered_is_a_hang(actors):
    from ray_lit.driver.news import NewsFeed, WorkerGone

    feed = NewsFeed([_Frozen(actors[0])])
    start = time.monotonic()
    out: dict = {}
    while not out and time.monotonic() - start < 30:
        out = feed.collect(wait_s=0.5, heartbeat_s=0.5, timeout_s=1.0)
    assert isinstance(out[0], WorkerGone) and out[0].kind == "hang"
    assert 1.5 <= time.monotonic() - start < 10  # its heartbeat plus the poll timeout
    assert feed.close(timeout_s=0.5) == {}  # nothing in flight any more


class _Frozen:
    """Stands in for an actor whose poll never answers (a frozen process): its ``poll`` is a
    task that sleeps."""

    def __init__(self, actor) -> None:
        import ray

        @ray.remote(num_cpus=0)
        def sleeping(wait_s: float) -> None:
            time.sleep(120)

        self.poll = type("Method", (), {"remote": staticmethod(sleeping.remote)})()
        self.wake = actor.wake
