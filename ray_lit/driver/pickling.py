"""Shipping user objects to the workers, and naming the attribute that cannot travel.

The driver pickles the module and the dataloaders once (cloudpickle) and puts them in the
object store. When that fails, pickle's own message ("cannot pickle '_thread.lock' object")
does not say *where* the lock is; ``find_unpicklable`` walks the object graph to the deepest
attribute that fails, so the error names ``module.helper.lock``.
"""

from __future__ import annotations

from typing import Any

import cloudpickle
import torch

from ray_lit.errors import MisconfigurationException

__all__ = ["describe", "ensure_picklable", "find_unpicklable"]


def _fails(obj: Any) -> bool:
    try:
        cloudpickle.dumps(obj)
    except Exception:
        return True
    return False


def describe(obj: Any) -> str:
    """``"a _thread.lock"``: the object's type as pickle would name it."""
    cls = type(obj)
    module = cls.__module__
    qualified = cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
    return f"a {qualified}"


def _children(obj: Any, name: str) -> list[tuple[str, Any]]:
    """The (path, value) pairs pickling ``obj`` would recurse into, in a readable order."""
    if isinstance(obj, torch.Tensor):
        return []  # tensors pickle; walking their internals only costs time
    if isinstance(obj, dict):
        return [(f"{name}[{key!r}]", value) for key, value in obj.items()]
    if isinstance(obj, list | tuple | set | frozenset):
        return [(f"{name}[{i}]", value) for i, value in enumerate(obj)]
    children: list[tuple[str, Any]] = []
    if isinstance(obj, torch.nn.Module):
        # submodules, parameters and buffers read as plain attributes: module.encoder.weight
        for store in ("_modules", "_parameters", "_buffers"):
            children += [(f"{name}.{key}", value)
                         for key, value in (getattr(obj, store, None) or {}).items()]
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        children += [(f"{name}.{key}", value) for key, value in state.items()
                     if not (isinstance(obj, torch.nn.Module)
                             and key in ("_modules", "_parameters", "_buffers"))]
    for slot in getattr(type(obj), "__slots__", ()) or ():
        if isinstance(slot, str) and hasattr(obj, slot):
            children.append((f"{name}.{slot}", getattr(obj, slot)))
    closure = getattr(obj, "__closure__", None)
    code = getattr(obj, "__code__", None)
    if closure and code is not None:
        for var, cell in zip(code.co_freevars, closure):
            try:
                children.append((f"{name}.<closure {var}>", cell.cell_contents))
            except ValueError:  # an empty cell
                continue
    return children


def find_unpicklable(obj: Any, name: str = "module", max_depth: int = 6) -> str | None:
    """The deepest attribute path of ``obj`` that cloudpickle cannot serialise, or None.

    Runs on the driver, only after pickling the whole object failed (it pickles each child it
    visits, so it is slower than one ``dumps``).

    Args:
        obj: the object to ship.
        name: how the path starts, e.g. ``"module"`` or ``"train_dataloader"``.
        max_depth: how many attribute levels to descend at most.

    Returns:
        ``"module.helper.lock (a _thread.lock)"``, or None when ``obj`` pickles.
    """
    if not _fails(obj):
        return None
    seen: set[int] = set()
    path, culprit = name, obj
    for _ in range(max_depth):
        seen.add(id(culprit))
        for child_path, child in _children(culprit, path):
            if id(child) not in seen and _fails(child):
                path, culprit = child_path, child
                break
        else:
            break  # no child fails on its own: this object is the culprit
    return f"{path} ({describe(culprit)})"


def ensure_picklable(obj: Any, name: str = "module") -> bytes:
    """``cloudpickle.dumps(obj)``, or an error naming the attribute that cannot be pickled.

    Runs on the driver before any worker starts.

    Raises:
        MisconfigurationException: ``obj`` (somewhere inside) cannot be pickled.
    """
    try:
        return cloudpickle.dumps(obj)
    except Exception as err:
        culprit = find_unpicklable(obj, name) or f"{name} ({describe(obj)})"
        raise MisconfigurationException(
            f"Cannot ship {name} to the Ray workers: {culprit} cannot be pickled ({err}). "
            "Create it in setup() or the *_dataloader() hooks instead of __init__, or keep it "
            "out of the object (e.g. a module-level global, or __getstate__ that drops it).",
        ) from err
