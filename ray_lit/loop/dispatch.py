"""Calling hooks: every callback first, then the module, for one event (spec §3).

Hooks whose signature differs between Lightning generations go through
``ray_lit.core.hooks.call_adapted``, so a 0.9 override and a 2.x override both get the arguments
they name. ``_current_fx_name`` is set around each call so ``self.log`` (and
``pl_module.log`` from a callback) knows which hook it is in.
"""

from __future__ import annotations

from typing import Any

from ray_lit.core.hooks import call_adapted

# 2.x argument lists (after trainer, pl_module for callbacks) and their 0.9 forms.
_BATCH_END = {"on_train_batch_end", "on_validation_batch_end", "on_test_batch_end"}


class HookDispatcher:
    """Runs one event on the callbacks and the module of a trainer."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def _with_fx(self, name: str, fn: Any, *args: Any) -> Any:
        module = self.trainer.lightning_module
        previous = getattr(module, "_current_fx_name", None)
        module.__dict__["_current_fx_name"] = name
        try:
            return fn(*args)
        finally:
            module.__dict__["_current_fx_name"] = previous

    def callbacks(self, name: str, *args: Any, callbacks: Any = None) -> None:
        trainer, module = self.trainer, self.trainer.lightning_module
        for cb in self.trainer.callbacks if callbacks is None else callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                self._with_fx(name, fn, trainer, module, *args)

    def module(self, name: str, *args: Any) -> Any:
        fn = getattr(self.trainer.lightning_module, name, None)
        return None if fn is None else self._with_fx(name, fn, *args)

    def both(self, name: str, *args: Any) -> Any:
        """Callbacks, then the module; returns the module hook's value."""
        self.callbacks(name, *args)
        return self.module(name, *args)

    def batch_start(self, name: str, batch: Any, batch_idx: int, dataloader_idx: int) -> Any:
        """``on_*_batch_start``: (batch, batch_idx[, dataloader_idx]) in both generations."""
        args = [("batch", batch), ("batch_idx", batch_idx), ("dataloader_idx", dataloader_idx)]
        trainer, module = self.trainer, self.trainer.lightning_module
        for cb in trainer.callbacks:
            self._with_fx(name, call_adapted, getattr(cb, name), (trainer, module), args)
        return self._with_fx(name, call_adapted, getattr(module, name), (), args)

    def batch_end(self, name: str, outputs: Any, batch: Any, batch_idx: int,
                  dataloader_idx: int) -> None:
        """``on_*_batch_end``: 2.x (outputs, batch, batch_idx[, dl]) or 0.9 (batch, idx, dl)."""
        modern = [("outputs", outputs), ("batch", batch), ("batch_idx", batch_idx),
                  ("dataloader_idx", dataloader_idx)]
        legacy = [("batch", batch), ("batch_idx", batch_idx), ("dataloader_idx", dataloader_idx)]
        trainer, module = self.trainer, self.trainer.lightning_module
        for cb in trainer.callbacks:
            self._with_fx(name, call_adapted, getattr(cb, name), (trainer, module), modern, legacy)
        self._with_fx(name, call_adapted, getattr(module, name), (), modern, legacy)
