"""What the driver's loggers receive from 2 Ray workers (docs/lightning_semantics_decisions.md,
DECISION 0.9-2): the same ``log_metrics`` calls as 0.9.0 in process. Rank 0 records the loop's
calls as events that the driver replays in order, so each rank's 4 batches per epoch give the
sequence a 4-batch epoch gives in process; tests/unit/test_logger_call_order.py says where the
expected sequence comes from in 0.9.0's code (validation before the last batch's train metrics
at one step, ``'epoch'`` appended last, ``save()`` after each call, one merged call per step for
a logger whose ``save`` does not flush)."""

from __future__ import annotations

import importlib
import sys
import textwrap

import cloudpickle
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
import ray_lit.compat

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

EPOCHS, BATCHES_PER_RANK = 2, 4


RECORDERS = textwrap.dedent('''
    from pytorch_lightning.loggers import LightningLoggerBase


    class Recorder(LightningLoggerBase):
        def __init__(self):
            super().__init__()
            self.calls = []

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
            self.calls.append((list(metrics), step))


    class MergingRecorder(Recorder):
        def save(self):  # no super(): nothing flushed (0.9 merges one step's calls)
            pass
''')


@pytest.fixture
def recorders(tmp_path):
    """The loggers as a 0.9 user's file (``pytorch_lightning`` resolved to ray_lit); shipped to
    the workers by value like the test module."""
    (tmp_path / "recorders_09_ray.py").write_text(RECORDERS)
    sys.path.insert(0, str(tmp_path))
    try:
        with ray_lit.compat.lightning_on_ray():
            module = importlib.import_module("recorders_09_ray")
    finally:
        sys.path.remove(str(tmp_path))
    cloudpickle.register_pickle_by_value(module)
    yield module
    cloudpickle.unregister_pickle_by_value(module)
    sys.modules.pop("recorders_09_ray", None)


class ResultModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def _loss(self, batch):
        x, y = batch
        return ((self.layer(x) - y) ** 2).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        result = pl.TrainResult(minimize=loss)
        result.log("b_loss", loss)
        result.log("a_abs", loss.abs() + 1)
        return result

    def training_epoch_end(self, outputs):
        result = pl.TrainResult()
        result.log("tee_metric", torch.tensor(5.0), on_epoch=True)
        return result

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        result = pl.EvalResult(checkpoint_on=loss)
        result.log("val_loss", loss)
        result.log("val_b", loss + 1)
        return result

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)),
                      batch_size=2)


def _expected() -> list[tuple[list[str], int]]:
    calls = []
    for epoch in range(EPOCHS):
        for batch in range(BATCHES_PER_RANK):
            step = epoch * BATCHES_PER_RANK + batch
            if batch == BATCHES_PER_RANK - 1:
                calls.append((["val_loss", "val_b", "epoch"], step))
            calls.append((["b_loss", "a_abs", "epoch"], step))
        calls.append((["epoch_tee_metric", "epoch"], (epoch + 1) * BATCHES_PER_RANK))
    return calls


def _merged(calls):
    out = []
    for keys, step in calls:
        if out and out[-1][1] == step:
            out[-1] = (out[-1][0] + [k for k in keys if k not in out[-1][0]], step)
        else:
            out.append((list(keys), step))
    return out


def test_two_workers_send_the_09_calls(ray_cluster, recorders, tmp_path):
    flushing, merging = recorders.Recorder(), recorders.MergingRecorder()
    trainer = pl.Trainer(num_workers=2, max_epochs=EPOCHS, logger=[flushing, merging],
                         num_sanity_val_steps=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1, default_root_dir=str(tmp_path))
    try:
        trainer.fit(ResultModule(), _loader(4 * BATCHES_PER_RANK, 1), _loader(8, 2))
    finally:
        trainer.teardown()
    assert flushing.calls == _expected()
    assert merging.calls == _merged(_expected())
