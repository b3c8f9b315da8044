"""Ranks from placement: which actor is which DDP rank (pure, no Ray).

Ray decides where each actor lands; ranks are derived afterwards so that world ranks are
contiguous per node (rank 0 on the driver's node when a worker is there, which keeps rank 0's
checkpoint writes and logs local to the user) and local ranks count ``0..k-1`` on each node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ray_lit.errors import MisconfigurationException

__all__ = ["WorkerRanks", "assign_ranks"]


@dataclass(frozen=True)
class WorkerRanks:
    """Where one worker sits in its worker group.

    Attributes:
        world_rank: rank in the whole group, ``0..world_size-1`` (Lightning's ``global_rank``).
        local_rank: rank among the workers on the same node, ``0..local_world_size-1``.
        node_rank: index of the node, ``0..num_nodes-1`` (the driver's node is 0 when used).
        world_size: number of workers in the group.
        local_world_size: number of workers on this worker's node.
    """

    world_rank: int
    local_rank: int
    node_rank: int
    world_size: int
    local_world_size: int


def assign_ranks(node_ids: Sequence[str], driver_node_id: str | None = None) -> list[WorkerRanks]:
    """Ranks for actors placed on ``node_ids`` (``node_ids[i]`` is where actor ``i`` landed).

    Nodes are ordered by first appearance, with ``driver_node_id`` first when an actor is on
    it; world ranks are contiguous per node. Called once per worker group on the driver.

    Args:
        node_ids: the node id of every actor, in actor order.
        driver_node_id: the driver's node id, or None.

    Returns:
        ``result[i]`` is actor ``i``'s ranks (actor order, not rank order).

    Raises:
        MisconfigurationException: no actors.
    """
    if not node_ids:
        raise MisconfigurationException(
            "assign_ranks got no actors; a worker group needs num_workers >= 1.")
    nodes = list(dict.fromkeys(node_ids))
    if driver_node_id in nodes:
        nodes.remove(driver_node_id)
        nodes.insert(0, driver_node_id)
    members: dict[str, list[int]] = {node: [] for node in nodes}
    for actor, node in enumerate(node_ids):
        members[node].append(actor)
    result: list[WorkerRanks | None] = [None] * len(node_ids)
    world_rank = 0
    for node_rank, node in enumerate(nodes):
        for local_rank, actor in enumerate(members[node]):
            result[actor] = WorkerRanks(world_rank=world_rank, local_rank=local_rank,
                                        node_rank=node_rank, world_size=len(node_ids),
                                        local_world_size=len(members[node]))
            world_rank += 1
    return [r for r in result if r is not None]
