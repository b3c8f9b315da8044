"""``WorkerGroup``: the N actors of one attempt, placed together and joined in a process group.

``create`` reserves a placement group, starts one actor per bundle, derives ranks from where
the actors landed, and forms the torch.distributed group on rank 0's node. ``shutdown`` releases
actors and the placement group; it is safe to call on a half-built group and more than once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
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


class WorkerGroup:
    """The actors of one attempt, in world-rank order."""

    def __init__(self, workers: list[WorkerInfo], placement_group: Any) -> None:
        self.workers = workers
        self.placement_group = placement_group

    @property
    def world_size(self) -> int:
        return len(self.workers)

    @classmethod
    def create(cls, *, num_workers: int, per_worker: dict[str, float], strategy: str,
               device_type: str, placement_timeout_s: float, pg_timeout_s: float,
               env: dict[str, str], use_current_pg: bool = False) -> WorkerGroup:
        # Inside a Tune trial the trial's own placement group already holds a bundle per
        # worker after the trial driver's bundle 0: use those, never reserve more.
        current = ray.util.get_current_placement_group() if use_current_pg else None
        owned = current is None
        pg = current or create_placement_group(num_workers, per_worker, strategy,
                                               timeout_s=placement_timeout_s)
        offset = 0 if owned else 1
        actors: list[Any] = []
        try:
            custom = {k: v for k, v in per_worker.items() if k not in ("CPU", "GPU")}
            for index in range(num_workers):
                actors.append(_RemoteWorker.options(
                    num_cpus=per_worker.get("CPU", 0), num_gpus=per_worker.get("GPU", 0),
                    resources=custom or None, max_concurrency=2,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=index + offset),
                ).remote())
            infos = ray.get([a.node_info.remote() for a in actors], timeout=placement_timeout_s)
            driver_node = ray.get_runtime_context().get_node_id()
            ranks = assign_ranks([i["node_id"] for i in infos], driver_node_id=driver_node)
            workers = sorted(
                (WorkerInfo(a, r, i["node_id"], i["node_ip"], i["gpu_ids"], i["pid"])
                 for a, r, i in zip(actors, ranks, infos)),
                key=lambda w: w.ranks.world_rank)
            group = cls(workers, pg if owned else None)
            group._join_process_group(device_type, pg_timeout_s, env,
                                      per_worker.get("CPU"))
            return group
        except BaseException:
            for actor in actors:
                _kill(actor)
            if owned:
                remove_placement_group_quietly(pg)
            raise

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

    def shutdown(self, graceful: bool = True) -> None:
        if graceful:
            try:
                ray.get([w.actor.shutdown.remote() for w in self.workers], timeout=5)
            except Exception:  # a dead or hung worker must not block the cleanup
                pass
        for w in self.workers:
            _kill(w.actor)
        if self.placement_group is not None:
            remove_placement_group_quietly(self.placement_group)
        self.workers = []


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass
