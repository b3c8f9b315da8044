"""Behaviour that Lightning 0.9.0's own test suite pins, re-stated as ray_lit tests (issue 14).

Each test names the 0.9 behaviour it pins; none copies Lightning's code. All run in process.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
from doubles import AggregatingLogger, DeterministicModel, RecordingLogger
from torch.utils.data import DataLoader, IterableDataset

import ray_lit as pl
from ray_lit.callbacks.early_stopping import EarlyStopping
from ray_lit.callbacks.model_checkpoint import ModelCheckpoint
from ray_lit.errors import MisconfigurationException


class Rows(IterableDataset):
    """``n`` samples ``(ones(2), idx)`` with no ``__len__``: the loader has no length."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        for idx in range(self.n):
            yield torch.ones(2), torch.tensor(float(idx))


def unsized_loader(n: int, batch_size: int = 3) -> DataLoader:
    return DataLoader(Rows(n), batch_size=batch_size)


class CountsValidation(DeterministicModel):
    """Records the training batch index at which each validation run starts and how many
    validation batches each run saw."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_runs: list[tuple[int, int]] = []  # (train batches done, val batches seen)
        self._seen = 0
        self.train_batches = 0

    def training_step(self, batch, batch_idx):
        self.train_batches += 1
        return self.step(batch)

    def on_validation_epoch_start(self):
        self._seen = 0

    def validation_step(self, batch, batch_idx):
        self._seen += 1
        self.log("val_loss", self.step(batch))

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val_runs.append((self.train_batches, self._seen))


# --- 1. dataloaders without a length ----------------------------------------------------------
def test_unsized_val_loader_runs_every_batch(make_trainer):
    model = CountsValidation()
    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloader=model.train_dataloader(),
                val_dataloaders=unsized_loader(9))
    assert trainer.num_val_batches == [float("inf")]
    assert model.val_runs == [(4, 3)]  # 9 rows / 3 per batch, after the 4 training batches


def test_unsized_val_loader_in_sanity_check_and_validate(make_trainer):
    model = CountsValidation()
    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=2, limit_train_batches=1)
    trainer.fit(model, train_dataloader=model.train_dataloader(),
                val_dataloaders=unsized_loader(9))
    results = trainer.validate(model, dataloaders=unsized_loader(9), verbose=False)
    assert results[0]["val_loss"] == pytest.approx(171.0)


def test_unsized_test_loader(make_trainer):
    class Tested(DeterministicModel):
        def test_step(self, batch, batch_idx):
            self.log("test_loss", self.step(batch))

    trainer = make_trainer()
    results = trainer.test(Tested(), test_dataloaders=unsized_loader(6), ckpt_path=None,
                           verbose=False)
    assert results == [{"test_loss": pytest.approx(171.0)}]
    assert trainer.num_test_batches == [float("inf")]


def test_unsized_train_loader_validates_every_int_interval(make_trainer):
    model = CountsValidation()
    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=0, val_check_interval=2)
    trainer.fit(model, train_dataloader=unsized_loader(15), val_dataloaders=model.val_dataloader())
    assert trainer.num_training_batches == float("inf")
    # 5 training batches: validation after batches 2 and 4
    assert [done for done, _ in model.val_runs] == [2, 4]
    assert trainer.global_step == 5


def test_unsized_train_loader_validates_at_its_end_with_interval_one(make_trainer):
    model = CountsValidation()
    trainer = make_trainer(max_epochs=2, num_sanity_val_steps=0, val_check_interval=1.0)
    trainer.fit(model, train_dataloader=unsized_loader(12), val_dataloaders=model.val_dataloader())
    assert model.val_runs == [(4, 4), (8, 4)]  # once per epoch, after its last batch


def test_unsized_train_loader_with_int_limit_validates_at_the_limit(make_trainer):
    model = CountsValidation()
    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=0, limit_train_batches=3)
    trainer.fit(model, train_dataloader=unsized_loader(30), val_dataloaders=model.val_dataloader())
    assert trainer.num_training_batches == 3
    assert model.val_runs == [(3, 4)]


class LenNotImplemented:
    """A plain iterable (not a DataLoader) whose ``__len__`` raises NotImplementedError."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self):
        for idx in range(self.batches):
            yield torch.ones(3, 2), torch.full((3,), float(idx))


def test_loader_whose_len_raises_not_implemented_has_no_length(make_trainer):
    model = CountsValidation()
    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=1, val_check_interval=3)
    trainer.fit(model, train_dataloader=LenNotImplemented(7),
                val_dataloaders=LenNotImplemented(2))
    assert trainer.num_training_batches == float("inf")
    assert trainer.num_val_batches == [float("inf")]
    assert model.val_runs == [(3, 2), (6, 2)]
    assert trainer.global_step == 7


def test_unsized_train_loader_with_fraction_interval_raises(make_trainer):
    model = CountsValidation()
    trainer = make_trainer(max_epochs=1, val_check_interval=0.5)
    with pytest.raises(MisconfigurationException, match="val_check_interval"):
        trainer.fit(model, train_dataloader=unsized_loader(12),
                    val_dataloaders=model.val_dataloader())


@pytest.mark.parametrize("option", ["limit_train_batches", "limit_val_batches"])
def test_unsized_loader_with_fraction_limit_raises(make_trainer, option):
    model = CountsValidation()
    trainer = make_trainer(max_epochs=1, **{option: 0.5})
    with pytest.raises(MisconfigurationException, match=option):
        trainer.fit(model, train_dataloader=unsized_loader(12),
                    val_dataloaders=unsized_loader(12))


def test_whole_float_limit_above_one_is_a_count(make_trainer):
    class Tested(DeterministicModel):
        def __init__(self) -> None:
            super().__init__()
            self.seen: dict[int, int] = {}

        def test_step(self, batch, batch_idx, dataloader_idx=0):
            self.seen[dataloader_idx] = self.seen.get(dataloader_idx, 0) + 1

    trainer = make_trainer(limit_test_batches=1e50, limit_train_batches=2.0)
    assert trainer.config.limit_train_batches == 2
    model = Tested()
    loaders = [DeterministicModel(n_val=6).val_dataloader(), model.val_dataloader()]
    trainer.test(model, test_dataloaders=loaders, verbose=False)
    assert trainer.num_test_batches == [2, 4] and model.seen == {0: 2, 1: 4}
    with pytest.raises(MisconfigurationException, match="limit_val_batches"):
        make_trainer(limit_val_batches=1.5)


def test_int_val_check_interval_longer_than_epoch_raises(make_trainer):
    model = CountsValidation()
    with pytest.raises((ValueError, MisconfigurationException), match="val_check_interval"):
        make_trainer(val_check_interval=5).fit(model)  # 4 batches per epoch


# --- 2. a hook set to None is not overridden --------------------------------------------------
class Learns(DeterministicModel):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def training_step_end(self, out):
        raise AssertionError("turned off: must not be called")

    def validation_step(self, batch, batch_idx):
        raise AssertionError("turned off: must not be called")


class LearnsNoStepEnd(Learns):
    training_step_end = None


@pytest.mark.parametrize("where", ["class", "instance"])
def test_hook_set_to_none_is_not_overridden(make_trainer, where):
    model = LearnsNoStepEnd() if where == "class" else Learns()
    if where == "instance":
        model.training_step_end = None
    model.validation_step = None
    model.training_epoch_end = None
    before = model.l1.weight.detach().clone()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model)
    assert trainer.global_step == 4
    assert not torch.equal(model.l1.weight, before)


def test_none_loader_hook_on_datamodule_means_no_loader(make_trainer):
    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return DeterministicModel().train_dataloader()

        def val_dataloader(self):
            raise AssertionError("turned off: must not be called")

    class Validates(DeterministicModel):
        def validation_step(self, batch, batch_idx):
            raise AssertionError("no val loader: must not run")

    dm = DM()
    dm.val_dataloader = None
    model = Validates()
    model.val_dataloader = None
    trainer = make_trainer(max_epochs=1)
    with pytest.warns(UserWarning, match="no val_dataloader"):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4


# --- 3. every trainer log call reaches the logger at once, in order ---------------------------
class LogsTrainAndVal(DeterministicModel):
    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.step(batch))


def test_each_log_call_reaches_the_logger_when_made(make_trainer):
    logger = AggregatingLogger()
    seen_at_batch_start: list[int] = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx, *args):
            seen_at_batch_start.append(sum("train_loss" in m for m, _ in logger.calls))

    trainer = make_trainer(max_epochs=1, logger=logger, log_every_n_steps=1,
                           num_sanity_val_steps=0, callbacks=[Watch()])
    trainer.fit(LogsTrainAndVal())
    # batch i starts after the train metrics of batches 0..i-1 reached log_metrics
    assert seen_at_batch_start == [0, 1, 2, 3]
    steps = [s for _, s in logger.calls]
    assert steps == sorted(steps)
    # the last batch's train metrics and the validation metrics share step 3, as two calls
    at_last = [sorted(m) for m, s in logger.calls if s == 3]
    assert at_last == [["epoch", "train_loss"], ["epoch", "val_loss"]]


def test_logger_calls_from_a_callback_stay_in_order(make_trainer):
    logger = AggregatingLogger()

    class LogsDirectly(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx, *args):
            trainer.logger.log_metrics({"marker": float(batch_idx)}, step=trainer.global_step)

    trainer = make_trainer(max_epochs=1, logger=logger, log_every_n_steps=1,
                           num_sanity_val_steps=0, callbacks=[LogsDirectly()])
    trainer.fit(LogsTrainAndVal(), val_dataloaders=[])
    keys = [("marker" if "marker" in m else "train") for m, _ in logger.calls]
    assert keys == ["marker", "train"] * 4


def test_worker_events_replayed_on_the_driver_reach_the_logger_one_by_one():
    from ray_lit.driver.reporting import DriverSink, replay
    from ray_lit.loop.reporting import RecordingSink

    worker = RecordingSink()
    worker.log_metrics({"train_loss": 1.0}, 0)
    worker.log_metrics({"val_loss": 2.0}, 0)
    worker.log_metrics({"train_loss": 3.0}, 1)
    logger = AggregatingLogger()
    driver = DriverSink([logger])
    events = worker.drain()
    replay(events[:2], driver)  # a first poll: both step-0 calls arrive, unmerged
    assert logger.calls == [({"train_loss": 1.0}, 0), ({"val_loss": 2.0}, 0)]
    replay(events[2:], driver)
    assert logger.calls[-1] == ({"train_loss": 3.0}, 1)


def test_agg_and_log_metrics_on_its_own_still_aggregates():
    logger = AggregatingLogger()
    for i, value in enumerate([1.0, 3.0, 5.0, 7.0]):
        logger.agg_and_log_metrics({"loss": value}, step=i // 2)
    assert logger.calls == [({"loss": 2.0}, 0)]
    logger.save()
    assert logger.calls == [({"loss": 2.0}, 0), ({"loss": 6.0}, 1)]


# --- 4. terminate_on_nan ----------------------------------------------------------------------
class NanAtBatch(DeterministicModel):
    def __init__(self, nan_batch: int) -> None:
        super().__init__()
        self.nan_batch = nan_batch
        self.backward_calls = 0

    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        return loss * float("nan") if batch_idx == self.nan_batch else loss

    def on_after_backward(self):
        self.backward_calls += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_terminate_on_nan_checks_the_loss_before_backward_and_step(make_trainer):
    model = NanAtBatch(nan_batch=1)
    trainer = make_trainer(terminate_on_nan=True, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="nan or inf"):
        trainer.fit(model)
    assert model.backward_calls == 1  # batch 0 only
    assert torch.isfinite(model.l1.weight).all()
    assert trainer.global_step == 1


class BlowsUpWeights(DeterministicModel):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def training_step(self, batch, batch_idx):
        self.batches.append(batch_idx)
        return self.step(batch)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_idx=0, *args, **kwargs):
        with torch.no_grad():
            self.l1.weight[0, 1] = float("inf")


def test_terminate_on_nan_names_a_parameter_spoilt_at_the_last_step(make_trainer):
    class SpoilsAfterBackward(DeterministicModel):
        def on_after_backward(self):
            if self.global_step == 2:
                torch.nn.init.constant_(self.l1.weight, float("nan"))

    trainer = make_trainer(terminate_on_nan=True, max_steps=3, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="`l1.weight`"):
        trainer.fit(SpoilsAfterBackward(), val_dataloaders=[])


def test_terminate_on_nan_checks_parameters_after_the_step(make_trainer):
    model = BlowsUpWeights()
    trainer = make_trainer(terminate_on_nan=True, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="l1.weight"):
        trainer.fit(model)
    assert model.batches == [0]  # stopped right after the first step


def test_without_terminate_on_nan_training_goes_on(make_trainer):
    model = BlowsUpWeights()
    make_trainer(num_sanity_val_steps=0).fit(model)
    assert model.batches == [0, 1, 2, 3]


# --- 5. a tensor from training_epoch_end is not val_loss --------------------------------------
class ReturnsFromTrainingEpochEnd(DeterministicModel):
    def training_epoch_end(self, outputs):
        return torch.tensor(-1.0)


def test_training_epoch_end_tensor_is_not_val_loss(make_trainer, tmp_path):
    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(ReturnsFromTrainingEpochEnd(), val_dataloaders=[])
    assert "val_loss" not in trainer.callback_metrics


def test_checkpoint_on_val_loss_does_not_see_training_epoch_end_tensor(make_trainer, tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), monitor="val_loss")
    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[ckpt],
                           enable_checkpointing=True)
    with pytest.raises(MisconfigurationException, match="val_loss"):
        trainer.fit(ReturnsFromTrainingEpochEnd(), val_dataloaders=[])


def test_validation_epoch_end_tensor_is_still_val_loss(make_trainer):
    class Returns(DeterministicModel):
        def validation_step(self, batch, batch_idx):
            return self.step(batch)

        def validation_epoch_end(self, outputs):
            return torch.stack(outputs).mean()

    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(Returns())
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(171.0)


# --- 6. the sanity check does not call on_validation_start / on_validation_end ----------------
def test_sanity_check_skips_validation_start_and_end(make_trainer):
    events: list[tuple[str, bool]] = []

    class Watch(pl.Callback):
        def on_validation_start(self, trainer, pl_module):
            events.append(("cb_start", trainer.sanity_checking))

        def on_validation_end(self, trainer, pl_module):
            events.append(("cb_end", trainer.sanity_checking))

        def on_validation_epoch_start(self, trainer, pl_module):
            events.append(("cb_epoch_start", trainer.sanity_checking))

    class Model(DeterministicModel):
        def validation_step(self, batch, batch_idx):
            return None

        def on_validation_start(self):
            events.append(("m_start", self.trainer.sanity_checking))

        def on_validation_end(self):
            events.append(("m_end", self.trainer.sanity_checking))

    make_trainer(max_epochs=1, num_sanity_val_steps=2, callbacks=[Watch()]).fit(Model())
    assert events == [("cb_epoch_start", True), ("cb_start", False), ("m_start", False),
                      ("cb_epoch_start", False), ("cb_end", False), ("m_end", False)]


# --- 7. min_steps -----------------------------------------------------------------------------
class StopsAtOnce(DeterministicModel):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(5.0))


@pytest.mark.parametrize("min_steps, epochs", [(None, 2), (6, 2), (9, 3), (14, 4)])
def test_min_steps_keeps_training_past_early_stopping(make_trainer, min_steps, epochs):
    # the metric never improves: patience 0 stops after the second validation
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=1.0)
    trainer = make_trainer(max_epochs=10, min_steps=min_steps, callbacks=[stop],
                           num_sanity_val_steps=0)
    trainer.fit(StopsAtOnce())
    assert trainer.global_step == 4 * epochs
    assert trainer.global_step >= (min_steps or 0)


def test_min_steps_does_not_extend_max_epochs(make_trainer):
    trainer = make_trainer(max_epochs=1, min_steps=100, num_sanity_val_steps=0)
    trainer.fit(StopsAtOnce())
    assert trainer.global_step == 4


# --- 8. ModelCheckpoint(filepath=Path) --------------------------------------------------------
def test_model_checkpoint_filepath_may_be_a_path(make_trainer, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    as_dir = ModelCheckpoint(filepath=folder, monitor="val_loss")
    assert as_dir.dirpath == str(folder)
    template = ModelCheckpoint(filepath=pathlib.Path(tmp_path / "other" / "{epoch}"),
                               save_top_k=-1)
    assert template.dirpath == str(tmp_path / "other") and template.filename == "{epoch}"
    trainer = make_trainer(max_epochs=1, callbacks=[template], enable_checkpointing=True,
                           num_sanity_val_steps=0)
    trainer.fit(DeterministicModel(), val_dataloaders=[])
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["epoch=0.ckpt"]
    assert ModelCheckpoint(dirpath=pathlib.Path(folder)).dirpath == str(folder)


# --- 9. trainer.state, the dataloaders, batch_idx --------------------------------------------
def test_trainer_state_follows_the_run(make_trainer):
    from ray_lit.loop.trainer_state import TrainerFn, TrainerState

    assert pl.TrainerState is TrainerState
    seen: list[Any] = []

    class Model(DeterministicModel):
        def training_step(self, batch, batch_idx):
            seen.append((self.trainer.state == TrainerState.RUNNING, self.trainer.state.fn,
                         self.trainer.state.stage))
            return self.step(batch)

    kept: list[Any] = []

    class Keeps(pl.Callback):
        def on_batch_start(self, trainer, pl_module):
            kept.append(trainer.state)

    trainer = make_trainer(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
                           callbacks=[Keeps()])
    assert trainer.state == TrainerState.INITIALIZING
    trainer.fit(Model(), val_dataloaders=[])
    assert seen == [(True, TrainerFn.FITTING, "train")]
    assert trainer.state == TrainerState.FINISHED
    assert trainer.state != TrainerState.RUNNING
    assert trainer.state.fn == "fit" and trainer.state.status == "finished"
    assert trainer.state.finished and trainer.state.stage is None
    assert kept == [TrainerState.RUNNING]  # a kept state is a snapshot (0.9 enum member)
    trainer.state = TrainerState.INITIALIZING  # 0.9 code assigns it
    assert trainer.state == TrainerState.INITIALIZING


def test_trainer_state_interrupted(make_trainer):
    from ray_lit.loop.trainer_state import TrainerState

    class Interrupts(DeterministicModel):
        def training_step(self, batch, batch_idx):
            raise KeyboardInterrupt

    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(Interrupts(), val_dataloaders=[])
    assert trainer.state == TrainerState.INTERRUPTED
    assert trainer.interrupted


def test_trainer_dataloaders_and_batch_idx_after_fit_and_test(make_trainer):
    class Model(DeterministicModel):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return None

        def test_step(self, batch, batch_idx):
            return None

    model = Model()
    train, val = model.train_dataloader(), [model.val_dataloader(), model.val_dataloader()]
    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=0)
    assert trainer.train_dataloader is None and trainer.val_dataloaders is None
    trainer.fit(model, train_dataloader=train, val_dataloaders=val)
    assert trainer.train_dataloader is train
    assert trainer.val_dataloaders == val
    assert trainer.batch_idx == 3
    test_loader = model.test_dataloader()
    trainer.test(model, test_dataloaders=test_loader, verbose=False)
    assert trainer.test_dataloaders == [test_loader]
    assert trainer.state.fn == "test"


def test_logger_receives_logs_through_recording_helper(make_trainer):
    # the shared RecordingLogger (overrides agg_and_log_metrics) still sees every call once
    logger = RecordingLogger()
    make_trainer(max_epochs=1, logger=logger, log_every_n_steps=1,
                 num_sanity_val_steps=0).fit(LogsTrainAndVal())
    assert len(logger.with_key("train_loss")) == 4 and len(logger.with_key("val_loss")) == 1


# --- 10. current_epoch after fit: the 2.x count (DECISION in docs/lightning_idioms.md) -------
def test_current_epoch_after_fit_counts_finished_epochs(make_trainer):
    trainer = make_trainer(max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(DeterministicModel(), val_dataloaders=[])
    assert trainer.current_epoch == 3  # 0.9 reported 2


def test_current_epoch_after_early_stopping_is_one_past_the_stopped_epoch(make_trainer):
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=1.0)
    trainer = make_trainer(max_epochs=10, callbacks=[stop], num_sanity_val_steps=0)
    trainer.fit(StopsAtOnce())
    assert stop.stopped_epoch == 1  # what 0.9's trainer.current_epoch was
    assert trainer.current_epoch == 2


def test_trainer_state_on_the_driver_around_a_run_on_workers(make_trainer):
    from ray_lit.loop.trainer_state import TrainerState

    trainer = make_trainer()
    with trainer._driver_run("fit"):
        assert trainer.state == TrainerState.RUNNING and trainer.state.fn == "fit"
    assert trainer.state == TrainerState.FINISHED
    with pytest.raises(RuntimeError), trainer._driver_run("test"):
        raise RuntimeError("a worker failed")
    assert trainer.state == TrainerState.INTERRUPTED and trainer.state.fn == "test"


def test_a_worker_uses_an_iterable_that_is_not_a_dataloader_as_given():
    from ray_lit.loop.sampler import shard_dataloader

    loader = LenNotImplemented(3)
    for train in (True, False):
        assert shard_dataloader(loader, world_rank=1, world_size=2, train=train,
                                seed=0) is loader
