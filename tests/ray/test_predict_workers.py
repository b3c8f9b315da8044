"""``trainer.predict`` on 2 Ray workers (issue 15 item 4): the driver gets the in-process
outputs, in order, streamed over several polls; prediction writers write one shard per rank."""

from __future__ import annotations

import json
import os
import sys

import cloudpickle
import pytest
import torch
from torch.utils.data import DataLoader

import ray_lit as pl
from ray_lit.callbacks import BasePredictionWriter

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N = 41  # odd: 2 ranks cannot split it evenly (a padding sampler would repeat a sample)
WIDE = 16384  # columns repeated per output row: 512 KiB a sample, 1 MiB a batch of 2


class Wide(pl.LightningModule):
    """Outputs large enough that rank 0's 11 batches (11 MiB) exceed one poll's 8 MiB."""

    def __init__(self, wide: int = 1) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layer = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.5)  # eval mode or the outputs would differ
        self.wide = wide

    def forward(self, x):
        return self.drop(self.layer(x))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch).repeat(1, self.wide) + dataloader_idx


def _data() -> torch.Tensor:
    return torch.randn(N, 8, generator=torch.Generator().manual_seed(0))


def _trainer(**options) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      **options)


def test_two_workers_return_the_in_process_predictions_in_order(ray_cluster, tmp_path):
    data = _data()
    loaders = [DataLoader(data, batch_size=2), DataLoader(data[:7], batch_size=3)]
    expected = _trainer().predict(Wide(WIDE), loaders)
    trainer = _trainer(num_workers=2, default_root_dir=str(tmp_path))
    got = trainer.predict(Wide(WIDE), loaders)
    assert [len(g) for g in got] == [21, 3]
    for got_dl, expected_dl in zip(got, expected):
        assert len(got_dl) == len(expected_dl)
        for g, e in zip(got_dl, expected_dl):
            assert torch.equal(g, e)
    # the padding a DistributedSampler would add (sample 0 again) is nowhere
    assert sum(len(g) for g in got[0]) == N
    collector = trainer._prediction_collector
    assert collector.chunks_received == 24
    # streamed: rank 0 alone had 11 MiB of outputs, more than one 8 MiB poll carries
    assert collector.statuses_with_chunks[0] > 1, collector.statuses_with_chunks
    assert collector.statuses_with_chunks[1] >= 1
    assert trainer.state.fn == "predict" and trainer.state.finished


class ShardWriter(BasePredictionWriter):
    """Each rank writes its own file of (indices, rows) per batch, and one at epoch end."""

    def __init__(self, out_dir: str) -> None:
        super().__init__("batch_and_epoch")
        self.out_dir = out_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch,
                           batch_idx, dataloader_idx):
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"indices": list(batch_indices),
                                "rows": prediction.tolist()}) + "\n")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        path = os.path.join(self.out_dir, f"epoch_rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"batches": len(predictions), "indices": batch_indices}, f)


def test_a_writer_on_two_ranks_writes_disjoint_shards_covering_the_dataset(ray_cluster,
                                                                           tmp_path):
    data = _data()
    model = Wide()
    with torch.no_grad():
        model.eval()
        reference = model(data)
    trainer = _trainer(num_workers=2, default_root_dir=str(tmp_path),
                       callbacks=[ShardWriter(str(tmp_path))])
    out = trainer.predict(model, DataLoader(data, batch_size=4), return_predictions=False)
    assert out is None
    assert trainer._prediction_collector.chunks_received == 0  # nothing sent but the writes
    shards = []
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.jsonl").read_text()
        lines = [json.loads(line) for line in text.splitlines()]
        indices = [i for line in lines for i in line["indices"]]
        for line in lines:  # each row is the prediction of the sample its index names
            assert torch.allclose(torch.tensor(line["rows"]), reference[line["indices"]])
        epoch = json.loads((tmp_path / f"epoch_rank{rank}.json").read_text())
        assert epoch["batches"] == len(lines)  # the epoch writer got the rank's outputs
        assert [i for b in epoch["indices"][0] for i in b] == indices
        shards.append(indices)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(N))


def test_limit_predict_batches_counts_per_rank_like_the_other_limits(ray_cluster, tmp_path):
    """Each rank stops after its first 2 batches (as ``limit_test_batches`` does): the driver
    gets the first 2 x 2 batches of the loader, in order."""
    data = _data()
    loader = DataLoader(data, batch_size=4)
    expected = _trainer().predict(Wide(), loader)
    trainer = _trainer(num_workers=2, default_root_dir=str(tmp_path), limit_predict_batches=2)
    got = trainer.predict(Wide(), loader)
    assert len(got) == 4
    assert all(torch.equal(g, e) for g, e in zip(got, expected[:4]))
    trainer.teardown()
