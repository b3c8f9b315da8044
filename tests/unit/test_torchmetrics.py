"""``self.log`` / ``self.log_dict`` of torchmetrics objects, in process (issue 14).

As in Lightning 2.x: the step value is the metric's forward value of the batch, the epoch value
is ``compute()`` over the whole epoch (not a mean of batch values), and the metric is reset
after each epoch. Predictions here depend on the epoch, so an epoch value that kept the states
of the previous epoch (no reset) would differ from the epoch's own accuracy.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from doubles import RecordingLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection  # the dev extra installs torchmetrics
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
)

import ray_lit as pl
from ray_lit import MisconfigurationException

N_TRAIN, N_VAL, BATCH = 10, 7, 4  # uneven last batches: 4, 4, 2 and 4, 3


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (torch.rand(n, generator=g) > 0.4).long()
    return x, y


def _preds(x: torch.Tensor, epoch: int) -> torch.Tensor:
    """What the models below predict: the threshold moves with the epoch."""
    return (x[:, 0] > 0.5 - 0.6 * epoch).long()


def _loader(n: int, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(*_data(n, seed)), batch_size=BATCH)


def _acc(x: torch.Tensor, y: torch.Tensor, epoch: int) -> float:
    return float((_preds(x, epoch) == y).float().mean())


class MetricModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.train_acc = BinaryAccuracy()
        self.val_acc = BinaryAccuracy()

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).pow(2).mean()

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_acc(_preds(x, self.current_epoch), y)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True, prog_bar=True)
        return self._loss(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc.update(_preds(x, self.current_epoch), y)  # update only: no step value
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


# Not the shared ``fit`` fixture: it fits on this file's own train/val loaders.
def _fit(make_trainer, model, **options):
    logger = RecordingLogger()
    trainer = make_trainer(logger=logger, log_every_n_steps=1, **options)
    trainer.fit(model, _loader(N_TRAIN, 0), _loader(N_VAL, 1))
    return trainer, logger


def test_step_values_are_the_batch_forward_values(make_trainer):
    _, logger = _fit(make_trainer, MetricModel(), max_epochs=2, num_sanity_val_steps=0)
    x, y = _data(N_TRAIN, 0)
    expected = []
    for epoch in range(2):
        for start in range(0, N_TRAIN, BATCH):
            expected.append(_acc(x[start:start + BATCH], y[start:start + BATCH], epoch))
    got = [m["train_acc_step"] for m, _ in logger.with_key("train_acc_step")]
    assert got == pytest.approx(expected)
    assert [s for _, s in logger.with_key("train_acc_step")] == list(range(6))


def test_epoch_value_is_compute_over_the_epoch_and_resets(make_trainer):
    trainer, logger = _fit(make_trainer, MetricModel(), max_epochs=2, num_sanity_val_steps=0)
    x, y = _data(N_TRAIN, 0)
    per_epoch = [_acc(x, y, 0), _acc(x, y, 1)]
    assert per_epoch[0] != pytest.approx(per_epoch[1])  # the reset is visible
    # compute() over all 10 samples, not the mean of the three batch accuracies
    batch_mean = sum(_acc(x[s:s + BATCH], y[s:s + BATCH], 0) for s in (0, 4, 8)) / 3
    assert per_epoch[0] != pytest.approx(batch_mean)
    got = [m["train_acc_epoch"] for m, _ in logger.with_key("train_acc_epoch")]
    assert got == pytest.approx(per_epoch)
    assert float(trainer.callback_metrics["train_acc"]) == pytest.approx(per_epoch[1])
    assert trainer.progress_bar_metrics["train_acc_epoch"] == pytest.approx(per_epoch[1])
    # reset after the epoch value was taken: nothing is left in the metric's state
    assert not trainer.lightning_module.train_acc.update_called


def test_validation_epoch_value_sanity_check_and_reset(make_trainer):
    trainer, logger = _fit(make_trainer, MetricModel(), max_epochs=2, num_sanity_val_steps=1)
    x, y = _data(N_VAL, 1)
    expected = [_acc(x, y, 0), _acc(x, y, 1)]
    assert expected[0] != pytest.approx(expected[1])
    # the sanity check's batch was reset (not counted into epoch 0), update() gives no step key
    got = [m["val_acc"] for m, _ in logger.with_key("val_acc")]
    assert got == pytest.approx(expected)
    assert not any("val_acc_step" in m for m in logger.dicts())
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(expected[1])
    results = trainer.validate(trainer.lightning_module, _loader(N_VAL, 1))
    assert results[0]["val_acc"] == pytest.approx(_acc(x, y, 2))


class CollectionModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        metrics = MetricCollection([BinaryAccuracy(), BinaryPrecision(), BinaryRecall()])
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_metrics(_preds(x, self.current_epoch), y)
        self.log_dict(self.train_metrics, on_step=True, on_epoch=True)
        return self.layer(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_metrics.update(_preds(x, self.current_epoch), y)
        self.log_dict(self.val_metrics)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _reference(x: torch.Tensor, y: torch.Tensor, epoch: int, prefix: str) -> dict[str, float]:
    ref = MetricCollection([BinaryAccuracy(), BinaryPrecision(), BinaryRecall()], prefix=prefix)
    return {k: float(v) for k, v in ref(_preds(x, epoch), y).items()}


def test_log_dict_of_a_metric_collection_logs_each_member(make_trainer):
    trainer, logger = _fit(make_trainer, CollectionModel(), max_epochs=2,
                           num_sanity_val_steps=0)
    xt, yt = _data(N_TRAIN, 0)
    xv, yv = _data(N_VAL, 1)
    names = ("BinaryAccuracy", "BinaryPrecision", "BinaryRecall")
    for epoch in range(2):
        train = _reference(xt, yt, epoch, "train_")
        epoch_logs = [m for m, _ in logger.with_key("train_BinaryAccuracy_epoch")]
        assert {f"train_{n}_epoch": epoch_logs[epoch][f"train_{n}_epoch"] for n in names} == \
            pytest.approx({f"{k}_epoch": v for k, v in train.items()})
        val_logs = [m for m, _ in logger.with_key("val_BinaryAccuracy")]
        val = _reference(xv, yv, epoch, "val_")
        assert {k: val_logs[epoch][k] for k in val} == pytest.approx(val)
    first_batch = _reference(xt[:BATCH], yt[:BATCH], 0, "train_")
    step0 = logger.with_key("train_BinaryRecall_step")[0][0]
    assert {k: step0[f"{k}_step"] for k in first_batch} == pytest.approx(first_batch)
    assert float(trainer.callback_metrics["val_BinaryRecall"]) == pytest.approx(
        _reference(xv, yv, 1, "val_")["val_BinaryRecall"])


class EpochHookModel(MetricModel):
    """Updates in the steps, logs from the epoch-end hooks (a common 2.x idiom), plus a Metric
    logged on_step only, which is reset at each epoch end too."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_acc(_preds(x, self.current_epoch), y)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=False)
        return self._loss(x)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.val_acc.update(_preds(x, self.current_epoch), y)
        if dataloader_idx == 1:  # one Metric object logged under each loader's name
            self.log("both", self.val_acc)

    def on_validation_epoch_end(self):
        self.log("val_acc", self.val_acc)
        self.log("tensor_at_end", torch.tensor(3.0))


def test_metric_logged_from_epoch_end_hooks_and_on_step_only(make_trainer):
    logger = RecordingLogger()
    trainer = make_trainer(logger=logger, log_every_n_steps=1, max_epochs=2,
                           num_sanity_val_steps=0)
    model = EpochHookModel()
    trainer.fit(model, _loader(N_TRAIN, 0), [_loader(N_VAL, 1), _loader(N_VAL, 2)])
    xs, ys = zip(_data(N_VAL, 1), _data(N_VAL, 2))
    x, y = torch.cat(xs), torch.cat(ys)
    # both loaders fed the one Metric: its value over both, at each epoch (reset in between)
    got = [m["val_acc"] for m, _ in logger.with_key("val_acc")]
    assert got == pytest.approx([_acc(x, y, 0), _acc(x, y, 1)])
    got = [m["both/dataloader_idx_1"] for m, _ in logger.with_key("both/dataloader_idx_1")]
    assert got == pytest.approx([_acc(x, y, 0), _acc(x, y, 1)])
    # the epoch-end hook runs once for all loaders: plain names, tensors too (as in Lightning)
    assert [m["tensor_at_end"] for m, _ in logger.with_key("tensor_at_end")] == [3.0, 3.0]
    assert not any("/dataloader_idx_" in k for k in trainer.callback_metrics
                   if k.startswith(("val_acc", "tensor_at_end")))
    # logged on_step only: no epoch value, and reset at the epoch end all the same
    assert not any("train_acc_epoch" in m for m in logger.dicts())
    assert len(logger.with_key("train_acc")) == 6
    assert not model.train_acc.update_called


class BadLog(pl.LightningModule):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.what = what
        self.collection = MetricCollection([BinaryAccuracy()])
        self.per_class = MulticlassAccuracy(num_classes=2, average=None)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.what == "collection":
            self.log("metrics", self.collection)
        else:
            self.per_class(_preds(x, 0), y)
            self.log("per_class", self.per_class)
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize(("what", "message"), [
    ("collection", r"MetricCollection; log it with self\.log_dict\(collection\)"),
    ("per_class", r"'per_class'.*\(2,\), not a scalar"),
])
def test_unloggable_metric_objects_fail_with_a_clear_message(make_trainer, what, message):
    trainer = make_trainer()
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(BadLog(what), _loader(N_TRAIN, 0))


def test_torchmetrics_is_never_imported_by_ray_lit():
    """torchmetrics is optional: a fit that logs tensors must not import it."""
    script = textwrap.dedent("""
        import sys, torch
        from torch.utils.data import DataLoader, TensorDataset
        import ray_lit as pl

        class M(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(2, 1)
            def training_step(self, batch, batch_idx):
                loss = self.layer(batch[0]).pow(2).mean()
                self.log("loss", loss, on_epoch=True)
                self.log_dict({"a": loss})
                return loss
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
        pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False).fit(M(), data)
        assert "torchmetrics" not in sys.modules, "ray_lit imported torchmetrics"
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("result_class", [pl.TrainResult, pl.EvalResult])
def test_a_0_9_result_refuses_metric_objects_naming_self_log(result_class):
    result = result_class()
    with pytest.raises(MisconfigurationException, match=r"got a torchmetrics BinaryAccuracy.*"
                                                        r"self\.log\(name, metric\)"):
        result.log("acc", BinaryAccuracy())
    with pytest.raises(MisconfigurationException, match="MetricCollection"):
        result.log_dict({"all": MetricCollection([BinaryAccuracy()])})
    result.log("acc", BinaryAccuracy()(torch.tensor([1, 0]), torch.tensor([1, 1])))
    assert float(result["acc"]) == 0.5  # the tensor a forward call returns is fine
