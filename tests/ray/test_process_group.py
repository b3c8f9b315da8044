"""Process groups between Ray actors: gloo on 127.0.0.1, and a missing peer is an error."""

from __future__ import annotations

import sys
import time

import pytest
from ray import cloudpickle  # Ray's own copy: the one that pickles remote classes

from ray_lit.errors import MisconfigurationException
from ray_lit.worker.process_group import choose_backend, find_free_port

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Member:
    """One rank: joins the group, all-reduces, reports what it saw."""

    def port(self) -> int:
        import torch.distributed  # noqa: F401  warm: importing torch takes seconds here

        return find_free_port()

    def join_and_reduce(self, rank: int, world_size: int, port: int, timeout_s: float):
        import os

        import torch
        import torch.distributed as dist

        from ray_lit.worker.process_group import destroy_process_group, init_process_group

        init_process_group(backend="gloo", master_addr="127.0.0.1", master_port=port,
                           world_rank=rank, world_size=world_size, timeout_s=timeout_s,
                           local_rank=rank)
        tensor = torch.ones(1)
        dist.all_reduce(tensor)
        env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        destroy_process_group()
        destroy_process_group()  # a second teardown is a no-op
        return tensor.item(), env, dist.is_initialized()


def test_choose_backend():
    assert choose_backend("cpu") == "gloo"
    assert choose_backend("cuda") == "nccl"
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        with pytest.raises(MisconfigurationException, match="needs torch_xla installed"):
            choose_backend("tpu")
    with pytest.raises(MisconfigurationException, match="'mps'"):
        choose_backend("mps")


def test_helpers_outside_ray():
    assert 0 < find_free_port() < 65536


@pytest.mark.ray
def test_two_actors_all_reduce_over_gloo(ray_cluster):
    import ray

    actors = [ray.remote(num_cpus=1)(Member).remote() for _ in range(2)]
    try:
        port = ray.get(actors[0].port.remote())
        results = ray.get([a.join_and_reduce.remote(r, 2, port, 30) for r, a in enumerate(actors)],
                          timeout=60)
        assert [value for value, _, _ in results] == [2.0, 2.0]
        assert results[1][1] == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                 "MASTER_PORT": str(port)}
        assert not any(initialised for _, _, initialised in results)
    finally:
        for actor in actors:
            ray.kill(actor)


@pytest.mark.ray
def test_a_missing_peer_is_an_error_not_a_hang(ray_cluster):
    import ray

    actor = ray.remote(num_cpus=1)(Member).remote()
    try:
        port = ray.get(actor.port.remote())
        start = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(actor.join_and_reduce.remote(0, 2, port, 3), timeout=60)
        assert time.monotonic() - start < 15  # 3 s timeout + store wait; slack for a loaded box
        assert "1/2 clients joined" in str(info.value) or "timed out" in str(info.value).lower()
    finally:
        ray.kill(actor)
