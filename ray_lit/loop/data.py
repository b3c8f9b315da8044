"""Dataloaders for the loop: where they come from, how many batches each stage runs, and how a
batch reaches the module's device."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from ray_lit.core.batch import move_to_device  # noqa: F401  (loop code imports it from here)
from ray_lit.errors import MisconfigurationException


def as_loader_list(loaders: Any) -> list[Any]:
    """None -> [], one loader -> [loader], a list/tuple -> list.

    Raises:
        MisconfigurationException: a bare ``ray.data.Dataset`` among them (it needs the
            ``RayDataLoader`` wrapper: batch size, collate function, shuffle).
    """
    if loaders is None:
        return []
    found = [dl for dl in loaders if dl is not None] if isinstance(loaders, (list, tuple)) \
        else [loaders]
    for loader in found:
        if is_ray_dataset(loader):
            raise MisconfigurationException(
                "Got a ray.data.Dataset where a dataloader goes. Wrap it: "
                "ray_lit.data.RayDataLoader(dataset, batch_size=...), which streams each "
                "worker its own shard.")
    return found


def is_ray_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a ``ray.data.Dataset`` (checked without importing Ray Data)."""
    return any(cls.__module__.startswith("ray.data") and cls.__name__ == "Dataset"
               for cls in type(obj).__mro__)


def loader_length(loader: Any) -> float:
    """Batches in ``loader``; ``inf`` for an IterableDataset or an unsized loader.

    A loader whose ``__len__`` raises ``NotImplementedError`` has no length either (0.9).
    """
    try:
        return len(loader)
    except (TypeError, NotImplementedError):
        return math.inf


def limit_batches(length: float, limit: int | float, option: str) -> float:
    """Apply a ``limit_*_batches`` option: an int is a count, a float in [0, 1] a fraction."""
    if isinstance(limit, bool):
        raise MisconfigurationException(f"{option}={limit!r} must be an int or a float.")
    if isinstance(limit, int):
        return min(length, limit)
    if length == math.inf:
        if limit in (0.0, 1.0):
            return length if limit == 1.0 else 0
        raise MisconfigurationException(
            f"{option}={limit} is a fraction, but the dataloader has no length (an "
            "IterableDataset). Use an int number of batches, or 0.0 / 1.0."
        )
    count = int(length * limit)
    if limit > 0 and count == 0 and length > 0:
        raise MisconfigurationException(
            f"{option}={limit} leaves 0 of {int(length)} batches. Raise it, or set it to 0 to "
            "turn the loop off."
        )
    return count


def sequential_copy(loader: DataLoader) -> DataLoader:
    """The same loader without shuffling (``overfit_batches`` evaluates on the train data)."""
    if isinstance(loader.dataset, IterableDataset):
        return loader
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=SequentialSampler(loader.dataset),
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
    )


def resolve_loaders(explicit: Any, datamodule: Any, module: Any, hook: str) -> list[Any]:
    """Loaders passed to fit/validate/test win, then the datamodule's, then the module's."""
    if explicit is not None:
        return as_loader_list(explicit)
    if datamodule is not None and _overrides(datamodule, hook):
        return as_loader_list(getattr(datamodule, hook)())
    fn = getattr(module, hook, None)
    return as_loader_list(fn()) if fn is not None else []


def _overrides(obj: Any, hook: str) -> bool:
    from ray_lit.core.datamodule import LightningDataModule

    own = getattr(obj, "__dict__", {})
    if hook in own:
        return own[hook] is not None  # ``dm.val_dataloader = None`` turns the loader off
    impl = getattr(type(obj), hook, None)
    return impl is not None and impl is not getattr(LightningDataModule, hook, None)


def first_batch_size(batch: Any) -> int:
    from ray_lit.core.metric_store import infer_batch_size

    return infer_batch_size(batch)


def check_nonempty(loaders: Sequence[Any], stage: str) -> None:
    for i, loader in enumerate(loaders):
        if loader_length(loader) == 0:
            raise MisconfigurationException(
                f"The {stage} dataloader #{i} has no batches (is its dataset empty, or "
                "drop_last=True with fewer samples than batch_size?)."
            )
