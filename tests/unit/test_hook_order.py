"""Hook call order for fit / validate / test and hook signatures of both generations
(spec §3.1-3.5, §6 test_callbacks.py::test_trainer_callback_system, §8 scenario 7)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from doubles import BATCH_LOSS, DeterministicModel, HookRecorder, assert_subsequence

import ray_lit as pl

MODEL_HOOKS = [
    "prepare_data", "setup", "teardown", "configure_optimizers", "on_fit_start", "on_fit_end",
    "on_pretrain_routine_start", "on_pretrain_routine_end", "on_train_start", "on_train_end",
    "on_epoch_start", "on_epoch_end", "on_train_epoch_start", "on_train_epoch_end",
    "on_batch_start", "on_batch_end", "on_after_backward", "on_before_zero_grad",
    "on_validation_start", "on_validation_end", "on_validation_epoch_start",
    "on_validation_epoch_end", "on_test_start", "on_test_end", "on_test_epoch_start",
    "on_test_epoch_end", "training_step", "validation_step", "test_step", "optimizer_step",
    "optimizer_zero_grad",
]


def recording_model(events: list[str]) -> DeterministicModel:
    """A DeterministicModel whose hooks append ``"m.<name>"`` to ``events``."""

    class Recording(DeterministicModel):
        pass

    def make(name):
        base = getattr(DeterministicModel, name)

        def hook(self, *args, **kwargs):
            events.append(f"m.{name}")
            if name in ("training_step", "configure_optimizers"):
                return base(self, *args, **kwargs)
            if name in ("validation_step", "test_step"):
                self.step(args[0])  # nothing returned: nothing to report
            return None

        hook.__name__ = name
        return hook

    for name in MODEL_HOOKS:
        if name not in ("optimizer_step", "optimizer_zero_grad"):
            setattr(Recording, name, make(name))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        events.append("m.optimizer_step")
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        events.append("m.optimizer_zero_grad")
        optimizer.zero_grad()

    Recording.optimizer_step = optimizer_step
    Recording.optimizer_zero_grad = optimizer_zero_grad
    return Recording()


class SharedRecorder(HookRecorder):
    """Callback hooks appended as ``"cb.<name>"`` to a list shared with the model."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        super().__init__()

    def _make(self, name):
        inner = super()._make(name)

        def hook(*args, **kwargs):
            self.events.append(f"cb.{name}")
            inner(*args, **kwargs)
        return hook


def _fit_events(make_trainer, **options):
    events: list[str] = []
    rec = SharedRecorder(events)
    options.setdefault("max_epochs", 1)
    options.setdefault("limit_train_batches", 2)
    options.setdefault("limit_val_batches", 1)
    options.setdefault("num_sanity_val_steps", 1)
    trainer = make_trainer(callbacks=[rec], **options)
    model = recording_model(events)
    trainer.fit(model)
    return trainer, model, rec, events


def test_init_hooks(make_trainer):
    rec = HookRecorder()
    make_trainer(callbacks=[rec])
    assert rec.names == ["on_init_start", "on_init_end"]


def test_fit_callback_hook_order(make_trainer):
    _, _, rec, _ = _fit_events(make_trainer)
    names = rec.names
    batch = ["on_batch_start", "on_train_batch_start", "on_before_backward",
             "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
             "on_batch_end", "on_train_batch_end"]
    val_epoch = ["on_validation_epoch_start", "on_validation_batch_start",
                 "on_validation_batch_end", "on_validation_epoch_end"]
    assert_subsequence(names, [
        "on_init_start", "on_init_end", "setup", "on_pretrain_routine_start",
        "on_sanity_check_start", *val_epoch, "on_sanity_check_end", "on_pretrain_routine_end",
        "on_train_start", "on_epoch_start", "on_train_epoch_start", *batch, *batch,
        "on_validation_start", *val_epoch, "on_validation_end", "on_epoch_end",
        "on_train_epoch_end", "on_train_end", "on_fit_end", "teardown",
    ])
    assert names.index("on_fit_start") < names.index("on_sanity_check_start")
    # the two training batches: exactly the batch block, twice, between the epoch starts and
    # the validation run
    start = names.index("on_train_epoch_start") + 1
    assert names[start:start + 2 * len(batch)] == batch * 2
    assert names[-3:] == ["on_train_end", "on_fit_end", "teardown"]
    # fit never runs the test loop
    assert not any(n.startswith("on_test") for n in names)
    # stage arguments
    assert dict(rec.calls)["setup"] == ("fit",)
    assert [a for n, a in rec.calls if n == "teardown"] == [("fit",)]
    for name in ("on_train_start", "on_train_end", "on_fit_start", "on_fit_end",
                 "on_sanity_check_start", "on_sanity_check_end", "on_epoch_start",
                 "on_epoch_end", "on_train_epoch_start", "on_train_epoch_end"):
        assert names.count(name) == 1, name


def test_fit_model_hooks_and_callbacks_first(make_trainer):
    _, _, _, events = _fit_events(make_trainer)
    m = [e for e in events if e.startswith("m.")]
    assert_subsequence(m, [
        "m.prepare_data", "m.setup", "m.on_train_start", "m.on_epoch_start",
        "m.on_train_epoch_start", "m.on_batch_start", "m.training_step", "m.on_after_backward",
        "m.optimizer_step", "m.on_before_zero_grad", "m.optimizer_zero_grad", "m.on_batch_end",
        "m.on_batch_start", "m.training_step", "m.on_after_backward", "m.optimizer_step",
        "m.on_before_zero_grad", "m.optimizer_zero_grad", "m.on_batch_end",
        "m.on_validation_start", "m.on_validation_epoch_start", "m.validation_step",
        "m.on_validation_epoch_end", "m.on_validation_end", "m.on_epoch_end",
        "m.on_train_epoch_end", "m.on_train_end", "m.on_fit_end", "m.teardown",
    ])
    assert m.index("m.configure_optimizers") < m.index("m.on_train_start")
    assert m.index("m.setup") < m.index("m.configure_optimizers")
    assert m.count("m.training_step") == 2
    assert m.count("m.validation_step") == 2  # 1 sanity + 1 real
    assert "m.test_step" not in m
    # every callback runs before the module for the same event
    for name in ("setup", "on_fit_start", "on_train_start", "on_epoch_start",
                 "on_train_epoch_start", "on_batch_start", "on_after_backward",
                 "on_before_zero_grad", "on_validation_epoch_start", "on_epoch_end",
                 "on_train_end", "on_fit_end", "teardown"):
        assert events.index(f"cb.{name}") < events.index(f"m.{name}"), name


def test_sanity_check_flag_during_sanity_hooks(make_trainer):
    flags = []

    class Flag(pl.Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            flags.append(trainer.sanity_checking)

    class M(DeterministicModel):
        def validation_step(self, batch, batch_idx):
            return self.step(batch)

    make_trainer(callbacks=[Flag()], max_epochs=2).fit(M())
    assert flags == [True, False, False]


def test_test_hook_order(make_trainer):
    events: list[str] = []
    rec = SharedRecorder(events)
    trainer = make_trainer(callbacks=[rec], limit_test_batches=2)
    model = recording_model(events)
    results = trainer.test(model)
    assert results == [{}]  # one (empty) dict per test dataloader: nothing logged
    names = rec.names[2:]  # after on_init_start / on_init_end
    assert_subsequence(names, [
        "setup", "on_test_start", "on_test_epoch_start", "on_test_batch_start",
        "on_test_batch_end", "on_test_batch_start", "on_test_batch_end", "on_test_epoch_end",
        "on_test_end", "teardown"])
    assert not any(n.startswith(("on_validation", "on_train", "on_sanity", "on_epoch",
                                 "on_batch")) for n in names)
    assert dict(rec.calls)["setup"] == ("test",)
    assert dict(rec.calls)["teardown"] == ("test",)
    m = [e for e in events if e.startswith("m.")]
    assert m.count("m.test_step") == 2
    assert "m.training_step" not in m and "m.validation_step" not in m
    assert "m.on_before_zero_grad" not in m  # never during test


def test_validate_hook_order(make_trainer):
    events: list[str] = []
    rec = SharedRecorder(events)
    trainer = make_trainer(callbacks=[rec], limit_val_batches=1)
    trainer.validate(recording_model(events))
    names = rec.names[2:]  # after on_init_start / on_init_end
    assert names == ["setup", "on_validation_start", "on_validation_epoch_start",
                     "on_validation_batch_start", "on_validation_batch_end",
                     "on_validation_epoch_end", "on_validation_end", "teardown"]
    assert dict(rec.calls)["setup"] == ("validate",)
    assert "m.training_step" not in events and "m.test_step" not in events


def test_on_before_zero_grad_once_per_optimizer_step(make_trainer):
    for max_steps in (1, 2, 3):
        _, _, rec, _ = _fit_events(make_trainer, max_steps=max_steps, limit_train_batches=4,
                                   max_epochs=5)
        assert rec.names.count("on_before_zero_grad") == max_steps


# --- signatures of both generations --------------------------------------------------------------


class LegacyCallback(pl.Callback):
    def __init__(self):
        self.train_end = []
        self.train_start = []
        self.val_end = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx):
        self.train_start.append((type(batch).__name__, batch_idx, dataloader_idx))

    def on_train_batch_end(self, trainer, pl_module, batch, batch_idx, dataloader_idx):
        self.train_end.append((type(batch).__name__, batch_idx, dataloader_idx))

    def on_validation_batch_end(self, trainer, pl_module, batch, batch_idx, dataloader_idx):
        self.val_end.append((type(batch).__name__, batch_idx, dataloader_idx))


class ModernCallback(pl.Callback):
    def __init__(self):
        self.train_end = []
        self.train_start = []
        self.val_end = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_start.append((type(batch).__name__, batch_idx))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_end.append((outputs, type(batch).__name__, batch_idx))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.val_end.append((outputs, type(batch).__name__, batch_idx))


class SignatureModel(DeterministicModel):
    def validation_step(self, batch, batch_idx):
        return {"val_loss": self.step(batch)}


def test_legacy_batch_hook_signatures(make_trainer):
    cb = LegacyCallback()
    make_trainer(callbacks=[cb], limit_train_batches=2, limit_val_batches=1,
                 num_sanity_val_steps=0).fit(SignatureModel())
    assert cb.train_start == [("list", 0, 0), ("list", 1, 0)]
    assert cb.train_end == [("list", 0, 0), ("list", 1, 0)]
    assert cb.val_end == [("list", 0, 0)]


def test_modern_batch_hook_signatures(make_trainer):
    cb = ModernCallback()
    make_trainer(callbacks=[cb], limit_train_batches=2, limit_val_batches=1,
                 num_sanity_val_steps=0).fit(SignatureModel())
    assert cb.train_start == [("list", 0), ("list", 1)]
    assert [(b, i) for _, b, i in cb.train_end] == [("list", 0), ("list", 1)]
    assert [(b, i) for _, b, i in cb.val_end] == [("list", 0)]
    (val_out, _, _), = cb.val_end
    assert float(val_out["val_loss"]) == BATCH_LOSS  # the validation_step output


def test_modern_on_train_batch_end_outputs_is_loss_dict(make_trainer):
    # spec §3.5: 2.x passes outputs = {'loss': ...} also when training_step returns a tensor
    cb = ModernCallback()
    make_trainer(callbacks=[cb], limit_train_batches=2, num_sanity_val_steps=0).fit(
        DeterministicModel())
    for outputs, _, _ in cb.train_end:
        assert isinstance(outputs, Mapping)
        assert float(outputs["loss"]) == BATCH_LOSS


def test_model_batch_hooks_of_both_generations(make_trainer):
    seen = {}

    class Legacy(DeterministicModel):
        def on_batch_start(self, batch):
            seen.setdefault("on_batch_start", []).append(type(batch).__name__)

        def on_train_batch_end(self, batch, batch_idx, dataloader_idx):
            seen.setdefault("legacy_end", []).append((type(batch).__name__, batch_idx,
                                                      dataloader_idx))

    class Modern(DeterministicModel):
        def training_step(self, batch, batch_idx):
            return {"loss": self.step(batch), "extra": torch.tensor(float(batch_idx))}

        def on_train_batch_start(self, batch, batch_idx):
            seen.setdefault("modern_start", []).append(batch_idx)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen.setdefault("modern_end", []).append((float(outputs["loss"]),
                                                      float(outputs["extra"]), batch_idx))

    make_trainer(limit_train_batches=2).fit(Legacy())
    make_trainer(limit_train_batches=2).fit(Modern())
    assert seen["on_batch_start"] == ["list", "list"]
    assert seen["legacy_end"] == [("list", 0, 0), ("list", 1, 0)]
    assert seen["modern_start"] == [0, 1]
    assert seen["modern_end"] == [(BATCH_LOSS, 0.0, 0), (BATCH_LOSS, 1.0, 1)]


@pytest.mark.parametrize("hook", ["on_train_batch_start", "on_batch_start"])
def test_returning_minus_one_from_batch_start_ends_the_epoch(make_trainer, hook):
    steps = []

    class Stopper(DeterministicModel):
        def training_step(self, batch, batch_idx):
            steps.append((self.current_epoch, batch_idx))
            return self.step(batch)

    if hook == "on_train_batch_start":
        Stopper.on_train_batch_start = lambda self, batch, batch_idx, dataloader_idx=0: (
            -1 if batch_idx == 2 else None)
    else:
        per_epoch: dict[int, int] = {}

        def on_batch_start(self, batch):
            n = per_epoch[self.current_epoch] = per_epoch.get(self.current_epoch, 0) + 1
            return -1 if n == 3 else None  # the third batch of each epoch

        Stopper.on_batch_start = on_batch_start
    trainer = make_trainer(max_epochs=2)
    trainer.fit(Stopper())
    assert steps == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert trainer.global_step == 4
