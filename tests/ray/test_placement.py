"""Worker resources, the feasibility check and placement groups on a local Ray cluster."""

from __future__ import annotations

import time

import pytest

from ray_lit.driver.placement import (
    check_feasible,
    create_placement_group,
    remove_placement_group_quietly,
    resolve_worker_resources,
)
from ray_lit.errors import MisconfigurationException


# --- pure: no cluster needed ---------------------------------------------------------------
def test_resolve_defaults_and_overrides():
    assert resolve_worker_resources(use_gpu=False, accelerator="auto") == {"CPU": 1}
    assert resolve_worker_resources(use_gpu=True, accelerator="auto") == {"CPU": 1, "GPU": 1}
    assert resolve_worker_resources(use_gpu=False, accelerator="gpu") == {"CPU": 1, "GPU": 1}
    assert resolve_worker_resources(use_gpu=False, accelerator="auto", gpus=2) == {
        "CPU": 1, "GPU": 1}
    assert resolve_worker_resources(use_gpu=False, accelerator="tpu") == {"CPU": 1, "TPU": 1}
    assert resolve_worker_resources(use_gpu=False, accelerator="tpu",
                                    resources_per_worker={"TPU": 4}) == {"CPU": 1, "TPU": 4}
    assert resolve_worker_resources(use_gpu=True, accelerator="auto", resources_per_worker={
        "CPU": 2, "GPU": 0.5, "fast_disk": 1}) == {"CPU": 2, "GPU": 0.5, "fast_disk": 1}
    assert resolve_worker_resources(use_gpu=False, accelerator="cpu",
                                    resources_per_worker={"CPU": 0, "special": 1}) == {
        "special": 1}


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"use_gpu": True, "accelerator": "tpu"}, "accelerator='tpu'"),
    ({"use_gpu": True, "accelerator": "cpu"}, "accelerator='cpu'"),
    ({"use_gpu": False, "accelerator": "quantum"}, "accelerator='quantum'"),
    ({"use_gpu": False, "accelerator": "auto", "resources_per_worker": {"CPU": -1}},
     r"resources_per_worker\['CPU'\]=-1"),
    ({"use_gpu": True, "accelerator": "auto", "resources_per_worker": {"GPU": 0}}, "GPU=0"),
    ({"use_gpu": False, "accelerator": "auto", "resources_per_worker": {"CPU": 0}},
     "reserves nothing"),
])
def test_resolve_rejects_bad_combinations(kwargs, words):
    with pytest.raises(MisconfigurationException, match=words):
        resolve_worker_resources(**kwargs)


NODES = [{"CPU": 4.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 2.0}, {"CPU": 2.0}]


@pytest.mark.parametrize(("num", "bundle", "strategy", "ok"), [
    (4, {"CPU": 1, "GPU": 1}, "PACK", True),
    (5, {"CPU": 1, "GPU": 1}, "SPREAD", False),
    (2, {"CPU": 1, "GPU": 1}, "STRICT_PACK", True),
    (3, {"CPU": 1, "GPU": 1}, "STRICT_PACK", False),
    (3, {"CPU": 1}, "STRICT_SPREAD", True),
    (4, {"CPU": 1}, "STRICT_SPREAD", False),
    (3, {"CPU": 3}, "PACK", False),  # 9 CPUs in total, but only 2 nodes hold 3 each
])
def test_per_node_fit(num, bundle, strategy, ok):
    if ok:
        check_feasible(num, bundle, strategy, nodes=NODES)
    else:
        with pytest.raises(MisconfigurationException, match=f"Cannot place {num} workers"):
            check_feasible(num, bundle, strategy, nodes=NODES)


def test_strategy_names_are_checked():
    with pytest.raises(MisconfigurationException, match="STRICT_SPREAD"):
        check_feasible(1, {"CPU": 1}, "BALANCED", nodes=NODES)


# --- on the local cluster (4 CPUs) ----------------------------------------------------------
@pytest.mark.ray
def test_feasible_pack_is_created_and_removed(ray_cluster):
    import ray
    from ray.util.placement_group import placement_group_table

    check_feasible(2, {"CPU": 1}, "PACK")
    pg = create_placement_group(2, {"CPU": 1}, "PACK", timeout_s=30, name="ray_lit_test")
    assert placement_group_table(pg)["state"] == "CREATED"
    remove_placement_group_quietly(pg)
    remove_placement_group_quietly(pg)  # twice: still quiet
    remove_placement_group_quietly(None)
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 4


@pytest.mark.ray
@pytest.mark.parametrize(("num", "bundle", "words"), [
    (5, {"CPU": 1}, ["5 workers x {'CPU': 1}", "cluster has {'CPU': 4", "num_workers=4"]),
    (2, {"CPU": 1, "GPU": 1}, ["2 workers x {'CPU': 1, 'GPU': 1}", "GPU nodes", "use_gpu=False"]),
    (1, {"CPU": 1, "TPU_POD": 1}, ["TPU_POD", "resources_per_worker"]),
])
def test_infeasible_fails_fast_with_the_ask_what_exists_and_the_fix(ray_cluster, num, bundle,
                                                                     words):
    start = time.monotonic()
    with pytest.raises(MisconfigurationException) as info:
        check_feasible(num, bundle, "PACK")
    assert time.monotonic() - start < 5
    for word in words:
        assert word in str(info.value)


@pytest.mark.ray
def test_busy_resources_time_out_and_release_the_pending_group(ray_cluster):
    import ray

    holder = create_placement_group(1, {"CPU": 4}, "PACK", timeout_s=30)
    try:
        start = time.monotonic()
        with pytest.raises(MisconfigurationException, match="pending after 1 s"):
            create_placement_group(1, {"CPU": 1}, "PACK", timeout_s=1)
        assert time.monotonic() - start < 5
    finally:
        remove_placement_group_quietly(holder)
    # the timed-out group was removed: nothing waits for the CPUs any more
    pending = [p for p in ray.util.placement_group_table().values() if p["state"] == "PENDING"]
    assert pending == []
