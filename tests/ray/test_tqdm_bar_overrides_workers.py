"""Issue 15 on 2 Ray workers: a subclass of Lightning's ``TQDMProgressBar`` with its own tqdm
bars, titles and ``get_metrics`` draws on the driver what real Lightning 2.6 draws for one rank's
share of the data (the bar shows rank 0's batches)."""

from __future__ import annotations

import io
import re
import sys

import cloudpickle
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import ray_lit

L = pytest.importorskip("lightning.pytorch")  # the dev extra installs lightning 2.x
from lightning.pytorch import callbacks as lc  # noqa: E402

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRAIN_FORMAT = "{desc}|{n_fmt}/{total_fmt}|{postfix}"
EVAL_FORMAT = "{desc}|{n_fmt}/{total_fmt}"
QUIET = dict(max_epochs=2, enable_model_summary=False, logger=False, enable_checkpointing=False,
             num_sanity_val_steps=1)


class Constant(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("speed", 0.5, prog_bar=True)
        return F.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        self.log("score", 2.0, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CustomBar(lc.TQDMProgressBar):
    def __init__(self, stream: io.StringIO) -> None:
        super().__init__()
        self.stream = stream

    def init_train_tqdm(self):
        return tqdm(file=self.stream, ncols=120, bar_format=TRAIN_FORMAT, leave=True)

    def init_validation_tqdm(self):
        return tqdm(file=self.stream, ncols=120, bar_format=EVAL_FORMAT, leave=False)

    def init_sanity_tqdm(self):
        return tqdm(file=self.stream, ncols=120, bar_format=EVAL_FORMAT, leave=False)

    @property
    def validation_description(self) -> str:
        return "Checking"

    @property
    def sanity_check_description(self) -> str:
        return "Warming"

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {"custom": "yes", **{k: items[k] for k in ("speed", "score") if k in items}}


def _loader(n: int) -> DataLoader:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)


def _finished(text: str, title: str) -> set[str]:
    """The redraws of bars titled ``title`` that reached their total (Lightning's per-loader
    " DataLoader 0" suffix dropped: ray_lit's evaluation bar spans a stage's loaders)."""
    found = set()
    for seg in re.split(r"[\r\n]", text.replace("\x1b[A", "")):
        seg = re.sub(r" DataLoader \d+", "", seg.strip())
        m = re.match(rf"{title}[^|]*\|(\d+)/(\d+)", seg)
        if m and m.group(1) == m.group(2):
            found.add(seg)
    return found


def test_custom_bar_on_two_workers_draws_what_lightning_draws(ray_cluster, tmp_path):
    ref_stream, ours_stream = io.StringIO(), io.StringIO()
    # Lightning in one process on one rank's share: 16 rows, 2 batches per stage
    L.Trainer(callbacks=[CustomBar(ref_stream)], accelerator="cpu", devices=1,
              default_root_dir=str(tmp_path / "pl"), **QUIET).fit(Constant(), _loader(16),
                                                                 _loader(16))
    trainer = ray_lit.Trainer(callbacks=[CustomBar(ours_stream)], num_workers=2,
                              default_root_dir=str(tmp_path / "ours"), **QUIET)
    trainer.fit(Constant(), _loader(32), _loader(32))
    ref, ours = ref_stream.getvalue(), ours_stream.getvalue()
    # each epoch's last line, after validation merged its metric: the user's format and items
    last = {"Epoch 0: |2/2|, custom=yes, speed=0.5, score=2",
            "Epoch 1: |2/2|, custom=yes, speed=0.5, score=2"}
    assert last <= _finished(ref, "Epoch")
    assert last <= _finished(ours, "Epoch") <= _finished(ref, "Epoch")
    assert "v_num" not in ours
    for title in ("Checking", "Warming"):
        assert _finished(ours, title) == _finished(ref, title) != set()
