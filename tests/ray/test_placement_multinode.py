"""Placement on a 2-node ray.cluster_utils.Cluster (its own cluster, not the shared fixture)."""

from __future__ import annotations

import sys

import pytest
from ray import cloudpickle  # Ray's own copy: the one that pickles remote classes

from ray_lit.driver.placement import (
    check_feasible,
    create_placement_group,
    remove_placement_group_quietly,
)
from ray_lit.errors import MisconfigurationException
from ray_lit.worker.ranks import assign_ranks

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    # a fake GPU on the second node: Ray schedules it like a real one
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_strict_spread_puts_one_bundle_per_node_and_ranks_follow(two_nodes):
    import ray
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    check_feasible(2, {"CPU": 1}, "STRICT_SPREAD")
    pg = create_placement_group(2, {"CPU": 1}, "STRICT_SPREAD", timeout_s=30)
    try:
        bundle_nodes = placement_group_table(pg)["bundles_to_node_id"]
        assert len(set(bundle_nodes.values())) == 2

        @ray.remote(num_cpus=1)
        def node_id():
            return ray.get_runtime_context().get_node_id()

        placed = ray.get([node_id.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=i)).remote() for i in range(2)])
        ranks = assign_ranks(placed, driver_node_id=ray.get_runtime_context().get_node_id())
        assert sorted(r.node_rank for r in ranks) == [0, 1]
        assert {r.local_rank for r in ranks} == {0}
        # the head node hosts the driver: its worker is world rank 0
        assert ranks[placed.index(ray.get_runtime_context().get_node_id())].world_rank == 0
    finally:
        remove_placement_group_quietly(pg)


def test_per_node_limits_are_named(two_nodes):
    with pytest.raises(MisconfigurationException, match=r"num_workers=2 \(one per node\)"):
        check_feasible(3, {"CPU": 1}, "STRICT_SPREAD")
    with pytest.raises(MisconfigurationException, match="placement_strategy='PACK'"):
        check_feasible(2, {"CPU": 1}, "STRICT_PACK")
    with pytest.raises(MisconfigurationException, match=r"2 workers x \{'CPU': 1, 'GPU': 1\}"):
        check_feasible(2, {"CPU": 1, "GPU": 1}, "PACK")
    check_feasible(1, {"CPU": 1, "GPU": 1}, "PACK")


def test_the_gpu_bundle_lands_on_the_gpu_node(two_nodes):
    import ray
    from ray.util.placement_group import placement_group_table

    pg = create_placement_group(1, {"CPU": 1, "GPU": 1}, "PACK", timeout_s=30)
    try:
        node = placement_group_table(pg)["bundles_to_node_id"][0]
        gpu_nodes = [n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")]
        assert node in gpu_nodes
    finally:
        remove_placement_group_quietly(pg)
