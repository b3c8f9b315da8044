"""Hyperparameters of a ``LightningModule``: ``save_hyperparameters`` and ``self.hparams = ...``.

What is stored on the module (in ``module.__dict__``, so ``nn.Module.__setattr__`` never sees
it and scripting skips it):

* ``_hparams``: an ``AttributeDict`` (dot and key access) that successive calls update;
* ``_hparams_name``: how the hyperparameters reached ``__init__``: ``"kwargs"`` (one argument
  each), the name of the one init argument that held them all, or None;
* ``_hparams_initial``: a deep copy taken when they were saved (2.x ``hparams_initial``);
* ``_log_hyperparams``: whether loggers receive them at fit start;
* ``_hparams_type``: ``"Namespace"`` / ``"DictConfig"`` when they came as an
  ``argparse.Namespace`` / OmegaConf ``DictConfig``, so ``load_from_checkpoint`` hands the
  constructor the same kind of object again.

``load_from_checkpoint`` (``ray_lit.core.saving``) reads ``hyper_parameters``, ``hparams_name``
and ``hparams_type`` from a checkpoint to call the constructor the same way.
"""

from __future__ import annotations

import copy
import inspect
import types
from argparse import Namespace
from collections.abc import Iterator, Mapping
from typing import Any

from ray_lit.loggers.base import written_for_09

_PRIMITIVES = (bool, int, float, complex, str, bytes, type(None))


class AttributeDict(dict):
    """A ``dict`` whose keys are also attributes: ``hp.lr`` and ``hp["lr"]`` are the same.

    Example:
        >>> hp = AttributeDict(lr=0.1)
        >>> hp.layers = 2
        >>> hp["layers"], hp.lr
        (2, 0.1)
    """

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            # AttributeError (not KeyError) keeps getattr(hp, x, default), copy and pickle working
            raise AttributeError(f"'AttributeDict' has no key {key!r}") from err

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self[key]
        except KeyError as err:
            raise AttributeError(f"'AttributeDict' has no key {key!r}") from err

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        # a call with a plain dict: torch's weights-only unpickler can rebuild that (it cannot
        # fill a dict subclass item by item), and so can pickle, copy and cloudpickle
        return (type(self), (dict(self),))

    def __repr__(self) -> str:
        if not self:
            return "AttributeDict()"
        width = max(len(str(k)) for k in self) + 3
        rows = [f"{f'{str(k)!r}:':<{width}} {v!r}" for k, v in self.items()]
        return "AttributeDict(\n  " + ",\n  ".join(rows) + "\n)"


def save_hyperparameters(module: Any, *args: Any, ignore: list[str] | str | None = None,
                         frame: types.FrameType | None = None, logger: bool = True) -> None:
    """Store constructor arguments of ``module`` as its hyperparameters (spec §4.4).

    Call it from ``__init__`` (the module's own or, via ``super().__init__``, a base class's).
    Values are read from the constructor frames *now*, so an argument reassigned before the
    call is saved with its new value. Called in a base class, it records the subclasses'
    arguments too, except in a file written for 0.9 (one that imports ``pytorch_lightning``),
    where it records the base class's own arguments only, as 0.9 did.

    Args:
        module: the ``LightningModule`` being constructed.
        *args: nothing (every init argument); names of init arguments (only those); or one
            ``dict`` / ``Namespace`` / ``AttributeDict`` that becomes the hyperparameters.
        ignore: init argument name(s) to leave out.
        frame: the frame of the calling ``__init__`` (default: the caller of this function).
        logger: whether loggers receive the hyperparameters at fit start.

    Raises:
        ValueError: a single primitive (int, str, ...) or an unsupported object was passed, or a
            name is not an argument of ``__init__``.
    """
    if len(args) == 1 and not isinstance(args[0], str) and not args[0]:
        return  # an empty container: nothing to save (as in Lightning)
    if frame is None:
        frame = inspect.currentframe().f_back
    init_args = _collect_init_args(module, frame)
    for name in _as_list(ignore):
        init_args.pop(name, None)

    objects = [a for a in args if not isinstance(a, str)]
    if not args:
        hparams: Any = init_args
        # nothing to collect (called outside __init__) keeps how earlier calls saved them
        name = "kwargs" if init_args else module.__dict__.get("_hparams_name")
    elif len(objects) == 1:
        hparams = objects[0]
        candidates = [k for k, v in init_args.items() if v is hparams]
        name = candidates[0] if candidates else None
    else:
        missing = [a for a in args if isinstance(a, str) and a not in init_args]
        if missing:
            raise ValueError(
                f"save_hyperparameters({', '.join(map(repr, missing))}): not an argument of "
                f"{type(module).__name__}.__init__ (its arguments: {sorted(init_args)}). "
                "Pass the names of init arguments, or one dict/Namespace.")
        hparams = {a: init_args[a] for a in args if isinstance(a, str)}
        name = "kwargs"
    _update_hparams(module, hparams)
    module.__dict__["_hparams_name"] = name
    module.__dict__["_log_hyperparams"] = logger
    module.__dict__["_hparams_initial"] = _snapshot(module.__dict__["_hparams"])


def set_hparams(module: Any, value: Any) -> None:
    """``self.hparams = value`` (the 0.9 idiom): ``value`` becomes the hyperparameters.

    ``hparams_name`` is the ``__init__`` argument holding ``value`` (so ``load_from_checkpoint``
    passes the hyperparameters back through it), found in the calling constructor's frame.

    Args:
        module: the ``LightningModule``.
        value: a ``dict``, ``Namespace`` or ``AttributeDict``.

    Raises:
        ValueError: ``value`` is a primitive or another unsupported type.
    """
    name = None
    frame = inspect.currentframe().f_back
    for init_frame in _init_frames(module, frame):
        candidates = [k for k, v in _frame_args(init_frame).items() if v is value]
        if candidates:
            name = candidates[0]
            break
    # replace, not update: assignment means "these are the hyperparameters"
    module.__dict__["_hparams"] = AttributeDict()
    module.__dict__.pop("_hparams_type", None)
    _update_hparams(module, value)
    module.__dict__["_hparams_name"] = name
    module.__dict__["_hparams_initial"] = _snapshot(module.__dict__["_hparams"])


def clean_hparams_for_fit(hparams: Any) -> None:
    """Delete callable values from ``hparams`` in place (0.9 ``fit`` does this; trap 7.18).

    Functions and classes cannot be logged or saved in a weights-only checkpoint, so a
    function-valued hyperparameter vanishes when training starts.
    """
    if isinstance(hparams, Namespace):
        hparams = vars(hparams)
    if not isinstance(hparams, dict):
        return
    for key in [k for k, v in hparams.items() if callable(v)]:
        del hparams[key]


def stash_callables_for_checkpoint(module: Any) -> None:
    """Keep ``module``'s callable hyperparameters aside before ``clean_hparams_for_fit``.

    0.9 deletes them from ``hparams`` at fit (kept, trap 7.18), but a checkpoint without them
    would rebuild the module with the constructor's defaults (``optimizer=Adam`` where ``SGD``
    was passed): ``hparams_for_checkpoint`` saves them by import path instead.
    """
    hparams = module.__dict__.get("_hparams")
    if isinstance(hparams, Namespace):
        hparams = vars(hparams)
    if isinstance(hparams, dict):
        stash = module.__dict__.setdefault("_hparams_callables", {})
        stash.update({k: v for k, v in hparams.items() if callable(v)})


# a class or function hyperparameter in a checkpoint: {"__import__": "torch.optim.sgd.SGD"};
# one with no import path (a lambda, a local function): {"__unsaved__": "<repr>"}
IMPORT_KEY = "__import__"
UNSAVED_KEY = "__unsaved__"


def import_path(obj: Any) -> str | None:
    """``"package.module.Name"`` that imports back to ``obj`` itself, else None."""
    module = getattr(obj, "__module__", None)
    # builtins such as torch.sigmoid have a qualname of their C class; their __name__ imports
    names = [getattr(obj, "__qualname__", None), getattr(obj, "__name__", None)]
    for name in dict.fromkeys(n for n in names if n):
        if not module or "<" in name:
            continue
        path = f"{module}.{name}"
        if module == "__main__":
            return path  # importable where that script runs again
        try:
            if resolve_import_path(path, len(module.split("."))) is obj:
                return path
        except Exception:  # not importable under that name here: try the next, else unsaved
            continue
    return None


def resolve_import_path(path: str, module_parts: int | None = None) -> Any:
    """The class or function named by ``path`` (import of a named attribute, nothing else).

    Raises:
        ImportError: no module/attribute of that name, or it is not a class or function.
    """
    import importlib

    parts = path.split(".")
    candidates = [module_parts] if module_parts else range(len(parts) - 1, 0, -1)
    for split in candidates:
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if isinstance(obj, type) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            return obj
        raise ImportError(f"{path} is a {type(obj).__name__}, not a class or function")
    raise ImportError(f"cannot import {path}")


def is_dict_config(value: Any) -> bool:
    """An OmegaConf ``DictConfig`` (checked by type, so omegaconf is never imported here)."""
    return type(value).__name__ == "DictConfig" and type(value).__module__.startswith(
        "omegaconf")


def _plain_container(value: Any) -> Any:
    """OmegaConf containers as plain dicts/lists (interpolations resolved), else ``value``."""
    if type(value).__module__.startswith("omegaconf") and type(value).__name__ in (
            "DictConfig", "ListConfig"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


# values torch's weights-only unpickler rebuilds without running code (containers are looked into)
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes)


def _weights_only_loadable(value: Any) -> bool:
    """Whether ``value`` can come back from a weights-only load (``CHECKPOINT_ALLOWLIST``
    included): an object instance (a datamodule passed to ``__init__``) cannot."""
    import torch

    from ray_lit.storage.checkpoint_io import CHECKPOINT_ALLOWLIST

    if isinstance(value, Mapping):
        return all(_weights_only_loadable(k) and _weights_only_loadable(v)
                   for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset, Namespace)):
        items = vars(value).values() if isinstance(value, Namespace) else value
        return all(_weights_only_loadable(v) for v in items)
    return (isinstance(value, (*_PLAIN_TYPES, torch.Tensor, torch.dtype, torch.device))
            or type(value) in CHECKPOINT_ALLOWLIST
            or type(value).__module__.split(".")[0] == "numpy")


def hparams_for_checkpoint(module: Any) -> dict[str, Any]:
    """``module``'s hyperparameters as a weights-only-loadable dict.

    Classes and functions (also those ``fit`` removed from ``hparams``) are saved by import
    path; ones without one, and objects a weights-only load cannot rebuild (0.9 modules that
    save the datamodule they were given, as bolts' ``ImageGPT`` does), are marked, so
    ``load_from_checkpoint`` refuses to silently use the constructor's default for them (and
    the checkpoint stays loadable: 0.9 dropped every hyperparameter in that case).
    """
    hparams = _plain_container(module.hparams)
    values = dict(vars(hparams)) if isinstance(hparams, Namespace) else dict(hparams)
    for key, value in module.__dict__.get("_hparams_callables", {}).items():
        values.setdefault(key, value)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if callable(value):
            path = import_path(value)
            out[key] = {IMPORT_KEY: path} if path else {UNSAVED_KEY: repr(value)[:200]}
        else:
            # a DictConfig inside would make the checkpoint refuse weights-only loading
            value = _plain_container(value)
            out[key] = (value if _weights_only_loadable(value)
                        else {UNSAVED_KEY: repr(value)[:200]})
    return out


def restore_callables(hparams: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Turn ``hparams_for_checkpoint``'s import markers back into the objects, in place.

    Raises:
        MisconfigurationException: a hyperparameter could not be saved or imported, and
            ``overrides`` does not supply it (the module would silently get another one).
    """
    from ray_lit.errors import MisconfigurationException

    for key, value in list(hparams.items()):
        if not isinstance(value, dict) or len(value) != 1 or key in overrides:
            continue
        if IMPORT_KEY in value:
            try:
                hparams[key] = resolve_import_path(str(value[IMPORT_KEY]))
            except ImportError as err:
                raise MisconfigurationException(
                    f"Hyperparameter {key!r} was {value[IMPORT_KEY]}, which cannot be imported "
                    f"here ({err}). Pass it: load_from_checkpoint(path, {key}=...).") from err
        elif UNSAVED_KEY in value:
            raise MisconfigurationException(
                f"Hyperparameter {key!r} was {value[UNSAVED_KEY]}, which could not be saved in "
                f"the checkpoint (it has no import path, or only unpickling code could rebuild "
                f"it). Pass it: load_from_checkpoint(path, {key}=...).")


# --- internals ---------------------------------------------------------------------------------
def _as_list(names: list[str] | tuple[str, ...] | str | None) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    return [n for n in names if isinstance(n, str)]


def _snapshot(hparams: AttributeDict) -> AttributeDict:
    """A deep copy, so later changes to ``hparams`` do not show in ``hparams_initial``."""
    try:
        return copy.deepcopy(hparams)
    except Exception:  # an uncopyable value (a lock, a file handle): copy the mapping only
        return AttributeDict(hparams)


def _update_hparams(module: Any, value: Any) -> None:
    """Merge ``value`` into ``module``'s ``AttributeDict`` (successive calls accumulate).

    An OmegaConf ``DictConfig`` becomes the hyperparameters itself, as in Lightning (dot
    access, interpolation and its type kept), and is saved as a plain dict with
    ``hparams_type="DictConfig"`` so ``load_from_checkpoint`` rebuilds one.
    """
    if is_dict_config(value):
        current = module.__dict__.get("_hparams")
        if is_dict_config(current):
            current.merge_with(value)
        else:
            module.__dict__["_hparams"] = value
        module.__dict__["_hparams_type"] = "DictConfig"
        return
    if isinstance(value, Namespace):
        module.__dict__["_hparams_type"] = "Namespace"
        value = vars(value)
    elif isinstance(value, _PRIMITIVES):
        raise ValueError(
            f"save_hyperparameters got the primitive {value!r}; pass init argument names "
            "(save_hyperparameters('lr')) or one dict/Namespace.")
    elif not isinstance(value, Mapping):
        raise ValueError(
            f"Unsupported hyperparameter container {type(value).__name__}; use a dict, "
            "argparse.Namespace or AttributeDict.")
    current = module.__dict__.get("_hparams")
    if not isinstance(current, AttributeDict):
        current = AttributeDict()
        module.__dict__["_hparams"] = current
    current.update(value)


def _collect_init_args(module: Any, frame: types.FrameType | None) -> dict[str, Any]:
    """The ``__init__`` arguments ``save_hyperparameters`` records (docs DECISION 0.9-1).

    ``save_hyperparameters`` may be called from a base class's ``__init__`` reached through
    ``super().__init__(...)``. Code written for 0.9 (``loggers.base.written_for_09``) gets
    0.9's answer: only the arguments of the ``__init__`` that made the call. Other code gets
    2.x's: the arguments of every ``__init__`` of ``module`` on the stack, the subclass's
    winning.
    """
    collected: dict[str, Any] = {}
    frames = _init_frames(module, frame)
    if frame is not None and written_for_09(frame.f_code.co_filename):
        # 0.9 ``get_init_args(frame)`` reads the calling frame alone
        first = next(frames, None)
        return _frame_args(first) if first is not None else collected
    for init_frame in frames:
        # outer frames (subclasses) come later and override the base class's values
        collected.update(_frame_args(init_frame))
    return collected


def _init_frames(module: Any, frame: types.FrameType | None) -> Iterator[types.FrameType]:
    """The consecutive ``__init__`` frames of ``module``, innermost first.

    Frames before the first constructor (a helper the user called from ``__init__``) are
    skipped; the walk stops at the first frame above the constructor chain.
    """
    inside = False
    while frame is not None:
        if _is_init_of(frame, module):
            inside = True
            yield frame
        elif inside:
            return
        frame = frame.f_back


def _is_init_of(frame: types.FrameType, module: Any) -> bool:
    code = frame.f_code
    if code.co_name != "__init__" or code.co_argcount == 0:
        return False
    return frame.f_locals.get(code.co_varnames[0]) is module


def _frame_args(frame: types.FrameType) -> dict[str, Any]:
    """Named arguments of a constructor frame (no self, no ``*args``; ``**kwargs`` merged)."""
    info = inspect.getargvalues(frame)
    values = {name: info.locals[name] for name in info.args[1:] if name in info.locals}
    if info.keywords and isinstance(info.locals.get(info.keywords), dict):
        values.update(info.locals[info.keywords])
    return values


def _allow_in_checkpoints() -> None:
    """``m.hparams`` is an ``AttributeDict``: checkpoints that hold it load weights-only."""
    from ray_lit.storage.checkpoint_io import CHECKPOINT_ALLOWLIST

    if AttributeDict not in CHECKPOINT_ALLOWLIST:
        CHECKPOINT_ALLOWLIST.append(AttributeDict)


_allow_in_checkpoints()
