"""The 0.9 dict / tensor return API (spec §1.5, §1.9, §6 test_trainer_steps_dict_return,
test_trainer_steps_scalar_return, test_eval_loop_dict_return, §8 scenario 5)."""

from __future__ import annotations

import pytest
import torch
from doubles import BATCH_LOSS, DeterministicModel, floats

# --- training ------------------------------------------------------------------------------------


class DictTraining(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.epoch_end_outputs = None

    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        return {
            "loss": loss,
            "log": {"log_acc1": torch.tensor(12.0 + batch_idx), "log_acc2": 7.0},
            "progress_bar": {"pbar_acc1": torch.tensor(17.0 + batch_idx), "pbar_acc2": 19.0},
            "train_step_test": loss + 181,
        }

    def training_epoch_end(self, outputs):
        self.epoch_end_outputs = outputs
        return {
            "log": {"epoch_end_log": torch.tensor(178.0)},
            "progress_bar": {"epoch_end_pbar": torch.tensor(234.0)},
            "epoch_end_other": torch.tensor(1.0),
        }


def test_training_step_dict_routing(fit):
    model = DictTraining()
    trainer, logger = fit(model)
    assert logger.calls == [
        *[({"log_acc1": 12.0 + b, "log_acc2": 7.0, "epoch": 0.0}, b) for b in range(4)],
        ({"epoch_end_log": 178.0, "epoch": 0.0}, 4),
    ]
    assert trainer.progress_bar_metrics == {"pbar_acc1": 20.0, "pbar_acc2": 19.0,
                                            "epoch_end_pbar": 234.0}
    assert floats(trainer.callback_metrics) == {
        "loss": BATCH_LOSS, "train_step_test": BATCH_LOSS + 181, "log_acc1": 15.0,
        "log_acc2": 7.0, "pbar_acc1": 20.0, "pbar_acc2": 19.0, "epoch_end_log": 178.0,
        "epoch_end_pbar": 234.0, "epoch_end_other": 1.0,
    }
    outputs = model.epoch_end_outputs
    assert isinstance(outputs, list) and len(outputs) == 4
    for out in outputs:
        assert set(out) == {"loss", "log", "progress_bar", "train_step_test"}
        assert out["loss"].grad_fn is None  # kept outputs are detached
        assert float(out["loss"]) == BATCH_LOSS


class DictWithStepEnd(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.step_end_had_graph = []
        self.backward_losses = []

    def training_step(self, batch, batch_idx):
        return {"loss": self.step(batch), "progress_bar": {"pb": 1.0}}

    def training_step_end(self, output):
        self.step_end_had_graph.append(output["loss"].grad_fn is not None)
        return {"loss": output["loss"] + 2, "log": {"from_step_end": output["progress_bar"]["pb"]
                                                    + 2}}

    def on_before_backward(self, loss):
        self.backward_losses.append(float(loss.detach()))


def test_training_step_end_replaces_output(fit):
    model = DictWithStepEnd()
    trainer, logger = fit(model)
    assert model.step_end_had_graph == [True] * 4
    assert model.backward_losses == [BATCH_LOSS + 2] * 4
    assert logger.dicts() == [{"from_step_end": 3.0, "epoch": 0.0}] * 4
    assert trainer.progress_bar_metrics == {}  # the step's progress_bar was replaced
    assert float(trainer.callback_metrics["loss"]) == BATCH_LOSS + 2


class ScalarTraining(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.epoch_end_outputs = None

    def training_epoch_end(self, outputs):
        self.epoch_end_outputs = outputs


def test_training_step_tensor_return(fit):
    model = ScalarTraining()
    trainer, logger = fit(model)
    assert logger.calls == []
    assert trainer.callback_metrics == {}
    assert trainer.progress_bar_metrics == {}
    outs = model.epoch_end_outputs
    assert len(outs) == 4
    assert all(isinstance(o, torch.Tensor) and o.grad_fn is None and float(o) == BATCH_LOSS
               for o in outs)


# --- evaluation ----------------------------------------------------------------------------------


class EvalDictNoEpochEnd(DeterministicModel):
    def training_step(self, batch, batch_idx):
        return {"loss": self.step(batch), "train_key": torch.tensor(5.0)}

    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        return {"val_loss": loss + batch_idx, "log": {"vl": torch.tensor(float(batch_idx))},
                "progress_bar": {"vp": torch.tensor(10.0 + batch_idx)},
                "extra": torch.tensor(2.0)}


def test_eval_dicts_reported_per_step_without_epoch_end(fit):
    trainer, logger = fit(EvalDictNoEpochEnd(), num_sanity_val_steps=2)
    # each step's log dict is logged as it comes (sanity check excluded)
    val_logs = [m for m in logger.dicts() if "vl" in m]
    assert val_logs == [{"vl": float(b), "epoch": 0.0} for b in range(4)]
    # last batch wins (TRAP copied from 0.9)
    assert float(trainer.callback_metrics["val_loss"]) == BATCH_LOSS + 3
    assert float(trainer.callback_metrics["vl"]) == 3.0
    assert float(trainer.callback_metrics["vp"]) == 13.0
    # dict eval outputs update the callback metrics, they do not replace them
    assert float(trainer.callback_metrics["train_key"]) == 5.0
    assert trainer.progress_bar_metrics == {"vp": 13.0}


def test_validate_with_dicts_returns_one_dict_per_loader(make_trainer):
    results = make_trainer().validate(EvalDictNoEpochEnd())
    assert results == [{"val_loss": BATCH_LOSS + 3, "vl": 3.0, "vp": 13.0, "extra": 2.0}]


class EvalTensor(DeterministicModel):
    def validation_step(self, batch, batch_idx):
        return self.step(batch) + batch_idx


def test_eval_tensor_return_becomes_val_loss(make_trainer, fit):
    trainer, logger = fit(EvalTensor())
    assert float(trainer.callback_metrics["val_loss"]) == BATCH_LOSS + 3
    assert logger.calls == []  # nothing to log
    assert make_trainer().validate(EvalTensor()) == [{"val_loss": BATCH_LOSS + 3}]


class EvalNoReturn(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.epoch_end_inputs = []

    def validation_step(self, batch, batch_idx):
        self.step(batch)

    def validation_epoch_end(self, outputs):
        self.epoch_end_inputs.append(list(outputs))


def test_eval_step_returning_nothing_collects_nothing(fit):
    model = EvalNoReturn()
    trainer, logger = fit(model, num_sanity_val_steps=0)
    assert model.epoch_end_inputs == [[]]
    assert logger.calls == []


class EvalStepEndNone(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.epoch_end_inputs = []

    def validation_step(self, batch, batch_idx):
        return {"val_loss": self.step(batch)}

    def validation_step_end(self, output):
        return None

    def validation_epoch_end(self, outputs):
        self.epoch_end_inputs.append(list(outputs))


def test_validation_step_end_returning_none_drops_output(fit):
    model = EvalStepEndNone()
    fit(model, num_sanity_val_steps=0)
    assert model.epoch_end_inputs == [[]]


class EvalStepEndAddsKey(DeterministicModel):
    def validation_step(self, batch, batch_idx):
        return {"val_loss": self.step(batch)}

    def validation_step_end(self, output):
        output["step_end_key"] = torch.tensor(1802.0)
        return output


def test_validation_step_end_output_is_reported(make_trainer):
    results = make_trainer().validate(EvalStepEndAddsKey())
    assert results == [{"val_loss": BATCH_LOSS, "step_end_key": 1802.0}]


class EvalDictEpochEnd(DeterministicModel):
    def __init__(self):
        super().__init__()
        self.seen = []

    def training_step(self, batch, batch_idx):
        return {"loss": self.step(batch), "train_key": torch.tensor(5.0)}

    def validation_step(self, batch, batch_idx):
        return {"val_loss": self.step(batch) + batch_idx}

    def validation_epoch_end(self, outputs):
        self.seen.append((len(outputs), all(o["val_loss"].grad_fn is None for o in outputs)))
        mean = torch.stack([o["val_loss"] for o in outputs]).mean()
        return {"val_loss": mean, "log": {"val_acc": torch.tensor(0.5)},
                "progress_bar": {"val_pbar": torch.tensor(1233.0)},
                "nested": {"inner": torch.tensor(7.0)}}


def test_validation_epoch_end_dict_is_single_result(make_trainer, fit):
    model = EvalDictEpochEnd()
    trainer, logger = fit(model, num_sanity_val_steps=0)
    assert model.seen == [(4, True)]
    assert [m for m in logger.dicts() if "val_acc" in m] == [{"val_acc": 0.5, "epoch": 0.0}]
    cb = floats(trainer.callback_metrics)
    assert cb["val_loss"] == pytest.approx(BATCH_LOSS + 1.5)
    assert cb["val_acc"] == 0.5 and cb["val_pbar"] == 1233.0
    assert cb["inner"] == 7.0 and "nested" not in cb  # flattened, parent name dropped
    assert cb["train_key"] == 5.0  # update, not replace
    assert trainer.progress_bar_metrics == {"val_pbar": 1233.0}
    results = make_trainer().validate(EvalDictEpochEnd())
    assert results == [{"val_loss": pytest.approx(BATCH_LOSS + 1.5), "val_acc": 0.5,
                        "val_pbar": 1233.0, "inner": 7.0}]
