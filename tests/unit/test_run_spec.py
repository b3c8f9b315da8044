"""Workers get a ``RunSpec`` (an allow-list of the driver Trainer), not a copy of the Trainer.

``driver.launch.run_spec`` builds it; each rank builds its Trainer from it
(``Trainer._from_run_spec``). Pickled as it travels, in one process."""

from __future__ import annotations

import dataclasses
import threading

import cloudpickle
import pytest
import torch
from doubles import DeterministicModel

import ray_lit as pl
from ray_lit.callbacks.base import Callback
from ray_lit.callbacks.progress import ProgressBar
from ray_lit.driver.launch import _ship, run_spec
from ray_lit.errors import MisconfigurationException
from ray_lit.messages import RunSpec


def _travel(spec: RunSpec) -> RunSpec:
    return cloudpickle.loads(cloudpickle.dumps(spec))


def _on_worker(trainer: pl.Trainer) -> pl.Trainer:
    spec = _travel(run_spec(trainer))
    return spec.trainer_class._from_run_spec(spec)


def test_the_spec_is_an_allow_list_driver_state_does_not_travel(make_trainer) -> None:
    trainer = make_trainer(max_epochs=2, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(DeterministicModel())
    # driver-side machinery and half-run state a copied Trainer used to carry
    trainer._train_loader = torch.zeros(1_000_000)  # 4 MB a copy would have shipped
    trainer._controller = threading.Lock()  # unpicklable: a copy failed on it
    trainer.callback_metrics = {"loss": torch.tensor(1.0)}
    spec = run_spec(trainer)
    blob = cloudpickle.dumps(spec)
    assert len(blob) < 100_000
    assert spec.extras == {}  # a base Trainer has nothing besides the listed fields
    worker = _travel(spec).trainer_class._from_run_spec(_travel(spec))
    assert "_train_loader" not in worker.__dict__ and "_controller" not in worker.__dict__
    assert worker.callback_metrics == {} and worker.lightning_module is None
    assert worker.optimizers == [] and worker.datamodule is None


def test_fit_counters_options_and_run_fields_reach_the_worker(make_trainer) -> None:
    trainer = make_trainer(max_epochs=2, limit_train_batches=3, num_sanity_val_steps=0)
    trainer.fit(DeterministicModel())
    trainer.num_restarts, trainer.world_size_history = 2, [2, 3]
    trainer.run_dir, trainer.tested_ckpt_path = "/runs/a", "/runs/a/best.ckpt"
    worker = _on_worker(trainer)
    # a test() after fit logs at the fit's last step and epoch
    assert (worker.global_step, worker.current_epoch) == (trainer.global_step,
                                                          trainer.current_epoch)
    assert worker.global_step == 6
    assert worker.config == dataclasses.replace(trainer.config, callbacks=[], logger=False)
    assert worker.config.max_epochs == 2 and worker.config.limit_train_batches == 3
    assert worker.default_root_dir == trainer.default_root_dir
    assert (worker.num_restarts, worker.world_size_history) == (2, [2, 3])
    assert (worker.run_dir, worker.tested_ckpt_path) == ("/runs/a", "/runs/a/best.ckpt")


def test_callbacks_travel_tagged_without_the_progress_bar(make_trainer) -> None:
    class Counts(Callback):
        def __init__(self) -> None:
            self.batches = 0

    counts = Counts()
    trainer = make_trainer(callbacks=[counts], enable_progress_bar=True)
    assert any(isinstance(cb, ProgressBar) for cb in trainer.callbacks)
    worker = _on_worker(trainer)
    assert not any(isinstance(cb, ProgressBar) for cb in worker.callbacks)
    shipped = [cb for cb in worker.callbacks if type(cb).__name__ == "Counts"]
    assert len(shipped) == 1 and shipped[0] is not counts
    assert shipped[0].__dict__["_ray_lit_key"] == counts.__dict__["_ray_lit_key"]


class _CountingTrainer(pl.Trainer):
    """A user's Trainer subclass: a method the loop calls and a public attribute."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.label = "mine"

    def tag(self) -> str:
        return f"{self.label}@{self.global_step}"


def test_a_trainer_subclass_keeps_its_class_and_public_attributes(tmp_path) -> None:
    trainer = _CountingTrainer(max_epochs=1, enable_progress_bar=False, logger=False,
                               enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer._private_scratch = object()  # private names are machinery: never shipped
    spec = run_spec(trainer)
    assert spec.extras == {"label": "mine"}
    worker = spec.trainer_class._from_run_spec(_travel(spec))
    assert isinstance(worker, _CountingTrainer) and worker.tag() == "mine@0"
    assert "_private_scratch" not in worker.__dict__


def test_a_worker_trainer_built_from_the_spec_runs_a_fit(make_trainer) -> None:
    """The built Trainer is whole: the loop runs on it as on the user's."""
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    worker = _on_worker(trainer)
    model = DeterministicModel()
    worker.fit(model)
    assert worker.global_step == 2 and worker.lightning_module is model


def test_an_unpicklable_callback_is_named_as_the_trainer_s(make_trainer) -> None:
    class Locked(Callback):
        def __init__(self) -> None:
            self.lock = threading.Lock()

    trainer = make_trainer(callbacks=[Locked()])
    with pytest.raises(MisconfigurationException) as err:
        _ship({"spec": run_spec(trainer)})
    text = str(err.value)
    assert "Cannot ship the Trainer to the Ray workers" in text
    assert "trainer.callbacks[" in text and "].lock (a _thread.lock)" in text


def test_the_stage_services_live_in_one_typed_context(make_trainer) -> None:
    """``trainer._host``/``_sink``/``_progress``/... are views of ``trainer._ctx``."""
    from ray_lit.loop.context import LoopContext

    trainer = make_trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(DeterministicModel())
    ctx = trainer._ctx
    assert isinstance(ctx, LoopContext)
    assert (ctx.host, ctx.sink, ctx.hooks) == (trainer._host, trainer._sink, trainer._hooks)
    assert ctx.progress.global_step == trainer.global_step == 2
    assert ctx.config is trainer.config and ctx.train_loader is trainer._train_loader
    assert "_host" not in trainer.__dict__ and "_progress" not in trainer.__dict__
    worker = _on_worker(trainer)
    assert worker._ctx is not ctx and worker._ctx.hooks is None
    assert worker._ctx.progress.global_step == 2
