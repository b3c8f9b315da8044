"""The 2.x ``self.log`` API (spec §2, §6 "2.x tests worth mirroring", §8 scenarios 6 and 12)."""

from __future__ import annotations

import pytest
import torch
from doubles import BATCH_LOSS, DeterministicModel, constant_loader, floats

import ray_lit as pl


class TrainLogging(DeterministicModel):
    def training_step(self, batch, batch_idx):
        v = torch.tensor(1.0 + batch_idx)  # 1..4, epoch mean 2.5
        self.log("default", v)
        self.log("l_e", v, on_step=False, on_epoch=True)
        self.log("l_s", v, on_step=True, on_epoch=False)
        self.log("l_se", v, on_step=True, on_epoch=True)
        self.log("p_e", v, on_step=False, on_epoch=True, prog_bar=True, logger=False)
        self.log("p_s", v, on_step=True, on_epoch=False, prog_bar=True, logger=False)
        self.log("p_se", v, on_step=True, on_epoch=True, prog_bar=True, logger=False)
        return self.step(batch)


def test_training_step_log_naming(fit):
    trainer, logger = fit(TrainLogging())
    assert logger.calls[:4] == [
        ({"default": 1.0 + b, "l_s": 1.0 + b, "l_se_step": 1.0 + b, "epoch": 0.0}, b)
        for b in range(4)]
    assert len(logger.calls) == 5
    assert logger.calls[4][0] == {"l_e": 2.5, "l_se_epoch": 2.5, "epoch": 0.0}
    assert floats(trainer.logged_metrics) == {
        "default": 4.0, "l_e": 2.5, "l_s": 4.0, "l_se_step": 4.0, "l_se_epoch": 2.5}
    assert all(isinstance(v, torch.Tensor) for v in trainer.logged_metrics.values())
    assert trainer.progress_bar_metrics == {"p_e": 2.5, "p_s": 4.0, "p_se_step": 4.0,
                                            "p_se_epoch": 2.5}
    assert all(isinstance(v, float) for v in trainer.progress_bar_metrics.values())
    cb = floats(trainer.callback_metrics)
    assert cb == {"default": 4.0, "l_e": 2.5, "l_s": 4.0, "l_se_step": 4.0, "l_se_epoch": 2.5,
                  "l_se": 2.5, "p_e": 2.5, "p_s": 4.0, "p_se_step": 4.0, "p_se_epoch": 2.5,
                  "p_se": 2.5}
    assert all(isinstance(v, torch.Tensor) for v in trainer.callback_metrics.values())


def test_log_every_n_steps_cadence(fit):
    _, logger = fit(TrainLogging(), log_every_n_steps=2)
    step_calls = [(m["l_s"], s) for m, s in logger.calls if "l_s" in m]
    assert step_calls == [(2.0, 1), (4.0, 3)]


def test_logged_metrics_filled_without_logger(make_trainer):
    trainer = make_trainer(logger=False, log_every_n_steps=1)
    trainer.fit(TrainLogging())
    assert floats(trainer.logged_metrics) == {
        "default": 4.0, "l_e": 2.5, "l_s": 4.0, "l_se_step": 4.0, "l_se_epoch": 2.5}


class EvalLogging(DeterministicModel):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.step(batch) + batch_idx)  # eval default: epoch-level
        self.log("v_se", torch.tensor(float(batch_idx)), on_step=True)  # on_epoch stays True


def test_eval_log_defaults_and_callback_metrics(fit):
    trainer, logger = fit(EvalLogging(), num_sanity_val_steps=0)
    epoch_dicts = [m for m in logger.dicts() if "val_loss" in m]
    assert epoch_dicts == [{"val_loss": BATCH_LOSS + 1.5, "v_se_epoch": 1.5, "epoch": 0.0}]
    step_values = [m["v_se_step"] for m in logger.dicts() if "v_se_step" in m]
    assert step_values == [0.0, 1.0, 2.0, 3.0]
    cb = floats(trainer.callback_metrics)
    assert cb["val_loss"] == BATCH_LOSS + 1.5
    assert cb["v_se_epoch"] == 1.5 and cb["v_se"] == 1.5
    assert "v_se_step" not in cb  # eval: only epoch-level values reach the callbacks


def test_validate_returns_logged_epoch_metrics(make_trainer):
    trainer = make_trainer()
    results = trainer.validate(EvalLogging())
    assert results == [{"val_loss": BATCH_LOSS + 1.5, "v_se_epoch": 1.5}]
    assert all(isinstance(v, float) for v in results[0].values())


class TwoLoaders(DeterministicModel):
    def val_dataloader(self):
        return [constant_loader(12, 3), constant_loader(12, 3)]

    def validation_step(self, batch, batch_idx, dataloader_idx):
        self.log("val_loss", torch.tensor(1.0 + dataloader_idx))
        self.log("shared", torch.tensor(1.0 + dataloader_idx), add_dataloader_idx=False)


def test_two_val_loaders_get_dataloader_suffix(fit):
    trainer, _ = fit(TwoLoaders(), num_sanity_val_steps=0)
    cb = floats(trainer.callback_metrics)
    assert cb["val_loss/dataloader_idx_0"] == 1.0
    assert cb["val_loss/dataloader_idx_1"] == 2.0
    assert "val_loss" not in cb


def test_validate_two_loaders_one_dict_each(make_trainer):
    results = make_trainer().validate(TwoLoaders())
    assert len(results) == 2
    assert results[0]["val_loss/dataloader_idx_0"] == 1.0
    assert results[1]["val_loss/dataloader_idx_1"] == 2.0
    assert "val_loss/dataloader_idx_1" not in results[0]
    assert "val_loss/dataloader_idx_0" not in results[1]


def test_validate_two_loaders_unsuffixed_metric_in_every_dict(make_trainer):
    # 2.x: a metric logged with add_dataloader_idx=False belongs to every dataloader's result
    results = make_trainer().validate(TwoLoaders())
    assert [r.get("shared") for r in results] == [1.5, 1.5]


class TestLogging(DeterministicModel):
    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.step(batch))


def test_trainer_test_returns_floats_and_fit_never_tests(make_trainer):
    calls = []

    class Tracked(TestLogging):
        def test_step(self, batch, batch_idx):
            calls.append(batch_idx)
            return super().test_step(batch, batch_idx)

    trainer = make_trainer(max_epochs=2)
    model = Tracked()
    trainer.fit(model)
    assert calls == []
    assert trainer.test(model) == [{"test_loss": BATCH_LOSS}]
    assert calls == [0, 1, 2, 3]


class UnequalEval(DeterministicModel):
    def __init__(self):
        super().__init__(n_val=10, val_batch_size=4)  # batches of 4, 4, 2

    def validation_step(self, batch, batch_idx):
        v = torch.tensor([1.0, 2.0, 10.0][batch_idx])
        self.log("w", v)
        self.log("wb", v, batch_size=1)
        self.log("s", v, reduce_fx="sum")
        self.log("mx", v, reduce_fx="max")
        self.log("mn", v, reduce_fx=torch.min)


def test_eval_reductions_weighted_by_batch_size(make_trainer):
    (result,) = make_trainer().validate(UnequalEval())
    assert result["w"] == pytest.approx(3.2)
    assert result["wb"] == pytest.approx(13.0 / 3)
    assert result["s"] == pytest.approx(13.0)
    assert result["mx"] == 10.0
    assert result["mn"] == 1.0


def test_custom_reduce_fx_raises(make_trainer):
    class Custom(DeterministicModel):
        def validation_step(self, batch, batch_idx):
            self.log("c", 1.0, reduce_fx=lambda x: x.median())

    with pytest.raises(pl.MisconfigurationException):
        make_trainer().validate(Custom())


def test_same_name_twice_with_different_options_raises(make_trainer):
    class Twice(DeterministicModel):
        def training_step(self, batch, batch_idx):
            self.log("x", 1.0, on_step=True, on_epoch=False)
            self.log("x", 1.0, on_step=False, on_epoch=True)
            return self.step(batch)

    with pytest.raises(pl.MisconfigurationException):
        make_trainer().fit(Twice())


class HookLogging(DeterministicModel):
    def on_train_start(self):
        self.log("ts", 1.0)

    def on_train_epoch_start(self):
        self.log("tes", 2.0)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("tbe", float(batch_idx))

    def on_train_epoch_end(self):
        self.log("tee", 3.0)

    def on_validation_epoch_end(self):
        self.log("vee", 4.0)

    def validation_step(self, batch, batch_idx):
        self.step(batch)


def test_per_hook_defaults(fit):
    trainer, logger = fit(HookLogging(), num_sanity_val_steps=0)
    step_values = [m["tbe"] for m in logger.dicts() if "tbe" in m]
    assert step_values == [0.0, 1.0, 2.0, 3.0]  # batch hook: step-level
    cb = floats(trainer.callback_metrics)
    assert cb["tes"] == 2.0 and cb["tee"] == 3.0 and cb["vee"] == 4.0
    # epoch-level hooks log once, without forked names
    assert not any(k.endswith(("_step", "_epoch")) for k in cb)


def test_log_in_on_train_start(fit):
    # 2.x: on_train_start may log (epoch-level); the value reaches the run's metrics
    trainer, logger = fit(HookLogging(), num_sanity_val_steps=0)
    assert float(trainer.callback_metrics["ts"]) == 1.0
    assert float(trainer.logged_metrics["ts"]) == 1.0


def test_on_step_in_epoch_hook_raises(make_trainer):
    class Bad(DeterministicModel):
        def on_train_epoch_end(self):
            self.log("x", 1.0, on_step=True)

    with pytest.raises(pl.MisconfigurationException):
        make_trainer().fit(Bad())


def test_log_in_configure_optimizers_raises(make_trainer):
    class Bad(DeterministicModel):
        def configure_optimizers(self):
            self.log("lr", 0.0)
            return super().configure_optimizers()

    with pytest.raises(pl.MisconfigurationException, match="configure_optimizers"):
        make_trainer().fit(Bad())


def test_log_in_setup_raises(make_trainer):
    class Bad(DeterministicModel):
        def setup(self, stage=None):
            self.log("x", 1.0)

    with pytest.raises(pl.MisconfigurationException, match="setup"):
        make_trainer().fit(Bad())


def test_on_step_false_on_epoch_false_raises(make_trainer):
    class Bad(DeterministicModel):
        def training_step(self, batch, batch_idx):
            self.log("x", 1.0, on_step=False, on_epoch=False)
            return self.step(batch)

    with pytest.raises(pl.MisconfigurationException):
        make_trainer().fit(Bad())


def test_callback_logs_through_pl_module(fit):
    class LoggingCallback(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.log("cb_metric", float(batch_idx) * 10)

        def on_train_epoch_end(self, trainer, pl_module):
            pl_module.log("cb_epoch", 5.0)

    trainer, logger = fit(DeterministicModel(), callbacks=[LoggingCallback()])
    assert [m["cb_metric"] for m in logger.dicts() if "cb_metric" in m] == [0.0, 10.0, 20.0,
                                                                             30.0]
    assert float(trainer.callback_metrics["cb_epoch"]) == 5.0


def test_sync_dist_in_process_leaves_tensor_unchanged(fit):
    seen = []

    class Sync(DeterministicModel):
        def training_step(self, batch, batch_idx):
            value = torch.tensor(3.0)
            self.log("synced", value, sync_dist=True, reduce_fx="sum", on_epoch=True)
            seen.append(float(value))
            loss = self.step(batch)
            before = loss.detach().clone()
            self.log("loss_synced", loss, sync_dist=True)
            assert torch.equal(loss.detach(), before)
            assert loss.grad_fn is not None
            return loss

    trainer, logger = fit(Sync())
    assert seen == [3.0] * 4
    assert float(trainer.callback_metrics["synced_step"]) == 3.0
    assert float(trainer.callback_metrics["synced_epoch"]) == 12.0
    assert [m["loss_synced"] for m in logger.dicts() if "loss_synced" in m] == [BATCH_LOSS] * 4


def test_sanity_metrics_are_reset(fit):
    seen = {}

    class Sanity(DeterministicModel):
        def validation_step(self, batch, batch_idx):
            if self.trainer.sanity_checking:
                self.log("sanity_val", torch.tensor(1.0), prog_bar=True)

        def training_step(self, batch, batch_idx):
            if batch_idx == 0 and self.current_epoch == 0:
                seen["pbar"] = dict(self.trainer.progress_bar_metrics)
                seen["logged"] = dict(self.trainer.logged_metrics)
                seen["callback"] = dict(self.trainer.callback_metrics)
            return self.step(batch)

    _, logger = fit(Sanity())
    assert not any("sanity_val" in m for m in logger.dicts())
    assert seen == {"pbar": {}, "logged": {}, "callback": {}}


def test_log_outside_trainer_warns_and_is_noop():
    model = DeterministicModel()
    with pytest.warns(UserWarning):
        model.log("x", 1.0)


def test_callback_metrics_reset_at_the_start_of_validate(make_trainer):
    # spec §2.5: callback_metrics are reset at the start of each fit / validate / test
    class Both(EvalLogging):
        def training_step(self, batch, batch_idx):
            self.log("train_only", 1.0, on_epoch=True)
            return self.step(batch)

    trainer = make_trainer(num_sanity_val_steps=0)
    model = Both()
    trainer.fit(model)
    assert "train_only" in trainer.callback_metrics
    trainer.validate(model)
    assert "train_only" not in trainer.callback_metrics
    assert float(trainer.callback_metrics["val_loss"]) == BATCH_LOSS + 1.5
