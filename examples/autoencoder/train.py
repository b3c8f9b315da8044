"""The seed's autoencoder, written as the 0.9 docs teach, trained on 2 Ray workers.

``TrainResult`` / ``EvalResult(checkpoint_on=loss)`` drive ModelCheckpoint; after ``fit`` the best
checkpoint is reloaded with ``LitAutoEncoder.load_from_checkpoint(...)`` and used to encode.

Data is generated: 28x28 "images" that are a smooth function of 3 hidden factors, so a 3-d code
can reconstruct them and nothing is downloaded.
Run: ``python train.py`` (about 30 s on 2 CPU cores, most of it starting Ray).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl


def make_images(n: int, seed: int) -> TensorDataset:
    """``n`` 28x28 images in [0, 1] driven by 3 latent factors (and their labels, unused)."""
    mixing = torch.randn(3, 28 * 28, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    x = torch.sigmoid(z @ mixing) + 0.02 * torch.randn(n, 28 * 28, generator=g)
    return TensorDataset(x.view(n, 1, 28, 28), torch.zeros(n, dtype=torch.long))


class LitAutoEncoder(pl.LightningModule):
    def __init__(self, hidden: int = 64, code: int = 3, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(28 * 28, hidden), nn.ReLU(),
                                     nn.Linear(hidden, code))
        self.decoder = nn.Sequential(nn.Linear(code, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 28 * 28))

    def forward(self, x):
        # in Lightning, forward defines the prediction/inference action: here, the embedding
        return self.encoder(x.view(x.size(0), -1))

    def _loss(self, batch):
        x, _ = batch
        x = x.view(x.size(0), -1)
        return F.mse_loss(self.decoder(self.encoder(x)), x)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        result = pl.TrainResult(minimize=loss)
        result.log("train_loss", loss, prog_bar=True)
        return result

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        result = pl.EvalResult(checkpoint_on=loss)
        result.log("val_loss", loss, prog_bar=True)
        return result

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-workers", type=int, default=2,
                        help="Ray workers (0 trains in this process without Ray)")
    parser.add_argument("--max-epochs", type=int, default=4)
    args = parser.parse_args()

    pl.seed_everything(7)
    train = DataLoader(make_images(4096, 1), batch_size=64, shuffle=True)
    val_set = make_images(512, 2)
    val = DataLoader(val_set, batch_size=256)
    model = LitAutoEncoder()
    trainer = ray_lit.fit(model, train, val, num_workers=args.num_workers,
                          max_epochs=args.max_epochs, default_root_dir=os.path.abspath("runs"))

    best = trainer.checkpoint_callback.best_model_path
    print("best checkpoint:", best, "score:", float(trainer.checkpoint_callback.best_model_score))
    autoencoder = LitAutoEncoder.load_from_checkpoint(best)
    autoencoder.eval()
    x = val_set.tensors[0][:8]
    with torch.no_grad():
        codes = autoencoder(x)
        recon = autoencoder.decoder(codes)
    print("codes of 8 validation images:\n", codes)

    # the reloaded model is the trained one, and it beats predicting the mean image
    assert autoencoder.hparams.code == 3 and codes.shape == (8, 3), codes.shape
    all_x = val_set.tensors[0].view(len(val_set), -1)
    baseline = F.mse_loss(all_x.mean(0, keepdim=True).expand_as(all_x), all_x).item()
    with torch.no_grad():
        reloaded_loss = F.mse_loss(autoencoder.decoder(autoencoder(all_x)), all_x).item()
    print(f"reconstruction mse: {reloaded_loss:.5f} (mean-image baseline {baseline:.5f}); "
          f"first recon error {F.mse_loss(recon, x.view(8, -1)).item():.5f}")
    assert abs(reloaded_loss - float(trainer.checkpoint_callback.best_model_score)) < 1e-3
    assert reloaded_loss < 0.5 * baseline, (reloaded_loss, baseline)


if __name__ == "__main__":
    main()
