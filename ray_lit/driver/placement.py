"""Resources per worker, the feasibility check, and the placement group (driver side).

Three steps, all on the driver before any worker starts: ``resolve_worker_resources`` turns the
Trainer options into one Ray bundle, ``check_feasible`` compares ``num_workers`` such bundles
with the nodes that exist (so an impossible request fails in seconds instead of pending
forever), and ``create_placement_group`` reserves them as a gang with a timeout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from ray_lit.errors import MisconfigurationException

__all__ = [
    "STRATEGIES",
    "check_feasible",
    "create_placement_group",
    "remove_placement_group_quietly",
    "resolve_worker_resources",
]

log = logging.getLogger("ray_lit")

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "tpu")
_EPS = 1e-9  # Ray stores fractional resources in 1e-4 units; compare with a little slack


def resolve_worker_resources(*, use_gpu: bool, accelerator: str,
                             resources_per_worker: Mapping[str, float] | None = None,
                             gpus: int | None = None) -> dict[str, float]:
    """The Ray resources one worker reserves.

    Defaults: ``{"CPU": 1}``; ``use_gpu=True``, ``accelerator="gpu"`` or 0.9's ``gpus=N``
    add ``{"GPU": 1}``; ``accelerator="tpu"`` adds ``{"TPU": 1}``. Keys of
    ``resources_per_worker`` replace the defaults and may name custom resources.

    Raises:
        MisconfigurationException: an unknown accelerator, ``tpu`` together with GPUs, a
            negative amount, or a worker that reserves nothing.
    """
    accel = (accelerator or "auto").lower()
    if accel not in _ACCELERATORS:
        raise MisconfigurationException(
            f"accelerator={accelerator!r} is not a known accelerator; use 'cpu', 'gpu', 'tpu' "
            "or 'auto'.")
    wants_gpu = use_gpu or accel in ("gpu", "cuda") or bool(gpus)
    if accel == "tpu" and wants_gpu:
        raise MisconfigurationException(
            f"accelerator='tpu' cannot be combined with use_gpu=True or gpus={gpus}; "
            "drop use_gpu/gpus for TPU workers, or use accelerator='gpu'.")
    if accel == "cpu" and (use_gpu or gpus):
        raise MisconfigurationException(
            f"accelerator='cpu' contradicts use_gpu={use_gpu}, gpus={gpus}; set "
            "accelerator='gpu' (or 'auto') to train on GPUs, or drop use_gpu/gpus.")
    resources: dict[str, float] = {"CPU": 1.0}
    if wants_gpu:
        resources["GPU"] = 1.0
    if accel == "tpu":
        resources["TPU"] = 1.0
    for key, amount in (resources_per_worker or {}).items():
        if not isinstance(amount, int | float) or amount < 0 or math.isnan(amount):
            raise MisconfigurationException(
                f"resources_per_worker[{key!r}]={amount!r} is not a non-negative number; "
                "give amounts like {'CPU': 2, 'GPU': 1}.")
        resources[key] = float(amount)
    if wants_gpu and resources.get("GPU", 0) <= 0:
        raise MisconfigurationException(
            f"use_gpu={use_gpu}, accelerator={accelerator!r}, gpus={gpus} ask for GPUs but "
            "resources_per_worker gives GPU=0; set GPU >= 1 (or a fraction "
            "to share a GPU) or drop use_gpu.")
    resources = {k: v for k, v in resources.items() if v > 0}
    if not resources:
        raise MisconfigurationException(
            f"resources_per_worker={dict(resources_per_worker or {})} reserves nothing; a Ray "
            "placement group bundle needs at least one positive amount, e.g. {'CPU': 1}.")
    return resources


def _fits_on(node: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    """How many bundles ``per_worker`` fit in ``node``'s total resources."""
    counts = [math.floor(node.get(key, 0.0) / amount + _EPS)
              for key, amount in per_worker.items() if amount > 0]
    return max(0, min(counts)) if counts else 0


def _capacity(fits: list[int], strategy: str) -> int:
    """Most workers of one bundle each that ``strategy`` can place on nodes fitting ``fits``."""
    if strategy == "STRICT_PACK":
        return max(fits, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for f in fits if f >= 1)
    return sum(fits)  # PACK / SPREAD are best effort: any node may take several bundles


def _alive_node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def _public(resources: Mapping[str, float]) -> dict[str, float]:
    """Drop Ray's bookkeeping keys (memory, node:<ip>, ...) from what users are shown."""
    hidden = ("memory", "object_store_memory")
    return {k: (int(v) if float(v).is_integer() else v) for k, v in resources.items()
            if k not in hidden and not k.startswith("node:") and not k.startswith("accelerator_")}


def check_feasible(num_workers: int, per_worker: Mapping[str, float], strategy: str = "PACK",
                   *, nodes: list[dict[str, float]] | None = None) -> None:
    """Fail now if ``num_workers`` bundles of ``per_worker`` can never be placed.

    Runs on the driver (Ray initialised) before the placement group is requested. It compares
    with the total resources of the nodes alive now: an autoscaling cluster that would add nodes
    on demand is judged by the nodes it has. Resources busy with other jobs count as existing
    (``create_placement_group``'s timeout covers those).

    Args:
        num_workers: bundles wanted.
        per_worker: one bundle, from ``resolve_worker_resources``.
        strategy: the placement strategy; STRICT_PACK needs one node to hold every bundle,
            STRICT_SPREAD needs ``num_workers`` nodes that each hold one.
        nodes: the nodes' total resources (default: ``ray.nodes()``, alive ones).

    Raises:
        MisconfigurationException: what was asked, what exists, and the fix.
    """
    strategy = _check_strategy(strategy)
    nodes = _alive_node_resources() if nodes is None else nodes
    fits = [_fits_on(node, per_worker) for node in nodes]
    capacity = _capacity(fits, strategy)
    if capacity >= num_workers:
        return
    totals: dict[str, float] = {}
    for node in nodes:
        for key, amount in node.items():
            totals[key] = totals.get(key, 0.0) + amount
    asked = f"{num_workers} workers x {_public(per_worker)} (placement_strategy={strategy!r})"
    has = f"the cluster has {_public(totals)} on {len(nodes)} node(s)"
    missing = [k for k, v in per_worker.items() if v > 0 and totals.get(k, 0.0) <= 0]
    if "GPU" in missing:
        fix = ("start Ray on GPU nodes, or set use_gpu=False / accelerator='cpu' to train on "
               "CPUs")
    elif missing:
        fix = (f"declare {missing} on the nodes (ray start --resources='{{...}}'), or remove "
               "them from resources_per_worker")
    elif max(fits, default=0) == 0:
        fix = "no node is big enough for one worker: lower resources_per_worker"
    elif strategy == "STRICT_SPREAD":
        fix = (f"use num_workers={capacity} (one per node), add nodes, or use "
               "placement_strategy='SPREAD'")
    elif strategy == "STRICT_PACK":
        fix = (f"use num_workers={capacity} (what one node holds), lower "
               "resources_per_worker, or use placement_strategy='PACK'")
    else:
        fix = f"use num_workers={capacity} or fewer, lower resources_per_worker, or add nodes"
    raise MisconfigurationException(
        f"Cannot place {asked}: {has}. Fix: {fix}.")


def _check_strategy(strategy: str) -> str:
    name = str(strategy).upper()
    if name not in STRATEGIES:
        raise MisconfigurationException(
            f"placement_strategy={strategy!r} is not a Ray placement strategy; use one of "
            f"{list(STRATEGIES)}.")
    return name


def create_placement_group(num_workers: int, per_worker: Mapping[str, float],
                           strategy: str = "PACK", timeout_s: float = 60.0,
                           name: str | None = None) -> Any:
    """Reserve ``num_workers`` bundles as one gang and wait until they are ready.

    Called on the driver once per worker group (attempt). Bundle ``i`` hosts actor ``i``.

    Args:
        num_workers: bundles to reserve.
        per_worker: one bundle's resources.
        strategy: ``PACK``, ``SPREAD``, ``STRICT_PACK`` or ``STRICT_SPREAD``.
        timeout_s: how long to wait for the reservation.
        name: an optional placement group name (visible in ``ray status``).

    Returns:
        The ready ``ray.util.placement_group.PlacementGroup``.

    Raises:
        MisconfigurationException: an unknown strategy, or the bundles were not all placed
            within ``timeout_s`` (the placement group is removed first).
    """
    import ray
    from ray.util.placement_group import placement_group

    strategy = _check_strategy(strategy)
    if num_workers < 1:
        raise MisconfigurationException(
            f"num_workers={num_workers}: a placement group needs at least one worker.")
    bundle = {k: float(v) for k, v in per_worker.items() if v > 0}
    pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy=strategy,
                         name=name or "")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if ready:
        return pg
    remove_placement_group_quietly(pg)
    raise MisconfigurationException(
        f"The placement group of {num_workers} x {_public(bundle)} "
        f"(placement_strategy={strategy!r}) was still pending after {timeout_s:g} s; available "
        f"now: {_public(ray.available_resources())}. Other jobs may hold the resources: free "
        "them, use fewer workers, or raise placement_timeout_s.")


def remove_placement_group_quietly(pg: Any) -> None:
    """Remove ``pg`` (driver side, at the end of an attempt); never raises."""
    if pg is None:
        return
    try:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
    except Exception as err:  # teardown must not mask the error that caused it
        log.debug("ray_lit: removing placement group failed: %s", err)
