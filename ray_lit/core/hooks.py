"""Calling user hooks whose signature differs between Lightning generations.

0.9 and 2.x disagree on some hook signatures (for example ``on_train_batch_end(batch, batch_idx,
dataloader_idx)`` in 0.9 against ``on_train_batch_end(outputs, batch, batch_idx)`` in 2.x). A user
writes one of them; we look at the parameter names of the override once and pass what it asks for.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from typing import Any

# One entry per function, held weakly: keyed on a bound method, the cache would keep its
# ``__self__`` (a module, a Trainer, a callback, with every parameter they hold) alive after
# the run, one run after another in a notebook.
_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature_of(fn: Callable) -> tuple[tuple[str, ...], bool, bool]:
    """(positional parameter names, takes *args, takes **kwargs) of a bound or plain function.

    Looked at once per function; a bound method's names lose the first (``self``)."""
    func = fn.__func__ if inspect.ismethod(fn) else fn
    try:
        found = _SIGNATURES.get(func)
    except TypeError:  # not weakly referable (a builtin's method wrapper): read it each time
        return _read_signature(fn)
    if found is None:
        found = _read_signature(func)
        _SIGNATURES[func] = found
    if func is fn:
        return found
    names, var_pos, var_kw = found
    return names[1:], var_pos, var_kw


def _read_signature(fn: Callable) -> tuple[tuple[str, ...], bool, bool]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return (), True, True
    names = []
    var_pos = var_kw = False
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            var_pos = True
        elif p.kind is p.VAR_KEYWORD:
            var_kw = True
    return tuple(names), var_pos, var_kw


def _key(fn: Callable) -> Callable:
    return getattr(fn, "__func__", fn)


def call_adapted(
    fn: Callable,
    fixed: Sequence[Any],
    modern: Sequence[tuple[str, Any]],
    legacy: Sequence[tuple[str, Any]] | None = None,
) -> Any:
    """Call ``fn(*fixed, ...)`` with the arguments its signature asks for.

    Args:
        fn: a bound method (module hook) or a callback method bound to its callback.
        fixed: arguments every generation passes first (``trainer, pl_module`` for callbacks).
        modern: the 2.x arguments after ``fixed`` as ``(name, value)`` pairs, in order.
        legacy: the 0.9 arguments, when they differ.

    The override's parameter names decide: names that match the 0.9 list pick it, otherwise the
    2.x list is used; either is cut to the number of positional parameters the override takes.
    """
    names, var_pos, _ = _signature_of(fn)
    rest = names[len(fixed):]
    chosen = modern
    # 0.9 overrides are recognised by their first parameter name (``batch`` where 2.x has
    # ``outputs``); any other naming gets the 2.x order.
    if legacy and not var_pos and rest and "outputs" not in rest and rest[0] == legacy[0][0]:
        chosen = legacy
    values = [v for _, v in chosen]
    if not var_pos:
        values = values[: len(rest)]
    return fn(*fixed, *values)


def is_overridden(name: str, obj: Any, base: type) -> bool:
    """Whether ``obj`` (an instance) overrides method ``name`` of ``base``.

    A hook set to ``None`` (on the instance or on its class) is not overridden: 0.9 code turns
    a hook off that way (``model.validation_step = None``), and calling it would fail.
    """
    own = getattr(obj, "__dict__", {})
    if name in own:
        # assigned on the instance (tests patch hooks this way)
        return own[name] is not None
    impl = getattr(type(obj), name, None)
    if impl is None:
        return False
    return getattr(impl, "__code__", None) is not getattr(getattr(base, name, None), "__code__", 0)
