"""The seed's minimal classifier, written as the 0.9 docs teach, trained on 2 Ray workers.

Data is generated (a noisy 4-class problem in 20 dimensions), so nothing is downloaded.
Run: ``python train.py`` (about 30 s on 2 CPU cores, most of it starting Ray).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl
from ray_lit.metrics import functional as FM


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 20, generator=torch.Generator().manual_seed(0)) * 0.3
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + torch.randn(n, 20, generator=g)
    return TensorDataset(x, y)


class LitClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        result = pl.TrainResult(minimize=loss)
        result.log("train_loss", loss, prog_bar=True)
        return result

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        result = pl.EvalResult(checkpoint_on=loss)
        result.log("val_loss", loss, prog_bar=True)
        result.log("val_acc", FM.accuracy(logits, y), prog_bar=True)
        return result

    def test_step(self, batch, batch_idx):
        x, y = batch
        result = pl.EvalResult()
        result.log("test_acc", FM.accuracy(self(x), y))
        return result

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-workers", type=int, default=2,
                        help="Ray workers (0 trains in this process without Ray)")
    parser.add_argument("--max-epochs", type=int, default=3)
    args = parser.parse_args()

    pl.seed_everything(42)
    train = DataLoader(make_data(4096, 1), batch_size=64, shuffle=True)
    val = DataLoader(make_data(1024, 2), batch_size=256)
    test = DataLoader(make_data(1024, 3), batch_size=256)
    model = LitClassifier()
    trainer = ray_lit.fit(model, train, val, num_workers=args.num_workers,
                          max_epochs=args.max_epochs, default_root_dir="runs")
    print("callback metrics:", {k: round(float(v), 4) for k, v in
                                trainer.callback_metrics.items() if v is not None})
    print("best checkpoint:", trainer.checkpoint_callback.best_model_path)
    result = trainer.test(test_dataloaders=test)
    assert result[0]["test_acc"] > 0.5, result  # 4 classes: chance is 0.25


if __name__ == "__main__":
    main()
