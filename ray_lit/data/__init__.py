"""Ray Data as a training source: ``RayDataLoader`` (see ``ray_lit.data.loader``)."""

from ray_lit.data.loader import RayDataLoader, RayDataShard, default_collate

__all__ = ["RayDataLoader", "RayDataShard", "default_collate"]
