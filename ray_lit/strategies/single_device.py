"""``SingleDeviceStrategy``: one process, one device (``num_workers=0``, the default)."""

from __future__ import annotations

from ray_lit.strategies.base import Strategy


class SingleDeviceStrategy(Strategy):
    """The module on one device, no wrapper, every collective its own input (the base's
    defaults): the in-process host's strategy."""

    strategy_name = "single_device"
