"""Adoption: modules, datamodules and callbacks written against the real Lightning package.

A user whose class subclasses the real ``lightning.pytorch.LightningModule`` (or
``pytorch_lightning.LightningModule`` 2.x) keeps their import line. At fit time ray_lit builds,
once per class, an *adopted* class whose method resolution order is the user's own classes
(their methods and mixins) followed by ray_lit's base instead of Lightning's, so the user's
methods run and everything they did not write (``self.log``, ``self.trainer``, hparams,
checkpoint hooks) is ray_lit's. The adopted instance shares the user's instance ``__dict__``:
parameters, buffers, submodules and plain attributes are the same objects, so after ``fit`` the
user's own instance holds the trained weights and whatever the hooks set.

``lightning`` is never imported here: a class is Lightning's when its ``__module__`` lives under
``lightning`` / ``pytorch_lightning`` / ``lightning_fabric``, which only happens when the user
imported it. Runs in the driver process; the adopted classes travel to Ray workers by value
(cloudpickle), and their metaclass rebuilds the same order there.
"""

from __future__ import annotations

import dis
import types
import weakref
from typing import Any

from ray_lit.callbacks.base import Callback
from ray_lit.callbacks.lightning_twins import arguments as twin_arguments
from ray_lit.callbacks.lightning_twins import twin_of
from ray_lit.core.datamodule import LightningDataModule
from ray_lit.core.hparams import AttributeDict
from ray_lit.core.module import LightningModule
from ray_lit.errors import MisconfigurationException

__all__ = ["adopt_callbacks", "adopt_datamodule", "adopt_module", "check_loggers",
           "is_lightning_class"]

_ROOTS = ("lightning", "pytorch_lightning", "lightning_fabric")
# hooks ray_lit's loop calls when a user defines them, though its base classes have no default
_CALLED_WITHOUT_DEFAULT = frozenset({"lr_scheduler_step", "on_before_optimizer_setup",
                                     "on_exception"})
_CLASSES: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()
_INSTANCES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def is_lightning_class(cls: type) -> bool:
    """Whether ``cls`` is defined by the real Lightning package (never ray_lit's aliases)."""
    module = getattr(cls, "__module__", None) or ""
    return module.split(".", 1)[0] in _ROOTS


def _lightning_base(cls: type, name: str) -> type | None:
    """The real Lightning class called ``name`` in ``cls``'s MRO, if any."""
    return next((c for c in cls.__mro__ if c.__name__ == name and is_lightning_class(c)), None)


class _AdoptedMeta(type):
    """Metaclass of adopted classes: ``class Adopted(UserClass, ray_lit_base)`` resolves
    attributes through the user's own classes, then ray_lit's base, skipping Lightning's.

    The user's class stays in the order, so ``isinstance(adopted, UserClass)`` holds and a
    ``super()`` call inside a user method continues into the user's mixins and then ray_lit.
    The order is computed from ``__bases__`` alone, so a worker that unpickles the class by value
    rebuilds the same one.
    """

    def mro(cls) -> list[type]:
        # from __bases__ only: cloudpickle rebuilds the class on a worker from its bases
        # before it restores the class's namespace
        user, base = cls.__bases__
        kept = [c for c in user.__mro__ if not is_lightning_class(c) and c not in base.__mro__]
        return [cls, *kept, *base.__mro__]


def _own_names(cls: type, base: type) -> set[str]:
    """Attribute names the user's own classes (not Lightning's, not ray_lit's) define."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if is_lightning_class(klass) or klass in base.__mro__:
            continue
        names.update(n for n in vars(klass) if not (n.startswith("__") and n.endswith("__")))
    return names


def _adopted_class(cls: type, lightning_base: type, base: type, what: str) -> type:
    """The adopted class of ``cls`` over ``base`` (built once per class, then cached)."""
    cached = _CLASSES.get(cls)
    if cached is not None:
        return cached
    if type(cls) is not type:
        raise MisconfigurationException(
            f"{cls.__qualname__} has the metaclass {type(cls).__qualname__}: ray_lit adopts "
            f"{what}s built on the real Lightning package only with the plain `type` metaclass. "
            f"Subclass `{base.__module__}.{base.__qualname__}` instead.")
    # a Lightning hook ray_lit's base does not have would never be called: refuse, naming it,
    # rather than train without the user's override
    skipped = sorted(n for n in _own_names(cls, base)
                     if hasattr(lightning_base, n) and not hasattr(base, n)
                     and n not in _CALLED_WITHOUT_DEFAULT)
    if skipped:
        raise MisconfigurationException(
            f"{cls.__qualname__} overrides Lightning {what} hook(s) {skipped} that ray_lit's "
            f"loop does not call, so they would silently not run. Move that work into a hook "
            f"ray_lit calls (see docs/lightning_idioms.md, 'Bring your Lightning module').")
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                 "__doc__": cls.__doc__, "__ray_lit_adopted__": True}
    if base is LightningModule and "configure_callbacks" in _own_names(cls, base):
        namespace["configure_callbacks"] = _configure_callbacks
    adopted = _AdoptedMeta(cls.__name__, (cls, base), namespace)
    _CLASSES[cls] = adopted
    return adopted


def _configure_callbacks(self: Any) -> Any:
    """The user's ``configure_callbacks`` with its Lightning callbacks adopted, as a list
    (2.x also allows one callback). Every rank calls it."""
    callbacks = super(type(self), self).configure_callbacks()
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)):
        callbacks = [callbacks]
    return adopt_callbacks(list(callbacks))


def _share_state(instance: Any, adopted_cls: type) -> Any:
    """A new ``adopted_cls`` instance whose ``__dict__`` IS ``instance.__dict__``."""
    adopted = _INSTANCES.get(instance)
    if adopted is not None and type(adopted) is adopted_cls:
        return adopted
    adopted = adopted_cls.__new__(adopted_cls)
    # one dict for both: what fit writes (weights, attributes) is on the user's instance
    object.__setattr__(adopted, "__dict__", instance.__dict__)
    _INSTANCES[instance] = adopted
    return adopted


def adopt_module(module: Any) -> Any:
    """``module`` as a ray_lit ``LightningModule`` (driver, at fit/validate/test/predict).

    A ray_lit module comes back unchanged; one whose class subclasses the real Lightning
    ``LightningModule`` comes back as its adopted twin sharing the instance's state.

    Raises:
        MisconfigurationException: the class overrides a Lightning hook ray_lit never calls,
            or has a custom metaclass.
    """
    if isinstance(module, LightningModule):
        return module
    lightning_base = _lightning_base(type(module), "LightningModule")
    if lightning_base is None:
        return module
    adopted = _share_state(module, _adopted_class(type(module), lightning_base,
                                                  LightningModule, "LightningModule"))
    state = module.__dict__
    # Lightning's AttributeDict would make workers import Lightning's data utilities to
    # unpickle the hyperparameters; ray_lit's behaves the same and pickles as a plain dict
    for key in ("_hparams", "_hparams_initial"):
        value = state.get(key)
        if isinstance(value, dict) and not isinstance(value, AttributeDict):
            state[key] = AttributeDict(value)
    return adopted


def adopt_datamodule(datamodule: Any) -> Any:
    """``datamodule`` as a ray_lit ``LightningDataModule`` (the real Lightning one adopted as
    ``adopt_module`` does; anything else unchanged). Driver only."""
    if isinstance(datamodule, LightningDataModule):
        return datamodule
    lightning_base = _lightning_base(type(datamodule), "LightningDataModule")
    if lightning_base is None:
        return datamodule
    adopted_cls = _adopted_class(type(datamodule), lightning_base, LightningDataModule,
                                 "LightningDataModule")
    return _share_state(datamodule, adopted_cls)


def _ray_lit_equivalent(cls: type, package: str) -> str | None:
    import importlib

    for klass in cls.__mro__:
        if is_lightning_class(klass):
            module = importlib.import_module(f"ray_lit.{package}")
            if klass.__name__ in getattr(module, "__all__", ()):
                return f"ray_lit.{package}.{klass.__name__}"
            return None
    return None


def adopt_callbacks(callbacks: list[Any]) -> list[Any]:
    """The Trainer's callbacks with user callbacks built on the real Lightning ``Callback``
    adopted (their hooks run with ray_lit's Trainer). Called by ``Trainer.__init__``.

    A user's subclass of a Lightning built-in (``ModelCheckpoint``, ``EarlyStopping``,
    ``LearningRateMonitor``, ``TQDMProgressBar``) is rebased onto ray_lit's callback of the same
    name (``_rebase_callback``).

    Lightning's own ``ModelCheckpoint``, ``EarlyStopping``, ``LearningRateMonitor`` and
    ``TQDMProgressBar`` run as ray_lit's class of the same name (``_as_twin``).

    Raises:
        MisconfigurationException: a Lightning built-in callback ray_lit has no twin for (or
            a subclass of one), or a subclass using what ray_lit's twin lacks; the message
            names ray_lit's class or the members that cannot work.
    """
    out = []
    for callback in callbacks:
        cls = type(callback)
        if isinstance(callback, Callback) or _lightning_base(cls, "Callback") is None:
            out.append(callback)
            continue
        nearest = next(c for c in cls.__mro__ if is_lightning_class(c))
        if nearest.__name__ == "Callback":
            out.append(_share_state(callback, _adopted_class(cls, nearest, Callback,
                                                             "Callback")))
            continue
        twin = twin_of(nearest.__name__)
        if twin is not None and nearest is cls:
            out.append(_as_twin(callback, twin))
            continue
        if twin is None:
            equivalent = _ray_lit_equivalent(cls, "callbacks")
            fix = (f"use `{equivalent}` (same arguments)" if equivalent else
                   "ray_lit has no equivalent; write it as a `ray_lit.callbacks.Callback`")
            subclass = "" if nearest is cls else f" (a subclass of {nearest.__qualname__})"
            raise MisconfigurationException(
                f"callbacks: {cls.__qualname__}{subclass} is the real Lightning's and drives "
                f"Lightning's own Trainer internals, which ray_lit does not have: {fix}.")
        out.append(_rebase_callback(callback, nearest, twin))
    return out


def _as_twin(callback: Any, twin: type) -> Any:
    """Lightning's own built-in ``callback`` (not a subclass) as ray_lit's ``twin`` of the
    same name, built from the arguments Lightning's ``__init__`` recorded and sharing the
    instance's ``__dict__``: ``best_model_path`` and the like are on the user's object after
    ``fit``, as with Lightning."""
    state = callback.__dict__
    fresh = twin(**twin_arguments(type(callback).__name__, state))
    state.update(fresh.__dict__)  # ray_lit's state wins; Lightning's other attributes stay
    return _share_state(callback, twin)


def _rebase_callback(callback: Any, nearest: type, twin: type) -> Any:
    """The user's subclass of Lightning's built-in ``nearest`` running on ray_lit's ``twin``.

    The user's own methods stay first in the order; ``super()`` from them reaches ray_lit's
    callback. The instance is re-initialised by ray_lit's ``__init__`` with the arguments
    Lightning's ``__init__`` recorded, and keeps the user's own attributes; it shares its
    ``__dict__`` with the user's instance, so ``best_model_path`` and the like are there after
    ``fit``. Refused, naming them, when the user's code uses members of Lightning's class that
    ray_lit's lacks (they would fail or silently do nothing).
    """
    cls = type(callback)
    name = nearest.__name__
    adopted_cls = _adopted_class(cls, nearest, twin, name)
    cached = _INSTANCES.get(callback)
    if cached is not None and type(cached) is adopted_cls:
        return cached  # rebased by an earlier Trainer: its state carries on, as in Lightning
    state = callback.__dict__
    fresh = twin(**twin_arguments(name, state))
    used, stored = _attribute_names(cls, twin)
    # by the adopted order, not dir(): dir() walks __bases__, which still reach Lightning's
    resolved = {n for klass in adopted_cls.__mro__ for n in vars(klass)}
    lightning_only = (set(dir(nearest)) | (set(state) - stored)) - \
        (resolved | set(fresh.__dict__) | stored)
    missing = sorted(n for n in used & lightning_only
                     if not (n.startswith("__") and n.endswith("__")))
    if missing:
        raise MisconfigurationException(
            f"callbacks: {cls.__qualname__} (a subclass of Lightning's {name}) uses {missing} "
            f"of Lightning's {name}, which ray_lit's {name} (the class it runs on here) does "
            f"not have. Write those lines with ray_lit.callbacks.{name}'s attributes, or "
            f"subclass `ray_lit.callbacks.{name}` (docs/lightning_idioms.md).")
    # Lightning's attributes stay (harmless); ray_lit's state wins where both name one
    state.update(fresh.__dict__)
    return _share_state(callback, adopted_cls)


_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR", "DELETE_ATTR"})


def _attribute_names(cls: type, base: type) -> tuple[set[str], set[str]]:
    """Attribute names the user's own classes' code reads and assigns (on any object: an
    over-approximation that only ever narrows to names of Lightning's class)."""
    used: set[str] = set()
    stored: set[str] = set()
    for klass in cls.__mro__:
        if is_lightning_class(klass) or klass in base.__mro__:
            continue
        for value in vars(klass).values():
            for code in _code_objects(value):
                for instruction in dis.get_instructions(code):
                    if instruction.opname in _LOADS:
                        used.add(instruction.argval)
                    elif instruction.opname == "STORE_ATTR":
                        stored.add(instruction.argval)
    return used, stored


def _code_objects(value: Any) -> list[types.CodeType]:
    """The code of a function, static/class method or property, nested functions included."""
    if isinstance(value, property):
        return [c for f in (value.fget, value.fset, value.fdel) for c in _code_objects(f)]
    function = getattr(value, "__func__", value)
    code = getattr(function, "__code__", None)
    found, pending = [], [code] if isinstance(code, types.CodeType) else []
    while pending:
        code = pending.pop()
        found.append(code)
        pending.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return found


def check_loggers(loggers: list[Any]) -> None:
    """Refuse real Lightning loggers, naming ray_lit's (they run on ray_lit's driver sink).

    Raises:
        MisconfigurationException: a logger class from the real Lightning package.
    """
    for logger in loggers:
        cls = type(logger)
        if any(is_lightning_class(c) for c in cls.__mro__):
            equivalent = _ray_lit_equivalent(cls, "loggers")
            fix = (f"use `{equivalent}` (same arguments)" if equivalent else
                   "subclass `ray_lit.loggers.Logger`")
            raise MisconfigurationException(
                f"logger: {cls.__qualname__} is the real Lightning's; ray_lit's loggers run on "
                f"the driver and receive the workers' metrics: {fix}.")
