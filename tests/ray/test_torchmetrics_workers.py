"""Issues 14/15 on 2 Ray workers: torchmetrics objects logged with ``self.log`` sync over the
gloo group by themselves, and ``self.logger.experiment`` writes from rank 0 reach the driver's
TensorBoard file (rank 1's are dropped)."""

from __future__ import annotations

import os
import sys

import cloudpickle
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import ray_lit as pl
from ray_lit.loggers import Logger

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class LabelledDataset(Dataset):
    """Sample i is (x_i, y_i, i); the model predicts ``x_i[0] > 0``, right about half the time."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 2, generator=g)
        self.y = (torch.rand(n, generator=g) > 0.5).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def _preds(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0] > 0).long()


class AccuracyModel(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        from torchmetrics import SumMetric
        from torchmetrics.classification import BinaryAccuracy

        self.layer = torch.nn.Linear(2, 1)
        self.train_acc = BinaryAccuracy()
        self.seen = SumMetric()
        self.val_acc = BinaryAccuracy()
        self.out_dir = out_dir

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        with open(os.path.join(self.out_dir, f"seen_rank{self.global_rank}.txt"), "a") as f:
            f.write(" ".join(str(int(i)) for i in idx) + "\n")
        self.train_acc(_preds(x), y)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        # a sum shows any second reduction on top of torchmetrics' own sync (it would double)
        self.seen(torch.ones(len(x)))
        self.log("seen", self.seen, on_epoch=True, on_step=False, reduce_fx="sum",
                 sync_dist=True)
        return self.layer(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.val_acc.update(_preds(x), y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict, int]] = []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step):
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params):
        pass


def _options(tmp_path, **extra):
    base = dict(num_workers=2, max_epochs=1, default_root_dir=str(tmp_path),
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                enable_checkpointing=False, log_every_n_steps=1)
    base.update(extra)
    return base


def _accuracy(dataset: LabelledDataset, idx: list[int]) -> float:
    return float((_preds(dataset.x[idx]) == dataset.y[idx]).float().mean())


def test_torchmetrics_epoch_value_is_synced_over_both_ranks(ray_cluster, tmp_path):
    train, val = LabelledDataset(64, 0), LabelledDataset(32, 1)
    logger = RecordingLogger()
    trainer = pl.Trainer(**_options(tmp_path, logger=logger))
    trainer.fit(AccuracyModel(str(tmp_path)), DataLoader(train, batch_size=8),
                DataLoader(val, batch_size=8))
    batches = {rank: [[int(i) for i in line.split()] for line in
                      (tmp_path / f"seen_rank{rank}.txt").read_text().splitlines()]
               for rank in (0, 1)}
    union = [i for rank in (0, 1) for batch in batches[rank] for i in batch]
    assert sorted(union) == list(range(64))  # no padding: the union is each sample once
    rank0 = [i for batch in batches[0] for i in batch]
    assert _accuracy(train, rank0) != pytest.approx(_accuracy(train, union))  # sync is visible
    # step values: rank 0's own batch (forward is local), in order on the driver
    steps = [m["train_acc_step"] for m, _ in logger.calls if "train_acc_step" in m]
    assert steps == pytest.approx([_accuracy(train, b) for b in batches[0]])
    # epoch value: torchmetrics' compute() gathered both ranks' states, nothing more
    epoch = [m["train_acc_epoch"] for m, _ in logger.calls if "train_acc_epoch" in m]
    assert epoch == pytest.approx([_accuracy(train, union)])
    assert [m["seen"] for m, _ in logger.calls if "seen" in m] == [64.0]
    val_logged = [m["val_acc"] for m, _ in logger.calls if "val_acc" in m]
    assert val_logged == pytest.approx([_accuracy(val, list(range(32)))])
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(val_logged[0])


class ExperimentModel(pl.LightningModule):
    """Every rank writes an image, a histogram and a text under tags naming the rank."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, _, _ = batch
        loss = self.layer(x).pow(2).mean()
        self.log("loss", loss)
        experiment = self.logger.experiment
        rank = self.global_rank
        experiment.add_image(f"img_rank{rank}", torch.full((3, 4, 6), 0.25), self.global_step)
        experiment.add_histogram(f"weight_rank{rank}", self.layer.weight, self.global_step)
        experiment.add_text(f"note_rank{rank}", f"step {self.global_step}", self.global_step)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_rank0_experiment_writes_land_in_the_driver_tensorboard(ray_cluster, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    from ray_lit.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path / "tb"))
    trainer = pl.Trainer(**_options(tmp_path, logger=logger))
    trainer.fit(ExperimentModel(), DataLoader(LabelledDataset(32, 0), batch_size=8))
    acc = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={
        event_accumulator.IMAGES: 0, event_accumulator.HISTOGRAMS: 0,
        event_accumulator.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    # 2 steps per epoch on each rank; rank 0's calls are written by the driver at their steps
    assert [(e.step, e.width, e.height) for e in acc.Images("img_rank0")] == [(0, 6, 4),
                                                                             (1, 6, 4)]
    assert [e.step for e in acc.Histograms("weight_rank0")] == [0, 1]
    texts = acc.Tensors("note_rank0/text_summary")
    assert [(e.step, e.tensor_proto.string_val) for e in texts] == [(0, [b"step 0"]),
                                                                   (1, [b"step 1"])]
    assert [e.step for e in acc.Scalars("loss")] == [0, 1]
    # rank 1 got the no-op experiment: nothing of it anywhere
    written = [t for kind in ("images", "histograms", "tensors", "scalars") for t in tags[kind]]
    assert not [t for t in written if "rank1" in t]
