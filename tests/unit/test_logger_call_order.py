"""What a logger receives at each step, in process (docs/lightning_semantics_decisions.md,
DECISION 0.9-2): the same ``log_metrics`` calls as Lightning 0.9.0, in number, step, merged dict
and key order.

Where the expected sequences come from (pytorch-lightning 0.9.0, read from its wheel, and the
same modules run under real 0.9.0 with Python 3.11 / numpy 2 import shims, which gave exactly
these sequences once its extra ``global_step += 1`` was removed, see below):
* ``trainer/training_loop.py`` ``run_training_epoch`` (lines 478-541): for each batch,
  ``run_evaluation`` (validation, when due) runs BEFORE ``save_train_loop_metrics_to_loggers``
  sends the batch's metrics, and both use the ``global_step`` of before the batch's increment;
  after the loop ``run_training_epoch_end`` (lines 616-690) sends the epoch-end dict once.
  Its ``self.global_step += 1`` when ``training_epoch_end`` is overridden (line 653) is the 0.9.0
  bug the spec says not to copy (spec §1.6 TRAP, fixed in 0.10), so epoch-end metrics use the
  step the next epoch's first batch uses.
* ``trainer/logging.py`` ``log_metrics`` (lines 59-95): ``'epoch'`` appended last to each dict,
  then ``logger.agg_and_log_metrics(metrics, step)`` and ``logger.save()``.
* ``loggers/base.py``: ``agg_and_log_metrics`` / ``_aggregate_metrics`` (lines 83-135) hold a
  dict until the step changes; the base ``save`` (line 248) calls ``_finalize_agg_metrics``,
  which sends what is held. So a logger with the base ``save`` gets every call at once; one whose
  ``save`` does not call super gets one merged call per step when the step changes
  (``merge_dicts``, line 389: the mean of each key over the dicts that have it).
Where ray_lit differs on purpose: ``merge_dicts`` iterates a ``set`` of keys, so 0.9's merged key
order changed from run to run with string hashing; ray_lit keeps the first-seen order (one of
0.9's possible orders). 0.9 never sent the last step of a merging logger whose ``finalize`` does
not call super; ray_lit sends it at the end of the stage.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
import ray_lit.compat
from ray_lit.loggers import LightningLoggerBase

EPOCHS, BATCHES = 2, 4


RECORDERS = textwrap.dedent('''
    from pytorch_lightning.loggers import LightningLoggerBase
    from pytorch_lightning.utilities import rank_zero_only


    class Recorder(LightningLoggerBase):
        """A 0.9 user's logger: the base ``save`` (it flushes); records every call."""

        def __init__(self):
            super().__init__()
            self.calls = []
            self.saves = 0

        @property
        def experiment(self):
            return None

        @property
        def name(self):
            return "rec"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params):
            pass

        def log_metrics(self, metrics, step=None):
            self.calls.append((list(metrics), step, {k: float(v) for k, v in metrics.items()}))

        def sequence(self):
            return [(keys, step) for keys, step, _ in self.calls]


    class MergingRecorder(Recorder):
        """A 0.9 user's logger whose ``save`` (and ``finalize``) do not call super."""

        @rank_zero_only
        def save(self):
            self.saves += 1

        def finalize(self, status):
            pass
''')


def load_recorders(tmp_path, name: str = "recorders_09"):
    """The recorders as a 0.9 user's file (``pytorch_lightning`` resolved to ray_lit)."""
    (tmp_path / f"{name}.py").write_text(RECORDERS)
    sys.path.insert(0, str(tmp_path))
    try:
        with ray_lit.compat.lightning_on_ray():
            return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


@pytest.fixture
def rec09(tmp_path):
    return load_recorders(tmp_path)


def _loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)),
                      batch_size=2)


class _Base(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def forward(self, x):
        return self.layer(x)

    def _loss(self, batch):
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ResultModule(_Base):
    """0.9 structured results: several metrics per step, an epoch-end result, an EvalResult."""

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        result = pl.TrainResult(minimize=loss)
        result.log("b_loss", loss)
        result.log("a_abs", loss.abs() + 1)
        result.log("both", loss, on_step=True, on_epoch=True)
        return result

    def training_epoch_end(self, outputs):
        result = pl.TrainResult()
        result.log("tee_metric", torch.tensor(5.0), on_epoch=True)
        result.log("a_tee", torch.tensor(2.0), on_epoch=True)
        return result

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        result = pl.EvalResult(checkpoint_on=loss)
        result.log("val_loss", loss)
        result.log("val_b", loss + 1)
        return result


# keys per call (``'epoch'`` last: trainer/logging.py line 85); a TrainResult's on_step+on_epoch
# key is ``step_both`` at the step, and training_epoch_end's logs are ``epoch_*`` (spec §1.6)
RESULT_KEYS = {"train": ["b_loss", "a_abs", "step_both", "epoch"],
               "val": ["val_loss", "val_b", "epoch"],
               "epoch_end": ["epoch_tee_metric", "epoch_a_tee", "epoch"]}


class DictModule(_Base):
    """The 0.9 dict API: ``'log'`` dicts from the step and both epoch ends."""

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        return {"loss": loss, "log": {"z_loss": loss, "a_other": loss + 1}}

    def training_epoch_end(self, outputs):
        mean = torch.stack([o["loss"] for o in outputs]).mean()
        return {"log": {"tee_metric": torch.tensor(5.0), "b_avg": mean}}

    def validation_step(self, batch, batch_idx):
        return {"val_loss": self._loss(batch)}

    def validation_epoch_end(self, outputs):
        mean = torch.stack([o["val_loss"] for o in outputs]).mean()
        return {"val_loss": mean, "log": {"val_loss": mean, "val_a": mean + 1}}


DICT_KEYS = {"train": ["z_loss", "a_other", "epoch"], "val": ["val_loss", "val_a", "epoch"],
             "epoch_end": ["tee_metric", "b_avg", "epoch"]}


def expected_09(keys: dict[str, list[str]], batches: int = BATCHES,
                epochs: int = EPOCHS) -> list[tuple[list[str], int]]:
    """The ``log_metrics`` calls of a flushing logger, from 0.9.0's loop (module docstring):
    validation (at the epoch's last batch) before that batch's train metrics, at one step;
    the epoch-end dict after the epoch, at the step the next batch will use."""
    calls = []
    for epoch in range(epochs):
        for batch in range(batches):
            step = epoch * batches + batch
            if batch == batches - 1:
                calls.append((keys["val"], step))
            calls.append((keys["train"], step))
        calls.append((keys["epoch_end"], (epoch + 1) * batches))
    return calls


def merged_09(calls: list[tuple[list[str], int]]) -> list[tuple[list[str], int]]:
    """What a logger whose ``save`` does not flush gets: the calls of one step as one call
    (``_aggregate_metrics``), keys in first-seen order (ray_lit's choice among 0.9's orders)."""
    out: list[tuple[list[str], int]] = []
    for keys, step in calls:
        if out and out[-1][1] == step:
            out[-1] = (out[-1][0] + [k for k in keys if k not in out[-1][0]], step)
        else:
            out.append((list(keys), step))
    return out


# Not the shared ``fit`` fixture: several loggers at once, on this file's loaders.
def _fit(module, *loggers) -> None:
    trainer = pl.Trainer(max_epochs=EPOCHS, logger=list(loggers), num_sanity_val_steps=0,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, _loader(2 * BATCHES, 1), _loader(4, 2))


def test_result_api_calls_match_09(rec09):
    flushing, merging = rec09.Recorder(), rec09.MergingRecorder()
    _fit(ResultModule(), flushing, merging)
    assert flushing.sequence() == expected_09(RESULT_KEYS)
    assert merging.sequence() == merged_09(expected_09(RESULT_KEYS))
    # 0.9 called save() after every trainer call; a user's save ran each time
    assert merging.saves >= len(expected_09(RESULT_KEYS))


def test_dict_api_calls_match_09(rec09):
    flushing, merging = rec09.Recorder(), rec09.MergingRecorder()
    _fit(DictModule(), flushing, merging)
    assert flushing.sequence() == expected_09(DICT_KEYS)
    assert merging.sequence() == merged_09(expected_09(DICT_KEYS))


def test_merged_values_are_the_per_key_mean_of_one_step(rec09):
    """``merge_dicts``: each key's values at one step are averaged over the dicts holding it;
    a key only one dict has keeps its value."""
    flushing, merging = rec09.Recorder(), rec09.MergingRecorder()
    _fit(DictModule(), flushing, merging)
    by_step: dict[int, list[dict[str, float]]] = {}
    for _, step, values in flushing.calls:
        by_step.setdefault(step, []).append(values)
    for keys, step, values in merging.calls:
        dicts = by_step[step]
        for key in keys:
            seen = [d[key] for d in dicts if key in d]
            assert values[key] == sum(seen) / len(seen)
    # epoch 0's epoch-end dict and epoch 1's first batch share a step (0.9.0's extra step
    # not copied), so their ``epoch`` values 0 and 1 are averaged like any other key
    assert [v["epoch"] for _, s, v in merging.calls if s == BATCHES] == [0.5]


class SelfLogModule(_Base):
    """``self.log`` (2.x API) in the same places: its calls keep 2.x's loop order (a batch's
    train metrics before that batch's validation) and go through the same logger protocol."""

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("b_loss", loss)
        self.log("a_abs", loss.abs() + 1)
        return loss

    def on_train_epoch_end(self):
        self.log("tee_metric", 5.0)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))


def test_self_log_calls_keep_2x_order_through_the_09_protocol(rec09):
    flushing, merging = rec09.Recorder(), rec09.MergingRecorder()
    _fit(SelfLogModule(), flushing, merging)
    expected = []
    for epoch in range(EPOCHS):
        for batch in range(BATCHES):
            step = epoch * BATCHES + batch
            expected.append((["b_loss", "a_abs", "epoch"], step))
        expected.append((["val_loss", "epoch"], (epoch + 1) * BATCHES - 1))
        expected.append((["tee_metric", "epoch"], (epoch + 1) * BATCHES))
    assert flushing.sequence() == expected
    assert merging.sequence() == merged_09(expected)


class TwoXLogger(LightningLoggerBase):
    """A logger written against ray_lit / 2.x with its own ``save`` that does not call super:
    2.x has no aggregation, so it gets every call at once."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[str], int]] = []

    name = "two_x"
    version = 0

    def log_hyperparams(self, params) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((list(metrics), step))

    def save(self) -> None:
        pass


def test_a_2x_logger_with_its_own_save_gets_every_call_at_once(rec09):
    two_x, flushing = TwoXLogger(), rec09.Recorder()
    _fit(DictModule(), two_x, flushing)
    assert two_x.calls == flushing.sequence() == expected_09(DICT_KEYS)
