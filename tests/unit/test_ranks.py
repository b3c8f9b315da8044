"""assign_ranks: contiguous world ranks per node, local ranks 0..k-1, actor order kept."""

from __future__ import annotations

import random

import pytest

from ray_lit.errors import MisconfigurationException
from ray_lit.worker.ranks import WorkerRanks, assign_ranks


def test_two_nodes_interleaved_actors():
    ranks = assign_ranks(["b", "a", "b", "a"])
    assert [r.world_rank for r in ranks] == [0, 2, 1, 3]
    assert [r.local_rank for r in ranks] == [0, 0, 1, 1]
    assert [r.node_rank for r in ranks] == [0, 1, 0, 1]
    assert {r.world_size for r in ranks} == {4}
    assert {r.local_world_size for r in ranks} == {2}


def test_driver_node_comes_first_only_when_used():
    ranks = assign_ranks(["x", "drv", "x"], driver_node_id="drv")
    assert ranks[1] == WorkerRanks(world_rank=0, local_rank=0, node_rank=0, world_size=3,
                                   local_world_size=1)
    assert [r.world_rank for r in ranks] == [1, 0, 2]
    unused = assign_ranks(["x", "y"], driver_node_id="drv")
    assert [r.node_rank for r in unused] == [0, 1]


def test_frozen_and_empty_rejected():
    ranks = assign_ranks(["n"])
    with pytest.raises(AttributeError):
        ranks[0].world_rank = 3  # type: ignore[misc]
    with pytest.raises(MisconfigurationException, match="num_workers"):
        assign_ranks([])


def test_properties_over_random_layouts():
    rng = random.Random(0)
    for _ in range(300):
        nodes = [f"n{rng.randrange(5)}" for _ in range(rng.randint(1, 12))]
        driver = rng.choice(nodes + ["elsewhere"])
        ranks = assign_ranks(nodes, driver_node_id=driver)
        n = len(nodes)
        assert sorted(r.world_rank for r in ranks) == list(range(n))
        by_node: dict[str, list[WorkerRanks]] = {}
        for node, r in zip(nodes, ranks):
            by_node.setdefault(node, []).append(r)
        for members in by_node.values():
            worlds = sorted(m.world_rank for m in members)
            assert worlds == list(range(worlds[0], worlds[0] + len(worlds)))  # contiguous
            # local ranks follow actor order on the node
            assert [m.local_rank for m in members] == list(range(len(members)))
            assert {m.local_world_size for m in members} == {len(members)}
            assert len({m.node_rank for m in members}) == 1
        assert sorted({r.node_rank for r in ranks}) == list(range(len(by_node)))
        if driver in by_node:
            assert all(r.node_rank == 0 for r in by_node[driver])
            assert min(r.world_rank for r in by_node[driver]) == 0
