"""The hook dispatcher's resolution: empty base hooks are skipped, everything that does
something is still called, and the resolution follows the callbacks and the module."""

from __future__ import annotations

from typing import Any

import pytest
from doubles import DeterministicModel

import ray_lit as pl
from ray_lit.loop.dispatch import HookDispatcher, does_nothing


class _Base:
    def empty(self) -> None: ...

    def documented(self, x: Any) -> None:
        """Only a docstring."""

    def passes(self) -> None:
        pass

    def returns_none(self) -> None:
        return None

    def works(self) -> int:
        return 1

    async def coroutine(self) -> None: ...


class _Child(_Base):
    def empty(self) -> None:
        print("overridden")


@pytest.mark.parametrize("name", ["empty", "documented", "passes", "returns_none", "missing"])
def test_empty_bodies_and_missing_methods_do_nothing(name: str) -> None:
    assert does_nothing(_Base(), name)


@pytest.mark.parametrize("name", ["works", "coroutine"])
def test_a_body_or_a_coroutine_does_something(name: str) -> None:
    assert not does_nothing(_Base(), name)


def test_an_override_or_an_instance_attribute_does_something() -> None:
    assert not does_nothing(_Child(), "empty")
    patched = _Base()
    patched.empty = lambda: None  # assigned on the instance: always called
    assert not does_nothing(patched, "empty")
    patched.works = None  # ... unless it is None
    assert does_nothing(patched, "works")


def test_static_and_class_methods_are_judged_by_their_function() -> None:
    class Methods:
        @staticmethod
        def static_empty() -> None: ...

        @classmethod
        def class_empty(cls) -> None: ...

        @classmethod
        def class_works(cls) -> int:
            return 1

    assert does_nothing(Methods(), "static_empty") and does_nothing(Methods(), "class_empty")
    assert not does_nothing(Methods(), "class_works")


def test_a_callable_that_is_no_plain_function_is_always_called() -> None:
    import functools

    class Partial:
        hook = functools.partialmethod(lambda self, x: None, 1)

    assert not does_nothing(Partial(), "hook")


def test_a_hook_served_by_getattr_is_called() -> None:
    class Delegating:  # a wrapper that forwards every hook to another callback
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    class Inner(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            print("started")

    assert not does_nothing(Delegating(Inner()), "on_train_start")
    assert does_nothing(Delegating(object()), "on_train_start")


def test_the_base_hooks_of_callbacks_and_modules_do_nothing() -> None:
    assert does_nothing(pl.Callback(), "on_train_batch_start")
    assert does_nothing(pl.Callback(), "on_before_zero_grad")
    module = DeterministicModel()
    assert does_nothing(module, "on_train_batch_end")
    assert does_nothing(module, "on_after_backward")
    assert not does_nothing(module, "backward")  # the base calls loss.backward()
    assert not does_nothing(module, "training_step")


def _quiet_trainer(callbacks: list[Any]) -> pl.Trainer:
    """One epoch of 4 batches, no validation, nothing but the given callbacks."""
    return pl.Trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


def _fit_recording_dispatch(monkeypatch: pytest.MonkeyPatch, module: Any,
                            callbacks: list[Any]) -> list[str]:
    called: list[str] = []
    original = HookDispatcher._with_fx

    def spy(self: HookDispatcher, name: str, fn: Any, *args: Any) -> Any:
        called.append(name)
        return original(self, name, fn, *args)

    monkeypatch.setattr(HookDispatcher, "_with_fx", spy)
    _quiet_trainer(callbacks).fit(module)
    return called


def test_a_fit_calls_only_the_hooks_that_do_something(monkeypatch: pytest.MonkeyPatch) -> None:
    called = _fit_recording_dispatch(monkeypatch, DeterministicModel(), [])
    # 4 batches: the base ``backward`` (it has a body) is the only hook run per batch
    assert called.count("backward") == 4
    assert not {"on_train_batch_start", "on_train_batch_end", "on_batch_start",
                "on_after_backward", "on_before_zero_grad"} & set(called)


def test_overrides_are_called_with_their_hook_name(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []

    class Watcher(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(("callback", pl_module._current_fx_name))

    class Model(DeterministicModel):
        def on_after_backward(self) -> None:
            seen.append(("module", self._current_fx_name))

    called = _fit_recording_dispatch(monkeypatch, Model(), [Watcher()])
    assert called.count("on_train_batch_start") == 4 and called.count("on_after_backward") == 4
    assert seen[:2] == [("callback", "on_train_batch_start"), ("module", "on_after_backward")]


@pytest.mark.parametrize("change", ["append", "replace"])
def test_a_callback_added_or_replaced_during_the_fit_is_called_from_then_on(change: str) -> None:
    batches: list[int] = []

    class Late(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            batches.append(batch_idx)

    class Changer(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1 and change == "append":
                trainer.callbacks.append(Late())
            elif batch_idx == 1:
                trainer.callbacks[0] = Late()  # same list, same length

    _quiet_trainer([Changer()]).fit(DeterministicModel())
    assert batches == [2, 3]
