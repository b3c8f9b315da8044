"""Calling hooks: every callback first, then the module, for one event (spec §3).

Hooks whose signature differs between Lightning generations go through
``ray_lit.core.hooks.call_adapted``, so a 0.9 override and a 2.x override both get the arguments
they name. ``_current_fx_name`` is set around each call so ``self.log`` (and
``pl_module.log`` from a callback) knows which hook it is in.

Most hooks of a run are the base classes' empty bodies, and the loop calls about twenty per
batch. The dispatcher resolves each event once into the callables that do something (an
override, or a base implementation with a body) and skips the rest, so an unused hook costs a
dict lookup per batch instead of a call, a ``getattr`` per callback and two attribute writes.
The resolution is kept while ``trainer.callbacks`` holds the same callbacks in the same order and
``trainer.lightning_module`` is the same module (a callback added, removed or replaced, or another
module, resolves again); a new dispatcher is made for each stage (``fit``, ``validate``,
``test``), so a hook assigned on an instance in the middle of a stage counts from the next one.
"""

from __future__ import annotations

import dis
from collections.abc import Callable
from functools import cache
from types import CodeType, FunctionType
from typing import Any

from ray_lit.core.hooks import _signature_of, call_adapted, is_overridden

_SKIPPED_OPS = {"RESUME", "NOP", "CACHE", "EXTENDED_ARG"}


@cache
def _is_empty_code(code: CodeType) -> bool:
    """Whether a function body does nothing but return None (``...``, ``pass``, a docstring)."""
    ops = [(i.opname, i.argval) for i in dis.get_instructions(code)
           if i.opname not in _SKIPPED_OPS]
    return ops in ([("LOAD_CONST", None), ("RETURN_VALUE", None)], [("RETURN_CONST", None)])


def does_nothing(obj: Any, name: str) -> bool:
    """Whether calling ``obj.<name>(...)`` can have no effect and returns None: the method is
    missing, or its class's function has an empty body and the instance does not replace it
    (a method served by ``__getattr__``, as a delegating wrapper does, is always called)."""
    own = getattr(obj, "__dict__", {})
    if name in own:
        return own[name] is None  # assigned on the instance: called unless it is None
    impl = getattr(type(obj), name, None)
    if impl is None:
        return getattr(obj, name, None) is None
    fn = getattr(impl, "__func__", impl)  # a classmethod's function
    # only plain Python functions are judged by their code; anything else (a compiled
    # function, a partial, a callable object) is called
    return isinstance(fn, FunctionType) and _is_empty_code(fn.__code__)


def positional_count(fn: Callable, fixed: int, arity: int) -> int:
    """How many arguments after the ``fixed`` first ones to pass ``fn``: as many as it names
    positionally, or ``arity`` (the 2.x count) when it also takes ``*args``."""
    names, var_pos, _ = _signature_of(fn)
    count = max(len(names) - fixed, 0)
    return max(count, arity) if var_pos else count


def _doing(callbacks: Any, name: str) -> tuple[Any, ...]:
    """The bound ``name`` methods of the ``callbacks`` that do something for this event."""
    return tuple(getattr(cb, name) for cb in callbacks if not does_nothing(cb, name))


def _bound_unless_empty(obj: Any, name: str) -> Any:
    return None if does_nothing(obj, name) else getattr(obj, name, None)


def _overrides_base(module: Any, name: str) -> bool:
    from ray_lit.core.module import LightningModule

    return is_overridden(name, module, LightningModule)


class HookDispatcher:
    """Runs one event on the callbacks and the module of a trainer."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._callbacks: tuple[Any, ...] = ()
        self._callback_fns: dict[str, tuple[Any, ...]] = {}
        self._module: Any = None
        self._module_fns: dict[str, Any] = {}
        self._overridden: dict[str, bool] = {}
        self._signatures: dict[str, tuple[str, ...]] = {}

    # --- resolution --------------------------------------------------------------------------
    def _module_changed(self) -> None:
        self._module = self.trainer.lightning_module
        self._module_fns.clear()
        self._overridden.clear()
        self._signatures.clear()

    def _active_callbacks(self, name: str) -> tuple[Any, ...]:
        """``_doing(trainer.callbacks, name)``, resolved once while the callbacks stay."""
        callbacks = tuple(self.trainer.callbacks)
        if callbacks != self._callbacks:  # added, removed, replaced or reordered
            self._callbacks = callbacks
            self._callback_fns.clear()
        fns = self._callback_fns.get(name)
        if fns is None:
            fns = self._callback_fns[name] = _doing(callbacks, name)
        return fns

    def _per_module(self, table: dict[str, Any], name: str,
                    resolve: Callable[[Any, str], Any]) -> Any:
        """``table[name]``, resolved with ``resolve(module, name)`` once per module."""
        module = self.trainer.lightning_module
        if module is not self._module:
            self._module_changed()
        try:
            return table[name]
        except KeyError:
            value = table[name] = resolve(module, name)
            return value

    def _module_fn(self, name: str) -> Any:
        """The module's bound ``name`` method, or None when it does nothing."""
        return self._per_module(self._module_fns, name, _bound_unless_empty)

    def overridden(self, name: str) -> bool:
        """``is_overridden(name, module, LightningModule)``, resolved once per module."""
        return self._per_module(self._overridden, name, _overrides_base)

    def parameter_names(self, name: str) -> tuple[str, ...]:
        """The positional parameter names of the module's ``name`` method (bound: no self)."""
        return self._per_module(self._signatures, name,
                                lambda module, n: _signature_of(getattr(module, n))[0])

    # --- calling -------------------------------------------------------------------------------
    def _with_fx(self, name: str, fn: Any, *args: Any) -> Any:
        module = self.trainer.lightning_module
        previous = getattr(module, "_current_fx_name", None)
        module.__dict__["_current_fx_name"] = name
        try:
            return fn(*args)
        finally:
            module.__dict__["_current_fx_name"] = previous

    def callbacks(self, name: str, *args: Any, callbacks: Any = None) -> None:
        fns = self._active_callbacks(name) if callbacks is None else _doing(callbacks, name)
        if fns:
            trainer = self.trainer
            for fn in fns:
                self._with_fx(name, fn, trainer, trainer.lightning_module, *args)

    def module(self, name: str, *args: Any) -> Any:
        fn = self._module_fn(name)
        return None if fn is None else self._with_fx(name, fn, *args)

    def both(self, name: str, *args: Any) -> Any:
        """Callbacks, then the module; returns the module hook's value."""
        self.callbacks(name, *args)
        return self.module(name, *args)

    def both_by_arity(self, name: str, values: tuple[Any, ...], arity: int) -> Any:
        """Callbacks, then the module, each override given as many of ``values`` as it takes
        positionally (after ``trainer, pl_module`` for a callback); returns the module's value.

        For hooks that lost trailing arguments in 2.x: ``values`` is the longest (1.x/0.9)
        argument list and ``arity`` the 2.x count, so ``on_before_optimizer_step(optimizer)``
        (2.x) and ``on_before_optimizer_step(optimizer, optimizer_idx)`` (1.x) both work. An
        override that takes ``*args`` gets the 2.x arguments only (it may forward them to
        something with the 2.x signature, e.g. ``loss.backward(*args)``).
        """
        fns, module_fn = self._active_callbacks(name), self._module_fn(name)
        trainer = self.trainer
        for fn in fns:
            self._with_fx(name, fn, trainer, trainer.lightning_module,
                          *values[:positional_count(fn, 2, arity)])
        if module_fn is None:
            return None
        return self._with_fx(name, module_fn, *values[:positional_count(module_fn, 0, arity)])

    def batch_start(self, name: str, batch: Any, batch_idx: int, dataloader_idx: int) -> Any:
        """``on_*_batch_start``: (batch, batch_idx[, dataloader_idx]) in both generations."""
        fns, module_fn = self._active_callbacks(name), self._module_fn(name)
        if not fns and module_fn is None:
            return None
        args = [("batch", batch), ("batch_idx", batch_idx), ("dataloader_idx", dataloader_idx)]
        trainer = self.trainer
        for fn in fns:
            self._with_fx(name, call_adapted, fn, (trainer, trainer.lightning_module), args)
        if module_fn is None:
            return None
        return self._with_fx(name, call_adapted, module_fn, (), args)

    def batch_end(self, name: str, outputs: Any, batch: Any, batch_idx: int,
                  dataloader_idx: int) -> None:
        """``on_*_batch_end``: 2.x (outputs, batch, batch_idx[, dl]) or 0.9 (batch, idx, dl)."""
        fns, module_fn = self._active_callbacks(name), self._module_fn(name)
        if not fns and module_fn is None:
            return
        modern = [("outputs", outputs), ("batch", batch), ("batch_idx", batch_idx),
                  ("dataloader_idx", dataloader_idx)]
        legacy = [("batch", batch), ("batch_idx", batch_idx), ("dataloader_idx", dataloader_idx)]
        trainer = self.trainer
        for fn in fns:
            self._with_fx(name, call_adapted, fn, (trainer, trainer.lightning_module), modern,
                          legacy)
        if module_fn is not None:
            self._with_fx(name, call_adapted, module_fn, (), modern, legacy)
