"""``ClusterView``: what the controller asks Ray about the cluster (driver side).

The controller's decisions need a few facts about the cluster: the driver's node, the nodes
being drained, the free resources of each node that can take workers, and whether a placement
group's bundles sit on live nodes. They are read here, behind one small interface, so the
controller runs against ``ray_lit.testing.FakeCluster`` in unit tests.
"""

from __future__ import annotations

from typing import Any

import ray


class ClusterView:
    """Reads the live Ray cluster (the driver must be connected)."""

    def driver_node(self) -> str | None:
        try:
            return ray.get_runtime_context().get_node_id()
        except Exception:
            return None

    def draining_nodes(self) -> dict[str, int]:
        """Ray's nodes being drained (autoscaler scale-down, spot preemption notices):
        ``{node_id: deadline_ms}`` (0: no deadline); empty where this Ray cannot tell."""
        try:
            import ray._private.state as state

            return dict(state.state.get_draining_nodes())
        except Exception:
            return {}

    def free_per_node(self) -> list[dict[str, float]]:
        """Free resources of each live node that can take new workers (not one draining)."""
        import ray._private.state as state

        draining = self.draining_nodes()
        return [free for node, free in state.available_resources_per_node().items()
                if node not in draining]

    def bundle_nodes(self, placement_group: Any) -> dict[int, str]:
        """``{bundle index: node id}`` for the bundles of ``placement_group`` that sit on a
        live node that is not draining (after a lost node Ray re-places its bundles when it
        can; until then they are missing here)."""
        try:
            table = ray.util.placement_group_table(placement_group)
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        except Exception:
            return {}
        if table.get("state") not in ("CREATED", "RESCHEDULING"):
            return {}
        draining = self.draining_nodes()
        return {int(i): node for i, node in table.get("bundles_to_node_id", {}).items()
                if node in alive and node not in draining}

    def unreachable(self, node_ids: list[str], timeout_s: float = 2.0) -> set[str]:
        """The nodes of ``node_ids`` on which a tiny task did not run within ``timeout_s``
        (probed together): after a worker died, tells a live node (the process died) from a
        lost one, which Ray's node table still lists as alive until it has missed enough
        heartbeats."""
        nodes = sorted(set(node_ids))
        if not nodes:
            return set()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from ray_lit.driver.node_probe import node_id as _node_id

        refs = {_node_id.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(): node for node in nodes}
        # a probe left pending on a lost node fails by itself (no retries); it is never
        # cancelled: cancelling a task whose reply is in flight crashes Ray 2.60's driver
        # ("Tried to complete task that was not pending")
        answered: set[str] = set()
        try:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        except Exception:
            return set(nodes)
        for ref in ready:
            try:
                if isinstance(ray.get(ref), str):
                    answered.add(refs[ref])
            except Exception:  # the probe failed there: the node is gone
                pass
        return set(nodes) - answered

    def reachable(self, node_ids: list[str], timeout_s: float = 2.0) -> bool:
        """Whether every node of ``node_ids`` answers a probe (``unreachable`` is empty)."""
        return not self.unreachable(node_ids, timeout_s)
