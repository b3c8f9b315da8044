"""The import hook: ``pytorch_lightning`` / ``lightning`` names resolve to ray_lit.

A ``sys.meta_path`` finder placed first answers every module under the aliased roots with a
fresh module built from ``ray_lit.compat.surface.TREE`` (the classes and functions are ray_lit's
own objects, so ``isinstance`` and identity hold across both names). A name under an aliased
root that ray_lit does not provide raises ``ModuleNotFoundError`` saying so, rather than falling
through to an installed Lightning and mixing the two.

Installing the finder evicts already-imported real Lightning modules from ``sys.modules`` (they
are restored on uninstall), so a notebook that imported Lightning before still gets ray_lit.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

from ray_lit.compat import surface

# the import roots that resolve to ray_lit while the hook is installed
ROOTS = ("pytorch_lightning", "lightning")


def _split(fullname: str) -> tuple[str, str] | None:
    """``("pytorch_lightning", "core.lightning")`` for an aliased name, else None."""
    for root in ROOTS:
        if fullname == root:
            return root, ""
        if fullname.startswith(root + "."):
            return root, fullname[len(root) + 1:]
    return None


def _tree_key(root: str, rest: str) -> str | None:
    """The ``surface.TREE`` key serving ``root.rest`` (None: not provided)."""
    if root == "lightning":
        if rest == "":
            return "lightning"
        if rest == "pytorch":
            return ""
        if rest.startswith("pytorch."):
            rest = rest[len("pytorch."):]
        else:
            return None  # lightning.fabric, lightning.app, ...: not ray_lit's business
    return rest if rest in surface.TREE else None


class _AliasLoader(importlib.abc.Loader):
    """Creates the alias module and fills it from its ``surface.TREE`` entry."""

    def __init__(self, key: str) -> None:
        self.key = key

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return types.ModuleType(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        namespace = surface.build(self.key, module.__name__)
        module.__dict__.update(namespace)
        module.__dict__["__ray_lit_alias__"] = True


class LightningAliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ``pytorch_lightning[.x]``, ``lightning[.pytorch[.x]]`` to ray_lit's surface."""

    def find_spec(self, fullname: str, path: Any = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        split = _split(fullname)
        if split is None:
            return None
        key = _tree_key(*split)
        if key is None:
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: this run resolves Lightning to ray_lit, which "
                "does not provide that module (see docs/lightning_idioms.md for what it does).",
                name=fullname)
        is_package = surface.is_package(key)
        spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(key),
                                              is_package=is_package)
        if is_package:
            spec.submodule_search_locations = []
        return spec


_FINDER = LightningAliasFinder()
_EVICTED: dict[str, types.ModuleType] = {}


def is_installed() -> bool:
    """Whether the finder is on ``sys.meta_path``."""
    return _FINDER in sys.meta_path


def install_finder() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if is_installed():
        return
    for name in list(sys.modules):
        if _split(name) is not None and not getattr(sys.modules[name], "__ray_lit_alias__",
                                                    False):
            # a real Lightning imported earlier: set it aside so imports see ray_lit
            _EVICTED[name] = sys.modules.pop(name)
    sys.meta_path.insert(0, _FINDER)


def uninstall_finder() -> None:
    """Remove the finder and the alias modules; restore any real Lightning set aside."""
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    for name in list(sys.modules):
        if _split(name) is not None and getattr(sys.modules[name], "__ray_lit_alias__", False):
            del sys.modules[name]
    sys.modules.update(_EVICTED)
    _EVICTED.clear()
