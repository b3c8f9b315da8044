"""``WorkerGroup``: the N actors of one attempt, placed together and joined in a process group.

``create`` reserves a placement group, starts one actor per bundle, derives ranks from where
the actors landed, and forms the torch.distributed group on rank 0's node. ``shutdown`` releases
actors and the placement group; it is safe to call on a half-built group and more than once.
After a failure (or before a planned resize) ``salvage`` keeps the live actors and the
placement group (``Survivors``), and the next ``create`` starts actors only in the bundle
slots the controller chose to fill (the dead workers' places when they can be refilled, places
that came back, or none: the group shrinks to the kept workers): no new processes, imports or
CUDA contexts for the workers that survived.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_lit.driver.news import NewsFeed, WorkerGone
from ray_lit.driver.placement import create_placement_group, remove_placement_group_quietly
from ray_lit.messages import HandedOver, Job, RankStacks, WorkerStatus
from ray_lit.worker.actor import Worker
from ray_lit.worker.process_group import choose_backend
from ray_lit.worker.ranks import WorkerRanks, assign_ranks

log = logging.getLogger("ray_lit")

__all__ = ["Survivors", "WorkerGone", "WorkerGroup", "WorkerInfo", "await_listening"]

_RemoteWorker = ray.remote(Worker)


@dataclass
class WorkerInfo:
    actor: Any
    ranks: WorkerRanks
    node_id: str
    node_ip: str
    gpu_ids: list[str]
    pid: int
    bundle_index: int = 0


@dataclass
class Survivors:
    """What an ended attempt leaves for the next one: its placement group and the actors that
    are still alive and idle, by bundle slot (slot ``i`` is bundle ``i + offset``)."""

    placement_group: Any
    owned: bool
    offset: int
    slots: list[int]  # the ended group's slots, in rank order
    actors: dict[int, Any]
    dead_nodes: list[str] = field(default_factory=list)  # where the lost workers ran
    # what the survivors had not yet handed to the driver: checkpoint parts they finished
    # writing while leaving (the driver confirms them) and in-memory snapshot parts
    confirmations: list[HandedOver] = field(default_factory=list)
    # the in-memory snapshots each survivor holds, by bundle index (``peer_snapshot``)
    snapshots: dict[int, Any] = field(default_factory=dict)
    capacity: int = 0  # worker bundles in the placement group (the most workers it can host)
    # workers whose loop did not end in time (stuck in a collective): not kept, but they may
    # hold the newest peer snapshot, so they go only after the export (``drop_stuck``)
    stuck: dict[int, Any] = field(default_factory=dict)
    fill: list[int] = field(default_factory=list)  # slots the next group starts actors in
    # per survivor (bundle index), per FSDP snapshot key, the ranks whose shards it holds
    shards: dict[int, dict[Any, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def num_workers(self) -> int:
        """The size of the group these workers survived."""
        return len(self.slots)

    def drop_stuck(self) -> None:
        """Kill the stuck workers (after the next attempt's snapshot was exported)."""
        for actor in self.stuck.values():
            _kill(actor)
        self.stuck = {}

    def export_snapshot(self, bundle: int, key: Any, timeout_s: float = 120.0) -> Any:
        """An ObjectRef to the replicated part of snapshot ``key``, exported by the survivor
        in ``bundle`` (the next attempt's ranks fetch it; the driver never does), or None when
        the export failed. Returns once the export is done, so the survivor may go after."""
        actor = self.actors.get(bundle) or self.stuck[bundle]
        size, data = actor.export_snapshot.options(num_returns=2).remote(key)
        try:
            ray.get(size, timeout=timeout_s)
        except Exception as err:  # the holder died, or no longer has it
            log.warning("ray_lit: exporting peer snapshot %s failed: %s", key, err)
            return None
        return data

    def release(self) -> None:
        self.drop_stuck()
        for actor in self.actors.values():
            _kill(actor)
        if self.owned:
            remove_placement_group_quietly(self.placement_group)
        self.actors = {}


class WorkerGroup:
    """The actors of one attempt, in world-rank order."""

    def __init__(self, workers: list[WorkerInfo], placement_group: Any, owned: bool = True,
                 offset: int = 0, capacity: int | None = None) -> None:
        self.workers = workers
        self.placement_group = placement_group
        self.owned = owned
        self.offset = offset
        self.capacity = capacity if capacity is not None else len(workers)
        self._feed: NewsFeed | None = None  # the running attempt's long polls

    @property
    def slots(self) -> list[int]:
        """The placement-group slots this group's workers occupy."""
        return [w.bundle_index for w in self.workers]

    @property
    def world_size(self) -> int:
        return len(self.workers)

    @classmethod
    def create(cls, *, num_workers: int, per_worker: dict[str, float], strategy: str,
               device_type: str, placement_timeout_s: float, pg_timeout_s: float,
               env: dict[str, str], use_current_pg: bool = False,
               survivors: Survivors | None = None) -> WorkerGroup:
        """Reserve (or reuse) the placement group, start the actors that are missing, assign
        ranks by node and form the process group. With ``survivors`` the earlier attempt's
        live actors are kept and new ones start in ``survivors.fill`` only."""
        if survivors is not None:
            pg, owned, offset = survivors.placement_group, survivors.owned, survivors.offset
            capacity = survivors.capacity
            kept = dict(survivors.actors)
            survivors.actors = {}
            indices = sorted(kept) + [i for i in survivors.fill if i not in kept]
        else:
            # Inside a Tune trial the trial's own placement group already holds a bundle per
            # worker after the trial driver's bundle 0: use those, never reserve more.
            current = ray.util.get_current_placement_group() if use_current_pg else None
            owned = current is None
            pg = current or create_placement_group(num_workers, per_worker, strategy,
                                                   timeout_s=placement_timeout_s)
            offset = 0 if owned else 1
            capacity = num_workers
            kept = {}
            indices = list(range(num_workers))
        actors: dict[int, Any] = {}
        try:
            if len(indices) != num_workers:
                raise ValueError(f"{num_workers} workers asked, {len(kept)} kept + "
                                 f"{len(indices) - len(kept)} to fill")
            custom = {k: v for k, v in per_worker.items() if k not in ("CPU", "GPU")}
            for index in indices:
                actors[index] = kept.pop(index, None) or _RemoteWorker.options(
                    num_cpus=per_worker.get("CPU", 0), num_gpus=per_worker.get("GPU", 0),
                    resources=custom or None, max_concurrency=2,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=index + offset),
                ).remote()
            order = sorted(actors)
            infos = ray.get([actors[i].node_info.remote() for i in order],
                            timeout=placement_timeout_s)
            driver_node = ray.get_runtime_context().get_node_id()
            ranks = assign_ranks([i["node_id"] for i in infos], driver_node_id=driver_node)
            workers = sorted(
                (WorkerInfo(actors[b], r, i["node_id"], i["node_ip"], i["gpu_ids"], i["pid"], b)
                 for b, r, i in zip(order, ranks, infos)),
                key=lambda w: w.ranks.world_rank)
            group = cls(workers, pg, owned, offset, capacity)
            group._join_process_group(device_type, pg_timeout_s, env,
                                      per_worker.get("CPU"))
            return group
        except BaseException:
            for actor in list(actors.values()) + list(kept.values()):
                _kill(actor)
            if owned:
                remove_placement_group_quietly(pg)
            raise

    def salvage(self, abort_timeout_s: float = 10.0, lost_nodes: set[str] | frozenset = frozenset(),
                hung_rank: int | None = None) -> Survivors | None:
        """End an attempt keeping the live workers: each leaves the process group and drops
        the old run's state; dead or stuck ones are killed, and so are the workers on
        ``lost_nodes`` without asking (Ray may not know yet that they are gone). None when
        nobody survived.

        ``hung_rank``: the rank a hang was diagnosed on. It is asked first, without waiting
        for its loop, and killed at once unless it holds peer snapshots to export: the ranks
        waiting for it in a collective leave theirs only once its sockets close, so they are
        kept instead of being given up as stuck after ``abort_timeout_s``.
        """
        pending: dict[int, tuple[Any, Any]] = {}
        dead_nodes: list[str] = []
        if hung_rank is not None and hung_rank < len(self.workers) and \
                self.workers[hung_rank].node_id not in lost_nodes:
            hung = self.workers[hung_rank]
            ref = hung.actor.abort.remote(0.0)
            try:
                left = ray.get(ref, timeout=abort_timeout_s)
            except Exception:  # dead, or not answering either
                left = None
            if left is None:  # no snapshot to export from it: its peers go free now
                _kill(hung.actor)
            pending[hung.bundle_index] = (hung.actor, ray.put(left))
        for w in self.workers:
            if w.bundle_index in pending:
                continue
            if w.node_id in lost_nodes:
                _kill(w.actor)
                dead_nodes.append(w.node_id)
            else:
                pending[w.bundle_index] = (w.actor, w.actor.abort.remote(abort_timeout_s))
        alive: dict[int, Any] = {}
        nodes = {w.bundle_index: w.node_id for w in self.workers}
        confirmations: list[HandedOver] = []
        snapshots: dict[int, Any] = {}
        shards: dict[int, dict[Any, tuple[int, ...]]] = {}
        stuck: dict[int, Any] = {}
        deadline = time.monotonic() + abort_timeout_s + 5  # one deadline for all of them
        for index, (actor, ref) in pending.items():
            try:
                left = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as err:  # dead (RayActorError) or not answering
                log.debug("ray_lit: the worker in bundle %d is not kept: %r", index, err)
                left = None
            if left is not None:
                confirmations.extend(left.handed_over)
                snapshots[index] = list(left.snapshots)
                shards[index] = dict(left.shards)
                if left.stuck:  # alive, loop stuck: replaced once its snapshot is out
                    log.debug("ray_lit: the worker in bundle %d is stuck in its loop", index)
                    stuck[index] = actor
                    continue
                alive[index] = actor
                continue
            dead_nodes.append(nodes[index])
            _kill(actor)
        survivors = Survivors(self.placement_group, self.owned, self.offset, self.slots,
                              alive, dead_nodes, confirmations, snapshots, self.capacity,
                              stuck=stuck, shards=shards)
        self.workers = []
        if not alive and not any(snapshots.get(i) for i in stuck):
            survivors.release()
            return None
        return survivors

    def _join_process_group(self, device_type: str, timeout_s: float, env: dict[str, str],
                            cpus: float | None) -> None:
        backend = choose_backend(device_type)
        rank0 = self.workers[0]
        port = ray.get(rank0.actor.free_port.remote())
        options = dict(master_addr=rank0.node_ip, master_port=port, backend=backend,
                       timeout_s=timeout_s, env=env, num_threads=int(cpus) if cpus else None)
        first = rank0.actor.setup.remote(ranks=rank0.ranks, **options)
        if len(self.workers) > 1 and rank0.node_id == ray.get_runtime_context().get_node_id():
            # the other ranks connect to the store rank 0 serves; one that finds it not yet
            # listening backs off in torch's connect loop for 0.5-1 s, which was most of a warm
            # start at 16 workers on 2 cores: they are asked once it listens
            await_listening(rank0.node_ip, port, timeout_s=min(timeout_s, 5.0),
                            failed=lambda: bool(ray.wait([first], timeout=0.005)[0]))
        ray.get([first] + [w.actor.setup.remote(ranks=w.ranks, **options)
                           for w in self.workers[1:]])
        log.info("ray_lit: worker group of %d formed (%s, rank 0 at %s:%d)", self.world_size,
                 backend, rank0.node_ip, port)

    def run(self, payload_ref: Any, job: Job) -> None:
        """Start ``job`` on every rank (driver); its news comes through ``news``."""
        ray.get([w.actor.run.remote(payload_ref, job) for w in self.workers])
        self._feed = NewsFeed([w.actor for w in self.workers])

    def news(self, *, wait_s: float, heartbeat_s: float,
             timeout_s: float) -> dict[int, WorkerStatus | WorkerGone]:
        """One round of the driver's supervision: the status of every rank that had news
        (or whose heartbeat was due) within ``wait_s``, by rank; ``WorkerGone`` for a dead
        rank or one whose poll went unanswered (``NewsFeed``). Ranks not in the answer have
        nothing new to say."""
        if self._feed is None:
            raise RuntimeError("ray_lit: news asked of a worker group that runs nothing")
        return self._feed.collect(wait_s=wait_s, heartbeat_s=heartbeat_s, timeout_s=timeout_s)

    def wake(self, ranks: list[int]) -> None:
        """Have these ranks answer their long polls now (the driver wants their status)."""
        for rank in ranks:
            self.workers[rank].actor.wake.remote()

    def end_news(self, timeout_s: float = 2.0) -> dict[int, WorkerStatus | WorkerGone]:
        """End the attempt's long polls (driver, when the attempt is over) and return what
        the ranks answered to them (``NewsFeed.close``)."""
        feed, self._feed = self._feed, None
        return feed.close(timeout_s) if feed is not None else {}

    def poll(self, wait_s: float = 0.0) -> list[Any]:  # a full poll: tests, stop planning
        """One poll per worker (ObjectRefs; a dead actor's ref raises on get)."""
        return [w.actor.poll.remote(wait_s) for w in self.workers]

    def statuses(self, timeout_s: float = 30.0,
                 wait_s: float = 0.0) -> list[WorkerStatus | WorkerGone]:
        """Every worker's status (see ``Worker.poll``), or ``WorkerGone`` for one that
        is dead or did not answer within ``timeout_s``: a poll of the whole group, for the
        few moments the driver needs every rank at once (the step a stop is planned at, a
        failure's root cause); a running attempt's rounds use ``news``.

        With ``wait_s`` each worker's poll waits up to that long for news. The first poll
        back early (news, or a dead actor's error) wakes the others, so the driver sees the
        whole group's status as soon as one rank has something to say.
        """
        refs = self.poll(wait_s)
        start = time.monotonic()
        deadline = start + wait_s + timeout_s  # one deadline for the whole group
        if wait_s > 0 and len(refs) > 1:
            ready, pending = ray.wait(refs, num_returns=1, timeout=deadline - start)
            if ready and pending and time.monotonic() - start < 0.8 * wait_s:
                for ref, worker in zip(refs, self.workers):
                    if ref in pending:
                        worker.actor.wake.remote()
        out: list[WorkerStatus | WorkerGone] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except RayActorError as err:
                out.append(WorkerGone("actor_died", str(err)))
            except GetTimeoutError:
                out.append(WorkerGone("hang", f"the worker did not answer a poll within "
                                              f"{timeout_s:.0f} s"))
        return out

    def request_stop_at(self, step: int) -> None:
        """Every rank checkpoints at optimizer step ``step``, then leaves its loop."""
        ray.get([w.actor.request_stop_at.remote(step) for w in self.workers], timeout=30)

    def stacks(self, timeout_s: float = 10.0) -> list[RankStacks | None]:
        """Every rank's thread stacks (None for a rank that did not answer in time)."""
        refs = [w.actor.dump_stacks.remote() for w in self.workers]
        deadline = time.monotonic() + timeout_s
        out: list[RankStacks | None] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=max(0.1, deadline - time.monotonic())))
            except Exception:  # dead or unresponsive: its stack is not to be had
                out.append(None)
        return out

    def alive(self, timeout_s: float = 10.0) -> bool:
        """Whether every actor still answers (a kept group idles between a Trainer's calls;
        a node may have gone meanwhile)."""
        try:
            ray.get([w.actor.node_info.remote() for w in self.workers], timeout=timeout_s)
        except Exception:
            return False
        return bool(self.workers)

    def shutdown(self, graceful: bool = True) -> None:
        self._feed = None  # polls in flight fail with their actors
        if graceful:
            try:
                ray.get([w.actor.shutdown.remote() for w in self.workers], timeout=5)
            except Exception:  # a dead or hung worker must not block the cleanup
                pass
        for w in self.workers:
            _kill(w.actor)
        if self.owned and self.placement_group is not None:
            remove_placement_group_quietly(self.placement_group)
        self.workers = []


def await_listening(host: str, port: int, *, timeout_s: float,
                    failed: Callable[[], bool]) -> bool:
    """Wait until a rendezvous store accepts connections on ``host:port`` (the driver, for
    rank 0's store, on rank 0's node).

    Args:
        host, port: rank 0's store.
        timeout_s: the longest to wait; the other ranks connect anyway after it (they retry).
        failed: asked between probes (it may block briefly); True ends the wait (rank 0's
            ``setup`` returned before its store listened: it failed).

    Returns:
        True once the store listens; False on ``failed`` or the timeout.

    The probe connects and closes at once: the store counts its workers by a key they add,
    not by connections, so a probe never takes a rank's place.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.1):
                return True
        except OSError:  # refused: not listening yet
            pass
        if failed():
            return False
    return False


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass
