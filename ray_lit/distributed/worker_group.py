"""``WorkerGroup``: the N actors of one attempt, placed together and joined in a process group.

``create`` reserves a placement group, starts one actor per bundle, derives ranks from where
the actors landed, and forms the torch.distributed group on rank 0's node. ``shutdown`` releases
actors and the placement group; it is safe to call on a half-built group and more than once.
After a failure ``salvage`` keeps the live actors and the placement group (``Survivors``), and
the next ``create`` refills only the dead workers' bundles: no new processes, imports or CUDA
contexts for the workers that survived.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_lit.distributed.placement import create_placement_group, remove_placement_group_quietly
from ray_lit.distributed.process_group import choose_backend
from ray_lit.distributed.ranks import WorkerRanks, assign_ranks
from ray_lit.distributed.worker import Worker

log = logging.getLogger("ray_lit")

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
class WorkerGone:
    """A worker that did not answer a poll: ``actor_died`` (Ray reported its death) or
    ``hang`` (no answer in time)."""

    kind: str
    text: str


@dataclass
class Survivors:
    """What a failed attempt leaves for the next one: its placement group and the actors that
    are still alive and idle, by bundle index (the dead ones' bundles are refilled)."""

    placement_group: Any
    owned: bool
    offset: int
    num_workers: int
    actors: dict[int, Any]
    dead_nodes: list[str] = field(default_factory=list)  # where the lost workers ran
    # checkpoint parts the survivors finished writing while leaving (the driver confirms them)
    confirmations: list[tuple] = field(default_factory=list)

    def release(self) -> None:
        for actor in self.actors.values():
            _kill(actor)
        if self.owned:
            remove_placement_group_quietly(self.placement_group)
        self.actors = {}


class WorkerGroup:
    """The actors of one attempt, in world-rank order."""

    def __init__(self, workers: list[WorkerInfo], placement_group: Any, owned: bool = True,
                 offset: int = 0) -> None:
        self.workers = workers
        self.placement_group = placement_group
        self.owned = owned
        self.offset = offset

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
        live actors are kept: only the dead ones' bundles get new actors."""
        if survivors is not None:
            pg, owned, offset = survivors.placement_group, survivors.owned, survivors.offset
            kept = dict(survivors.actors)
            survivors.actors = {}
        else:
            # Inside a Tune trial the trial's own placement group already holds a bundle per
            # worker after the trial driver's bundle 0: use those, never reserve more.
            current = ray.util.get_current_placement_group() if use_current_pg else None
            owned = current is None
            pg = current or create_placement_group(num_workers, per_worker, strategy,
                                                   timeout_s=placement_timeout_s)
            offset = 0 if owned else 1
            kept = {}
        actors: dict[int, Any] = {}
        try:
            custom = {k: v for k, v in per_worker.items() if k not in ("CPU", "GPU")}
            for index in range(num_workers):
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
            group = cls(workers, pg, owned, offset)
            group._join_process_group(device_type, pg_timeout_s, env,
                                      per_worker.get("CPU"))
            return group
        except BaseException:
            for actor in list(actors.values()) + list(kept.values()):
                _kill(actor)
            if owned:
                remove_placement_group_quietly(pg)
            raise

    def salvage(self, abort_timeout_s: float = 10.0) -> Survivors | None:
        """End a failed attempt keeping the live workers: each leaves the process group and
        drops the old run's state; dead or stuck ones are killed. None when nobody survived."""
        pending = {w.bundle_index: (w.actor, w.actor.abort.remote(abort_timeout_s))
                   for w in self.workers}
        alive: dict[int, Any] = {}
        dead_nodes: list[str] = []
        nodes = {w.bundle_index: w.node_id for w in self.workers}
        confirmations: list[tuple] = []
        for index, (actor, ref) in pending.items():
            try:
                left = ray.get(ref, timeout=abort_timeout_s + 5)
            except Exception:  # dead (RayActorError) or not answering
                left = None
            if left is not None:
                alive[index] = actor
                confirmations.extend(left)
                continue
            dead_nodes.append(nodes[index])
            _kill(actor)
        survivors = Survivors(self.placement_group, self.owned, self.offset, self.world_size,
                              alive, dead_nodes, confirmations)
        self.workers = []
        if not alive:
            survivors.release()
            return None
        return survivors

    def _join_process_group(self, device_type: str, timeout_s: float, env: dict[str, str],
                            cpus: float | None) -> None:
        backend = choose_backend(device_type)
        rank0 = self.workers[0]
        port = ray.get(rank0.actor.free_port.remote())
        ray.get([w.actor.setup.remote(ranks=w.ranks, master_addr=rank0.node_ip,
                                      master_port=port, backend=backend, timeout_s=timeout_s,
                                      env=env, num_threads=int(cpus) if cpus else None)
                 for w in self.workers])
        log.info("ray_lit: worker group of %d formed (%s, rank 0 at %s:%d)", self.world_size,
                 backend, rank0.node_ip, port)

    def run(self, payload_ref: Any, job: dict[str, Any]) -> None:
        ray.get([w.actor.run.remote(payload_ref, job) for w in self.workers])

    def poll(self) -> list[Any]:
        """One poll per worker (ObjectRefs; a dead actor's ref raises on get)."""
        return [w.actor.poll.remote() for w in self.workers]

    def statuses(self, timeout_s: float = 30.0) -> list[dict[str, Any] | WorkerGone]:
        """Every worker's status dict (see ``Worker.poll``), or ``WorkerGone`` for one that
        is dead or did not answer within ``timeout_s``."""
        out: list[dict[str, Any] | WorkerGone] = []
        for ref in self.poll():
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except RayActorError as err:
                out.append(WorkerGone("actor_died", str(err)))
            except GetTimeoutError:
                out.append(WorkerGone("hang", f"the worker did not answer a poll within "
                                              f"{timeout_s:.0f} s"))
        return out

    def request_stop_at(self, step: int) -> None:
        """Every rank checkpoints at optimizer step ``step``, then leaves its loop."""
        ray.get([w.actor.request_stop_at.remote(step) for w in self.workers], timeout=30)

    def shutdown(self, graceful: bool = True) -> None:
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


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass
