"""``WarmPool``: worker actors a finished Trainer left, parked for the next Trainer (driver).

A Trainer keeps its worker group between its own calls (``launch.KeptGroup``). When the Trainer
itself goes (garbage collected: a notebook cell rebinds ``trainer``, a script calls
``ray_lit.fit`` again), its idle group is not killed but parked here: every worker leaves its
process group and drops the run's state (the same ``WorkerGroup.salvage`` that keeps the
survivors of a lost worker), and the actors, with torch and ray_lit imported and their
placement group still reserved, wait for the next Trainer of this driver process that asks for
the same placement (workers, resources, strategy). That Trainer forms a new process group on
them and ships its own payload: a fresh module, optimizer, RNG seed and process group, nothing
of the earlier run (the workers rebuild everything from the payload, as after a restart).

A parked group costs its reserved resources, so it is released after ``idle_s`` seconds
(``RAY_LIT_WARM_POOL_IDLE_S``, default 60; 0 turns the pool off), when a Trainer needs a group
of another shape (before that group is placed), by ``trainer.teardown()`` (an explicit release
never parks), and at interpreter exit.

Inside a Ray Tune trial the workers sit in the trial's own placement group, which dies with the
trial's actor. With ``TuneConfig(reuse_actors=True)`` Tune keeps that actor, and its placement
group, for the next trial that asks for the same resources, so a trial's group is parked here
at the trial's end (``ray_lit.tune``), keyed by that placement group as well, and the next trial
run by the same actor adopts it. Without reuse the trial's actor goes, and its parked workers
with it (they are its children, in its placement group): nothing leaks.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["POOL", "WarmPool", "current_ray_job"]

_ENV = "RAY_LIT_WARM_POOL_IDLE_S"


def _idle_from_env() -> float:
    raw = os.environ.get(_ENV, "60")
    try:
        value = float(raw)
    except ValueError:
        log.warning("ray_lit: %s=%r is not a number of seconds; the warm pool stays off",
                    _ENV, raw)
        return 0.0
    return max(0.0, value)


class WarmPool:
    """Parked worker groups of this driver process, by the options they were placed with.

    Args:
        idle_s: how long a parked group waits for a Trainer before it is released; 0: never
            park (release at once).
    """

    def __init__(self, idle_s: float | None = None) -> None:
        self.idle_s = _idle_from_env() if idle_s is None else idle_s
        self._lock = threading.Lock()
        self._parked: dict[str, tuple[dict[str, Any], Any, float]] = {}
        self._timer: threading.Timer | None = None
        self._closed = False
        self.parked_total = 0  # groups parked so far (tests, diagnostics)
        self.taken_total = 0  # groups a later Trainer ran on

    @staticmethod
    def _key(options: dict[str, Any]) -> str:
        # a Tune trial's group lives in the trial's placement group: only a trial of the same
        # placement group (the same trial actor, reused) may adopt it
        pg = _current_placement_group_id() if options.get("use_current_pg") else None
        return repr(sorted(options.items())) + (f"@{pg}" if pg else "")

    def park(self, group: Any, options: dict[str, Any]) -> bool:
        """Park an idle, finished ``group`` placed with ``options`` (a Trainer's kept group
        whose Trainer went, or a Tune trial's that ended: in this process's own placement
        group). Returns False where it was released instead."""
        import ray

        if (self.idle_s <= 0 or self._closed or not ray.is_initialized()
                or not (getattr(group, "owned", True) or _in_current_placement_group(group))):
            group.shutdown()
            return False
        try:
            survivors = group.salvage(abort_timeout_s=5.0)
        except Exception:  # noqa: BLE001 (its actors are gone: a Ray that was shut down)
            return False
        if survivors is None:
            return False
        if len(survivors.actors) != len(survivors.slots) or survivors.stuck:
            survivors.release()  # a worker went meanwhile: not worth keeping
            return False
        survivors.snapshots, survivors.confirmations = {}, []
        survivors.ray_job = current_ray_job()  # an entry of an earlier Ray session is stale
        key = self._key(options)
        with self._lock:
            older = self._parked.pop(key, None)
            self._parked[key] = (dict(options), survivors, time.monotonic())
            self.parked_total += 1
        if older is not None:
            older[1].release()
        self._arm_timer()
        return True

    def take(self, options: dict[str, Any]) -> Any:
        """The parked workers placed with ``options`` (as ``Survivors``: the controller forms
        a new process group on them), or None."""
        with self._lock:
            entry = self._parked.pop(self._key(options), None)
        if entry is None:
            return None
        survivors = entry[1]
        if getattr(survivors, "ray_job", None) != current_ray_job() or not _answer(survivors):
            _release(survivors)  # Ray restarted, or a worker went while parked
            return None
        self.taken_total += 1
        return survivors

    def drain(self) -> None:
        """Release every parked group (a Trainer needs another shape, or the process ends)."""
        with self._lock:
            entries, self._parked = list(self._parked.values()), {}
        for _, survivors, _ in entries:
            _release(survivors)

    def close(self) -> None:
        """At interpreter exit: release everything, park nothing more."""
        self._closed = True
        self.drain()

    def __len__(self) -> int:
        return len(self._parked)

    # --- idle timeout ----------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(min(self.idle_s, 5.0), self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._timer = None
            expired = [key for key, (_, _, since) in self._parked.items()
                       if now - since >= self.idle_s]
            entries = [self._parked.pop(key) for key in expired]
            remaining = bool(self._parked)
        for _, survivors, _ in entries:
            _release(survivors)
        if remaining:
            self._arm_timer()


def current_ray_job() -> str | None:
    """This driver's Ray job id, None without Ray: a worker group belongs to the Ray session
    it was started in (after ``ray.shutdown()`` and a new ``ray.init()`` its handles are dead)."""
    import ray

    return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None


def _current_placement_group_id() -> str | None:
    """The placement group this process runs in (a Tune trial's), None outside one."""
    import ray

    current = ray.util.get_current_placement_group() if ray.is_initialized() else None
    return current.id.hex() if current is not None else None


def _in_current_placement_group(group: Any) -> bool:
    """Whether a group not owned by ray_lit sits in this process's own placement group (a Tune
    trial's): parked, it lives and dies with this process."""
    pg_id = getattr(getattr(group, "placement_group", None), "id", None)
    return pg_id is not None and pg_id.hex() == _current_placement_group_id()


def _answer(survivors: Any, timeout_s: float = 10.0) -> bool:
    """Whether every parked worker still answers."""
    import ray

    try:
        ray.get([actor.node_info.remote() for actor in survivors.actors.values()],
                timeout=timeout_s)
    except Exception:  # noqa: BLE001 (dead, or not answering: not worth waiting for)
        return False
    return True


def _release(survivors: Any) -> None:
    import ray

    if ray.is_initialized():  # after ray.shutdown() the actors are gone already
        survivors.release()


POOL = WarmPool()
# registered after weakref.finalize's own exit hook (imported earlier), so it runs first: a
# Trainer finalized at exit then releases its group instead of parking it
atexit.register(POOL.close)
