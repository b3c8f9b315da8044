"""A learning-rate sweep with Ray Tune: ``ray_lit.tune.sweep`` over 3 learning rates.

Each trial is a whole ray_lit run: the trial's driver plus ``--num-workers`` Ray workers, whose
resources ``trainable`` asks Tune for up front (so trials never wait on each other's workers).
Every validation epoch reports the trial's metrics and a checkpoint to Tune; the best trial is
the one with the lowest ``val_loss``. Data is generated; nothing is downloaded.
Run: ``python train.py`` (about 50 s on 2 CPU cores; ``--num-workers 0`` runs each trial in its
Tune process and is faster).
"""

from __future__ import annotations

import argparse
import os

import torch
from ray import tune
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.metrics import functional as FM
from ray_lit.tune import sweep

LEARNING_RATES = [1e-4, 3e-3, 3e-2]


def make_data(n: int, seed: int) -> TensorDataset:
    centers = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centers[y] + 0.7 * torch.randn(n, 10, generator=g), y)


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", FM.accuracy(logits, y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def build(config: dict) -> Classifier:
    """Tune config -> a fresh module (called inside each trial)."""
    return Classifier(lr=config["lr"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-workers", type=int, default=1,
                        help="Ray workers per trial (0: each trial trains in its Tune process)")
    parser.add_argument("--max-epochs", type=int, default=3)
    args = parser.parse_args()

    pl.seed_everything(0)
    train = DataLoader(make_data(1024, 1), batch_size=64, shuffle=True)
    val = DataLoader(make_data(256, 2), batch_size=128)
    results = sweep(build, {"lr": tune.grid_search(LEARNING_RATES)}, metric="val_loss",
                    mode="min", storage_path=os.path.abspath("runs"), name="lr_sweep",
                    train_dataloaders=train, val_dataloaders=val,
                    num_workers=args.num_workers, max_epochs=args.max_epochs,
                    enable_model_summary=False, logger=False)

    for result in sorted(results, key=lambda r: r.config["lr"]):
        print(f"lr={result.config['lr']:g}: val_loss={result.metrics['val_loss']:.4f} "
              f"val_acc={result.metrics['val_acc']:.3f} epochs={result.metrics['epoch']}")
    best = results.get_best_result(metric="val_loss", mode="min")
    print("best config:", best.config, "val_loss:", round(best.metrics["val_loss"], 4))

    assert not results.errors, results.errors
    assert len(results) == len(LEARNING_RATES)
    # every trial reported once per validation epoch, with a checkpoint
    assert all(r.metrics["training_iteration"] == args.max_epochs for r in results)
    assert best.checkpoint is not None
    # 1e-4 barely moves in 3 epochs: the sweep must not pick it
    assert best.config["lr"] != LEARNING_RATES[0], best.config
    assert best.metrics["val_acc"] > 0.8, best.metrics


if __name__ == "__main__":
    main()
