"""Strategies: how the ranks of a run train one model together (see ``base.Strategy``).

``Trainer(strategy=...)`` takes a name or a ``Strategy`` object; ``resolve_strategy`` turns
it into the object a rank runs, and ``check_strategy`` refuses an unknown one before any
worker starts.
"""

from __future__ import annotations

from typing import Any

from ray_lit.errors import MisconfigurationException
from ray_lit.strategies.base import Strategy
from ray_lit.strategies.ddp import DDPStrategy
from ray_lit.strategies.fsdp import FSDPStrategy
from ray_lit.strategies.parallel import ParallelStrategy
from ray_lit.strategies.single_device import SingleDeviceStrategy

__all__ = ["DDPStrategy", "FSDPStrategy", "ParallelStrategy", "SingleDeviceStrategy",
           "Strategy", "check_strategy", "resolve_strategy", "shards_state"]

# the names a Trainer accepts; "auto" and None pick by the run (DDP on workers, one device in
# process)
STRATEGY_NAMES = ("auto", "ddp", "fsdp", "single_device")


def check_strategy(value: Any) -> None:
    """Refuse a strategy ray_lit does not know, naming the ones it does (driver, once)."""
    if value is None or isinstance(value, Strategy):
        return
    if isinstance(value, str) and value in STRATEGY_NAMES:
        return
    known = ", ".join(repr(n) for n in STRATEGY_NAMES)
    raise MisconfigurationException(
        f"Trainer(strategy={value!r}) is not a strategy ray_lit has: use one of {known}, or a "
        "ray_lit.strategies.Strategy object (e.g. DDPStrategy(find_unused_parameters=True)).")


def resolve_strategy(value: Any, distributed: bool) -> Strategy:
    """The strategy object a rank runs: ``value`` itself when it is one (a copy per process
    arrives with the pickled Trainer), else by name; "auto" is DDP on Ray workers and one
    device in process."""
    check_strategy(value)
    if isinstance(value, Strategy):
        return value
    if value in (None, "auto"):
        return DDPStrategy() if distributed else SingleDeviceStrategy()
    if value == "fsdp":
        return FSDPStrategy()
    return DDPStrategy() if value == "ddp" else SingleDeviceStrategy()


def shards_state(value: Any) -> bool:
    """Whether the strategy ``value`` (a name or an object) shards the module's state over the
    ranks (``Strategy.shards_state``): its checkpoints and peer snapshots are per-rank shards
    (``checkpoint.shard_ring``)."""
    if isinstance(value, Strategy):
        return bool(value.shards_state)
    return value == "fsdp"
