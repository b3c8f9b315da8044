"""0.9 ``EvalResult`` in validation and test (spec §1.3-1.7, §3.3-3.4, §6
test_validation_steps_result_return, §8 scenarios 2, 3 and 6)."""

from __future__ import annotations

import pytest
import torch
from doubles import BATCH_LOSS, DeterministicModel, RecordingLogger, constant_loader

import ray_lit as pl


class EvalDefaults(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.sanity_calls = 0

    def validation_step(self, batch, batch_idx):
        if self.trainer.sanity_checking:
            self.sanity_calls += 1
        loss = self.step(batch)
        result = pl.EvalResult(checkpoint_on=loss)
        result.log("log_and_pbar", torch.tensor(11.0 + batch_idx), prog_bar=True)
        result.log("log_no_pbar", torch.tensor(12.0 + batch_idx))
        result.log("no_log_pbar", torch.tensor(13.0 + batch_idx), logger=False, prog_bar=True)
        result.log("no_log_no_pbar", torch.tensor(14.0 + batch_idx), logger=False,
                   prog_bar=False)
        return result


def test_eval_result_defaults_epoch_means(fit):
    model = EvalDefaults()
    trainer, logger = fit(model, max_epochs=2)
    assert model.sanity_calls == 2  # default num_sanity_val_steps=2, not logged
    assert logger.dicts() == [
        {"log_and_pbar": 12.5, "log_no_pbar": 13.5, "epoch": 0.0},
        {"log_and_pbar": 12.5, "log_no_pbar": 13.5, "epoch": 1.0},
    ]
    assert trainer.progress_bar_metrics == {"log_and_pbar": 12.5, "no_log_pbar": 14.5}
    assert float(trainer.callback_metrics["val_checkpoint_on"]) == BATCH_LOSS
    assert trainer.callback_metrics.get("val_early_stop_on") is None
    assert "no_log_no_pbar" not in trainer.logged_metrics


def test_val_epoch_metrics_are_logged_at_the_step_of_the_last_train_batch(fit):
    # spec §1.8 / §3.2: validation runs inside the epoch's last batch, before that batch's
    # global_step increment, and eval epoch metrics use global_step -> 3 and 7 for 4 batches
    # (2.x logs them at the same step as the last training batch as well).
    _, logger = fit(EvalDefaults(), max_epochs=2)
    assert [s for _, s in logger.calls] == [3, 7]


class EvalStepOnly(DeterministicModel):
    def validation_step(self, batch, batch_idx):
        result = pl.EvalResult()
        result.log("vs", torch.tensor(11.0 + batch_idx), on_step=True, on_epoch=False,
                   prog_bar=True)
        return result


def test_eval_step_metrics_are_per_epoch_curves(fit):
    trainer, logger = fit(EvalStepOnly(), max_epochs=2)
    assert len(logger.calls) == 2 * 4 + 2
    expected = []
    for epoch in range(2):
        expected += [({f"vs/epoch_{epoch}": 11.0 + b}, b) for b in range(4)]
    curves = [(m, s) for m, s in logger.calls if "epoch" not in m]
    assert curves == expected
    # an eval run without epoch metrics still sends a dict holding only the epoch
    assert [m for m in logger.dicts() if "epoch" in m] == [{"epoch": 0.0}, {"epoch": 1.0}]
    assert trainer.progress_bar_metrics == {"vs": 14.0}
    # sanity check batches were not logged: the first curve point is batch 0 of epoch 0
    assert logger.calls[0] == ({"vs/epoch_0": 11.0}, 0)


class EvalStepAndEpoch(DeterministicModel):
    def validation_step(self, batch, batch_idx):
        result = pl.EvalResult()
        result.log("vse", torch.tensor(11.0 + batch_idx), on_step=True, on_epoch=True,
                   prog_bar=True)
        return result


def test_eval_step_and_epoch_metrics(fit):
    trainer, logger = fit(EvalStepAndEpoch(), max_epochs=2)
    assert len(logger.calls) == 2 * 4 + 2
    for epoch in range(2):
        block = logger.calls[epoch * 5:(epoch + 1) * 5]
        assert block[:4] == [({f"step_vse/epoch_{epoch}": 11.0 + b}, b) for b in range(4)]
        assert block[4][0] == {"epoch_vse": 12.5, "epoch": float(epoch)}
    assert trainer.progress_bar_metrics == {"step_vse": 14.0, "epoch_vse": 12.5}


class EvalUnequal(DeterministicModel):
    """Validation over 10 samples in batches of 4, 4, 2."""

    def __init__(self):
        super().__init__(n_val=10, val_batch_size=4)

    def validation_step(self, batch, batch_idx):
        value = torch.tensor([1.0, 2.0, 10.0][batch_idx])
        result = pl.EvalResult(checkpoint_on=value, early_stop_on=value * 2)
        result.log("w", value)
        result.log("wsum", value, reduce_fx=torch.sum)
        return result


def test_eval_epoch_mean_weighted_by_batch_size(fit):
    trainer, logger = fit(EvalUnequal(), num_sanity_val_steps=0)
    (metrics,) = logger.dicts()
    assert metrics["w"] == pytest.approx(3.2)  # (4*1 + 4*2 + 2*10) / 10
    assert metrics["wsum"] == pytest.approx(13.0)
    # callback values: plain mean over batches, whatever the batch sizes
    assert float(trainer.callback_metrics["val_checkpoint_on"]) == pytest.approx(13.0 / 3)
    assert float(trainer.callback_metrics["val_early_stop_on"]) == pytest.approx(26.0 / 3)


class EvalEpochEnd(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.seen = []

    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        result = pl.EvalResult(checkpoint_on=loss)
        result.log("a", torch.tensor(11.0 + batch_idx))
        x, _ = batch
        result.preds = torch.full((x.shape[0], 2), float(batch_idx))
        return result

    def validation_epoch_end(self, outputs):
        assert isinstance(outputs, pl.EvalResult)
        self.seen.append((self.trainer.sanity_checking, tuple(outputs.a.shape),
                          tuple(outputs.preds.shape), tuple(outputs.checkpoint_on.shape),
                          float(outputs.checkpoint_on)))
        outputs.a = outputs.a.mean()
        outputs.log("new", torch.tensor(189.0), prog_bar=True)
        return outputs


def test_validation_epoch_end_gets_gathered_result(fit):
    model = EvalEpochEnd()
    trainer, logger = fit(model, limit_val_batches=3)
    assert model.seen == [
        (True, (2,), (6, 2), (), BATCH_LOSS),  # sanity check: 2 batches
        (False, (3,), (9, 2), (), BATCH_LOSS),  # limit_val_batches=3
    ]
    assert logger.dicts() == [{"a": 12.0, "new": 189.0, "epoch": 0.0}]
    assert trainer.progress_bar_metrics == {"new": 189.0}
    assert float(trainer.callback_metrics["val_checkpoint_on"]) == BATCH_LOSS


class TwoLoaderEpochEnd(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.seen = []

    def val_dataloader(self):
        return [constant_loader(12, 3), constant_loader(6, 3)]

    def validation_step(self, batch, batch_idx, dataloader_idx):
        result = pl.EvalResult(checkpoint_on=torch.tensor(float(dataloader_idx)))
        result.log("dl", torch.tensor(float(dataloader_idx)))
        return result

    def validation_epoch_end(self, outputs):
        self.seen.append([(type(o).__name__, tuple(o.dl.shape)) for o in outputs])
        for o in outputs:
            o.dl = o.dl.mean()
        return outputs[0]


def test_validation_epoch_end_with_two_loaders_gets_a_list(fit):
    model = TwoLoaderEpochEnd()
    fit(model, num_sanity_val_steps=0)
    assert model.seen == [[("EvalResult", (4,)), ("EvalResult", (2,))]]


class TestResults(DeterministicModel):
    def test_step(self, batch, batch_idx):
        loss = self.step(batch)
        result = pl.EvalResult(checkpoint_on=loss, early_stop_on=loss)
        result.log("test_loss", loss)
        result.log("test_acc", torch.tensor(0.25 * (batch_idx + 1)))
        return result


def test_trainer_test_returns_one_dict_without_callback_keys(make_trainer):
    trainer = make_trainer(logger=RecordingLogger())
    results = trainer.test(TestResults())
    assert results == [{"test_loss": BATCH_LOSS, "test_acc": pytest.approx(0.625)}]
    assert all(isinstance(v, float) for v in results[0].values())


def test_trainer_test_step_curves(make_trainer):
    class TestCurves(DeterministicModel):
        def test_step(self, batch, batch_idx):
            result = pl.EvalResult()
            result.log("t", torch.tensor(float(batch_idx)), on_step=True, on_epoch=False)
            return result

    logger = RecordingLogger()
    make_trainer(logger=logger).test(TestCurves())
    assert [(m, s) for m, s in logger.calls if "epoch" not in m] == [
        ({"t/epoch_0": float(b)}, b) for b in range(4)]


def test_validation_step_returning_train_result_is_rejected(make_trainer):
    class Bad(DeterministicModel):
        def validation_step(self, batch, batch_idx):
            return pl.TrainResult(checkpoint_on=self.step(batch))

    with pytest.raises(pl.MisconfigurationException):
        make_trainer().fit(Bad())


def test_validate_returns_eval_result_epoch_values(make_trainer):
    trainer = make_trainer()
    results = trainer.validate(EvalDefaults())
    assert results == [{"log_and_pbar": 12.5, "log_no_pbar": 13.5, "no_log_pbar": 14.5}]
