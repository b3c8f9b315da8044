"""``ShardPlanner`` on 2 gloo ranks: the plan is settled in a background thread through the
process group's store, so ``plan`` returns at the step boundary without waiting for a slower
rank; the settled plan is the one ``plan_shards`` makes on the process group, it is kept while
the layout stays, and a changed layout is planned again."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_lit.storage.dcp_plan import DeferredShardPlan, ShardPlanner, plan_shards


def _tensors(mesh, rank: int, extra: bool = False) -> dict:
    """This rank's state, its DTensors built from local shards (no communication)."""
    from torch.distributed.tensor import DTensor, Shard

    def sharded(full: torch.Tensor):
        return DTensor.from_local(full.chunk(2)[rank], mesh, [Shard(0)], run_check=False)

    state = {"w": sharded(torch.arange(24, dtype=torch.float32).reshape(6, 4)),
             "b": torch.ones(3)}
    if extra:
        state["extra"] = sharded(torch.zeros(4, 2))
    return {"state_dict": state}


def _items(plan) -> list[tuple]:
    return sorted((item.index.fqn, tuple(item.index.offset or ())) for item in plan.items)


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2,))
        planner = ShardPlanner()
        reference = plan_shards(_tensors(mesh, rank), rank, 2)  # on the process group
        timings: list[float] = []
        plans: list = []
        for _ in range(2):  # the first plan and a kept one
            if rank == 1:
                time.sleep(2.0)  # the slow rank reaches the boundary late
            start = time.perf_counter()
            deferred = planner.plan(_tensors(mesh, rank), rank, 2)
            timings.append(time.perf_counter() - start)
            assert isinstance(deferred, DeferredShardPlan)
            assert deferred.tensors.keys() == reference.tensors.keys()
            assert _items(deferred.plan) == _items(reference.plan)  # waits for the thread
            assert deferred.metadata.state_dict_metadata.keys() == \
                reference.metadata.state_dict_metadata.keys()
            plans.append(deferred.plan)
        assert plans[1] is plans[0]  # kept: nothing planned again
        changed = planner.plan(_tensors(mesh, rank, extra=True), rank, 2)
        assert "state_dict.extra" in {item.index.fqn for item in changed.plan.items}
        fresh = plan_shards(_tensors(mesh, rank, extra=True), rank, 2)
        assert _items(changed.plan) == _items(fresh.plan)
        returned_s = max(timings)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{returned_s}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_the_boundary_does_not_wait_for_a_slower_rank(tmp_path) -> None:
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    # rank 0 arrived 2 s before rank 1 both times: its plans returned at once
    assert float((tmp_path / "rank0.txt").read_text()) < 1.0
