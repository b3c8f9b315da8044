"""0.9 ``TrainResult``: logging defaults, key naming, epoch reduction and callback values
(spec §1.2-1.8, §6 test_trainer_steps_result_return, §8 scenarios 1 and 3)."""

from __future__ import annotations

import pytest
import torch
from doubles import BATCH_LOSS, DeterministicModel, RecordingLogger

import ray_lit as pl

# --- the Result object itself (no trainer) ------------------------------------------------------


def _loss_with_graph(value: float = 3.0) -> torch.Tensor:
    w = torch.tensor(value, requires_grad=True)
    return w * 1.0


def test_minimize_sets_checkpoint_on_detached():
    loss = _loss_with_graph(5.0)
    result = pl.TrainResult(minimize=loss)
    assert result.minimize is loss  # stored undetached: it is backpropagated
    assert result.minimize.grad_fn is not None
    assert result.checkpoint_on.grad_fn is None
    assert float(result.checkpoint_on) == 5.0
    assert result.early_stop_on is None  # missing attributes read as None


def test_minimize_positional_and_checkpoint_false():
    result = pl.TrainResult(_loss_with_graph(), checkpoint_on=False)
    assert "checkpoint_on" not in result
    assert "minimize" in result


def test_minimize_without_graph_is_rejected():
    with pytest.raises(AssertionError):
        pl.TrainResult(minimize=torch.tensor(1.0))


def test_zero_checkpoint_on_is_kept_decision():
    # DECISION (spec §1.2): any tensor counts, a zero one included
    result = pl.TrainResult(minimize=_loss_with_graph(), checkpoint_on=torch.tensor(0.0))
    assert float(result.checkpoint_on) == 0.0
    vector = pl.EvalResult(checkpoint_on=torch.tensor([1.0, 2.0]))
    assert vector.checkpoint_on.shape == (2,)


def test_eval_result_has_no_default_checkpoint_on():
    result = pl.EvalResult()
    assert "checkpoint_on" not in result
    assert result.checkpoint_on is None


def test_attribute_tensors_are_detached_except_minimize():
    loss = _loss_with_graph()
    result = pl.TrainResult(minimize=loss)
    result.extra = loss * 2
    assert result["extra"].grad_fn is None
    assert float(result.extra) == 6.0


def test_log_both_splits_into_prefixed_keys_and_plain_name_reads_step_value():
    result = pl.TrainResult(minimize=_loss_with_graph())
    result.log("acc", torch.tensor(0.5), on_step=True, on_epoch=True)
    assert "step_acc" in result and "epoch_acc" in result
    assert "acc" not in result
    assert float(result["acc"]) == 0.5  # falls back to step_acc
    assert result.meta["step_acc"]["on_step"] is True
    assert result.meta["step_acc"]["on_epoch"] is False
    assert result.meta["epoch_acc"]["on_step"] is False
    assert result.meta["epoch_acc"]["on_epoch"] is True


def test_log_defaults_per_class():
    train = pl.TrainResult(minimize=_loss_with_graph())
    train.log("a", 1.0)
    train.log_dict({"b": 2.0, "c": 3.0})
    assert (train.meta["a"]["on_step"], train.meta["a"]["on_epoch"]) == (True, False)
    # TRAP copied from 0.9: TrainResult.log_dict is epoch-level
    assert (train.meta["b"]["on_step"], train.meta["b"]["on_epoch"]) == (False, True)
    assert (train.meta["c"]["on_step"], train.meta["c"]["on_epoch"]) == (False, True)
    ev = pl.EvalResult()
    ev.log("a", 1.0)
    ev.log_dict({"b": 2.0})
    assert (ev.meta["a"]["on_step"], ev.meta["a"]["on_epoch"]) == (False, True)
    assert (ev.meta["b"]["on_step"], ev.meta["b"]["on_epoch"]) == (False, True)


def test_log_detaches_unless_enable_graph():
    loss = _loss_with_graph()
    result = pl.TrainResult(minimize=loss)
    result.log("d", loss)
    result.log("g", loss, enable_graph=True)
    assert result["d"].grad_fn is None
    assert result["g"].grad_fn is not None


def test_rename_keys_moves_item_and_meta():
    result = pl.TrainResult(minimize=_loss_with_graph())
    result.log_dict({"x1": 1.0, "x2": 2.0})
    result.rename_keys({"x1": "y1", "x2": "y2"})
    assert "x1" not in result and "x2" not in result
    assert result["y1"] == 1.0 and result["y2"] == 2.0
    assert "y1" in result.meta and "x1" not in result.meta


def test_sync_dist_in_process_is_noop_and_leaves_caller_tensor():
    value = torch.tensor(3.0)
    result = pl.TrainResult(minimize=_loss_with_graph())
    result.log("s", value, sync_dist=True, sync_dist_op="sum")
    assert float(value) == 3.0
    assert float(result["s"]) == 3.0
    ev = pl.EvalResult()
    ev.log("s", value, sync_dist=True)
    assert float(ev["s"]) == 3.0 and float(value) == 3.0


def test_repr_hides_meta():
    result = pl.EvalResult()
    result.log("a", 1.0)
    assert "meta" not in repr(result)
    assert "meta" not in str(result)


# --- TrainResult in the loop ---------------------------------------------------------------------


# Not the shared ``fit`` fixture: this one also pins that ``fit`` returns 1 (the 0.9 contract).
def _fit(make_trainer, model, **options):
    logger = RecordingLogger()
    options.setdefault("log_every_n_steps", 1)
    trainer = make_trainer(logger=logger, **options)
    assert trainer.fit(model) == 1
    return trainer, logger


class StepOnly(DeterministicModel):
    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        assert float(loss.detach()) == BATCH_LOSS
        result = pl.TrainResult(minimize=loss)
        result.log("step_log_and_pbar", torch.tensor(10.0 + batch_idx), prog_bar=True)
        result.log("step_log_no_pbar", torch.tensor(20.0 + batch_idx))
        result.log("step_pbar_no_log", torch.tensor(30.0 + batch_idx), logger=False,
                   prog_bar=True)
        return result


def test_step_only_logging(make_trainer):
    trainer, logger = _fit(make_trainer, StepOnly(), max_epochs=2)
    expected = []
    for epoch in range(2):
        for b in range(4):
            expected.append(({"step_log_and_pbar": 10.0 + b, "step_log_no_pbar": 20.0 + b,
                              "epoch": float(epoch)}, epoch * 4 + b))
    assert logger.calls == expected
    assert trainer.progress_bar_metrics == {"step_log_and_pbar": 13.0, "step_pbar_no_log": 33.0}
    assert float(trainer.callback_metrics["checkpoint_on"]) == BATCH_LOSS
    assert trainer.global_step == 8


class EpochOnly(DeterministicModel):
    def training_step(self, batch, batch_idx):
        result = pl.TrainResult(minimize=self.step(batch))
        result.log("epoch_log_and_pbar", torch.tensor(10.0 + batch_idx), on_step=False,
                   on_epoch=True, prog_bar=True)
        result.log("epoch_log_no_pbar", torch.tensor(20.0 + batch_idx), on_step=False,
                   on_epoch=True)
        result.log("epoch_pbar_no_log", torch.tensor(30.0 + batch_idx), on_step=False,
                   on_epoch=True, logger=False, prog_bar=True)
        return result


def test_epoch_only_logging(make_trainer):
    trainer, logger = _fit(make_trainer, EpochOnly(), max_epochs=2)
    # one dict per epoch: batch means (10..13 -> 11.5), step = global_step at epoch end
    assert logger.calls == [
        ({"epoch_log_and_pbar": 11.5, "epoch_log_no_pbar": 21.5, "epoch": 0.0}, 4),
        ({"epoch_log_and_pbar": 11.5, "epoch_log_no_pbar": 21.5, "epoch": 1.0}, 8),
    ]
    assert trainer.progress_bar_metrics == {"epoch_log_and_pbar": 11.5, "epoch_pbar_no_log": 31.5}
    assert float(trainer.callback_metrics["checkpoint_on"]) == BATCH_LOSS


class StepAndEpoch(DeterministicModel):
    def training_step(self, batch, batch_idx):
        result = pl.TrainResult(minimize=self.step(batch))
        result.log("both", torch.tensor(10.0 + batch_idx), on_step=True, on_epoch=True,
                   prog_bar=True)
        return result


def test_step_and_epoch_logging(make_trainer):
    trainer, logger = _fit(make_trainer, StepAndEpoch(), max_epochs=2)
    assert len(logger.calls) == 2 * 4 + 2
    step_calls = logger.with_key("step_both")
    epoch_calls = logger.with_key("epoch_both")
    assert [m["step_both"] for m, _ in step_calls] == [10.0, 11.0, 12.0, 13.0] * 2
    assert [s for _, s in step_calls] == list(range(8))
    assert all(set(m) == {"step_both", "epoch"} for m, _ in step_calls)
    assert [m for m, _ in epoch_calls] == [{"epoch_both": 11.5, "epoch": 0.0},
                                           {"epoch_both": 11.5, "epoch": 1.0}]
    assert trainer.progress_bar_metrics == {"step_both": 13.0, "epoch_both": 11.5}
    # the order of the dicts: 4 step dicts, then the epoch dict, per epoch
    assert [("epoch_both" in m) for m in logger.dicts()] == ([False] * 4 + [True]) * 2


class LogDictDefaults(DeterministicModel):
    def training_step(self, batch, batch_idx):
        result = pl.TrainResult(minimize=self.step(batch))
        result.log_dict({"d1": torch.tensor(1.0 + batch_idx), "d2": torch.tensor(2.0)})
        return result


def test_log_dict_defaults_are_epoch_level(make_trainer):
    trainer, logger = _fit(make_trainer, LogDictDefaults(), max_epochs=1)
    assert logger.calls == [({"d1": 2.5, "d2": 2.0, "epoch": 0.0}, 4)]
    assert trainer.progress_bar_metrics == {}


class UnequalBatches(DeterministicModel):
    """10 samples, batch 4 -> batches of 4, 4, 2 rows (losses 228, 228, 114)."""

    def __init__(self):
        super().__init__(n_train=10, batch_size=4)

    def training_step(self, batch, batch_idx):
        result = pl.TrainResult(minimize=self.step(batch))
        value = torch.tensor([1.0, 2.0, 10.0][batch_idx])
        result.log("w", value, on_step=False, on_epoch=True)
        result.log("s", value, on_step=False, on_epoch=True, reduce_fx=torch.sum)
        result.log("m", value, on_step=False, on_epoch=True, reduce_fx=torch.max)
        result.log("c", value, on_step=False, on_epoch=True, reduce_fx=lambda v: v.max() * 2)
        return result


def test_epoch_mean_is_weighted_by_true_batch_size(make_trainer):
    trainer, logger = _fit(make_trainer, UnequalBatches())
    (metrics, _), = logger.calls
    # DECISION (spec §1.4): weights are the real batch sizes 4, 4, 2 (not len((x, y)) == 2)
    assert metrics["w"] == pytest.approx((4 * 1 + 4 * 2 + 2 * 10) / 10)
    assert metrics["s"] == pytest.approx(13.0)
    assert metrics["m"] == pytest.approx(10.0)
    assert metrics["c"] == pytest.approx(20.0)  # any callable gets the stacked values
    # callback values are plain (unweighted) means of the per-batch values
    assert float(trainer.callback_metrics["checkpoint_on"]) == pytest.approx(
        (228 + 228 + 114) / 3)


class EpochEndResult(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.seen = []

    def training_step(self, batch, batch_idx):
        result = pl.TrainResult(minimize=self.step(batch))
        result.log("a", torch.tensor(1.0 + batch_idx))  # 1..4, step-only
        result.log("c", torch.tensor(5.0 + batch_idx), on_step=True, on_epoch=True,
                   prog_bar=True)  # 5..8
        return result

    def training_epoch_end(self, outputs):
        assert isinstance(outputs, pl.TrainResult)
        self.seen.append({k: tuple(outputs[k].shape) for k in ("a", "step_c", "epoch_c",
                                                               "checkpoint_on")})
        assert all(v.grad_fn is None for k, v in outputs.items()
                   if isinstance(v, torch.Tensor))
        assert torch.equal(outputs["checkpoint_on"], torch.full((4, 1), BATCH_LOSS))
        outputs.epoch_c = outputs.epoch_c.prod()  # 5*6*7*8
        outputs.log("prod_a", outputs["a"].prod(), on_epoch=True)  # TrainResult: also step_
        return outputs


def test_training_epoch_end_with_result(make_trainer):
    model = EpochEndResult()
    trainer, logger = _fit(make_trainer, model, max_epochs=2)
    assert model.seen == [{"a": (4, 1), "step_c": (4, 1), "epoch_c": (4, 1),
                           "checkpoint_on": (4, 1)}] * 2
    epoch_dicts = [(m, s) for m, s in logger.calls if "epoch_c" in m]
    assert epoch_dicts == [({"epoch_c": 1680.0, "epoch_prod_a": 24.0, "epoch": 0.0}, 4),
                           ({"epoch_c": 1680.0, "epoch_prod_a": 24.0, "epoch": 1.0}, 8)]
    step_dicts = [m for m, _ in logger.calls if "epoch_c" not in m]
    assert step_dicts[:4] == [{"a": 1.0 + b, "step_c": 5.0 + b, "epoch": 0.0} for b in range(4)]
    assert len(logger.calls) == 10
    assert trainer.progress_bar_metrics == {"step_c": 8.0, "epoch_c": 1680.0}
    assert float(trainer.callback_metrics["checkpoint_on"]) == BATCH_LOSS
    # 0.9.0 counted one extra step per epoch with training_epoch_end (bug); ray_lit does not
    assert trainer.global_step == 8


class KeepsOutputs(DeterministicModel):
    def training_step(self, batch, batch_idx):
        return pl.TrainResult(minimize=self.step(batch), early_stop_on=torch.tensor(
            float(batch_idx)))


def test_early_stop_on_is_epoch_plain_mean(make_trainer):
    trainer, _ = _fit(make_trainer, KeepsOutputs())
    assert float(trainer.callback_metrics["early_stop_on"]) == pytest.approx(1.5)
    assert float(trainer.callback_metrics["checkpoint_on"]) == BATCH_LOSS


def test_training_step_returning_eval_result_is_rejected(make_trainer):
    class Bad(DeterministicModel):
        def training_step(self, batch, batch_idx):
            return pl.EvalResult(checkpoint_on=self.step(batch))

    with pytest.raises(pl.MisconfigurationException):
        make_trainer().fit(Bad())
