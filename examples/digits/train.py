"""Real data without a download: scikit-learn's ``load_digits`` (1797 8x8 handwritten digits).

The data lives in a ``LightningDataModule`` (``prepare_data`` / ``setup(stage)`` / loaders),
the model is a small CNN logged with the 2.x ``self.log`` API, and ``ModelCheckpoint`` keeps the
epoch with the best ``val_acc`` while ``EarlyStopping`` watches ``val_loss``. Training runs on
2 Ray workers; ``trainer.test(datamodule=dm)`` evaluates the best checkpoint.

Needs scikit-learn (``pip install scikit-learn``; the digits ship inside the package). Without
it the script says so and exits 0.
Run: ``python train.py`` (about 35 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset, random_split

import ray_lit
import ray_lit as pl
from ray_lit.callbacks import EarlyStopping, ModelCheckpoint
from ray_lit.metrics import functional as FM


class DigitsDataModule(pl.LightningDataModule):
    """The 8x8 digits, scaled to [0, 1], split 1200 / 297 / 300 with a fixed seed."""

    def __init__(self, batch_size: int = 64):
        super().__init__()
        self.batch_size = batch_size

    def prepare_data(self):
        from sklearn.datasets import load_digits  # noqa: F401  (ships with the package)

    def setup(self, stage=None):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        self.train_set, self.val_set, self.test_set = random_split(
            TensorDataset(x, y), [1200, 297, 300], generator=torch.Generator().manual_seed(0))

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=256)


class DigitsCNN(pl.LightningModule):
    def __init__(self, channels: int = 16, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),       # 4x4
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(2 * channels * 4, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", FM.accuracy(logits, y), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", FM.accuracy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-workers", type=int, default=2,
                        help="Ray workers (0 trains in this process without Ray)")
    parser.add_argument("--max-epochs", type=int, default=8)
    args = parser.parse_args()
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("digits: scikit-learn is not installed, so there is no data to train on. "
              "Install it with `pip install scikit-learn` and run again. Skipping.")
        sys.exit(0)

    pl.seed_everything(0)
    dm = DigitsDataModule()
    model = DigitsCNN()
    best_acc = ModelCheckpoint(monitor="val_acc", mode="max", filename="{epoch}-{val_acc:.3f}")
    trainer = ray_lit.fit(model, datamodule=dm, num_workers=args.num_workers,
                          max_epochs=args.max_epochs, default_root_dir=os.path.abspath("runs"),
                          callbacks=[best_acc, EarlyStopping(monitor="val_loss", patience=3)])
    print("best checkpoint:", best_acc.best_model_path,
          "val_acc:", round(float(best_acc.best_model_score), 4))
    result = trainer.test(datamodule=dm)  # the best checkpoint by val_acc
    assert trainer.tested_ckpt_path == best_acc.best_model_path
    assert float(best_acc.best_model_score) > 0.9, best_acc.best_model_score
    assert result[0]["test_acc"] > 0.9, result


if __name__ == "__main__":
    main()
