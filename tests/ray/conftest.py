"""The local Ray cluster the ray tests share: 4 CPUs, no dashboard, one start per module.

A Ray start costs seconds, so each test module connects once (``ray_cluster``). Modules that
need a multi-node ``ray.cluster_utils.Cluster`` build their own instead: a process can be
connected to one Ray cluster at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    if ray.is_initialized():  # a multi-node module left one behind: start clean
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
