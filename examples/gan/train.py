"""A GAN with two optimizers and ``optimizer_idx`` (the 0.9 idiom), on 2-D synthetic data.

``configure_optimizers`` returns ``[opt_g, opt_d], []``; ``training_step(batch, batch_idx,
optimizer_idx)`` is called once per optimizer for every batch (generator first), and ray_lit
freezes the other optimizer's parameters while each one steps. With ``--num-workers 2`` each
optimizer's gradients are all-reduced by DDP (``find_unused_parameters`` turns on by itself).

The real data is a tilted 2-D Gaussian; at the end the generator's samples must match its mean,
spread and correlation. Nothing is downloaded.
Run: ``python train.py`` (about 40 s on 2 CPU cores).
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

MEAN = torch.tensor([2.0, -1.0])
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]])


def real_points(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MEAN + torch.randn(n, 2, generator=g) @ torch.linalg.cholesky(COV).T


class GAN(pl.LightningModule):
    def __init__(self, latent_dim: int = 4, hidden: int = 32, lr: float = 2e-3):
        super().__init__()
        self.save_hyperparameters()
        self.generator = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2),
                                       nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                                       nn.Linear(hidden, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, hidden), nn.LeakyReLU(0.2),
                                           nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                                           nn.Linear(hidden, 1))

    def forward(self, z):
        return self.generator(z)

    def training_step(self, batch, batch_idx, optimizer_idx):
        (real,) = batch
        z = torch.randn(real.size(0), self.hparams.latent_dim).type_as(real)
        if optimizer_idx == 0:  # generator: make the discriminator say "real"
            logits = self.discriminator(self(z))
            g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            result = pl.TrainResult(minimize=g_loss)
            result.log("g_loss", g_loss, prog_bar=True)
            return result
        # discriminator: real as real, generated as fake
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(self(z).detach())
        d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits,
                                                       torch.zeros_like(fake_logits))) / 2
        result = pl.TrainResult(minimize=d_loss)
        result.log("d_loss", d_loss, prog_bar=True)
        return result

    def configure_optimizers(self):
        lr = self.hparams.lr
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        return [opt_g, opt_d], []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-workers", type=int, default=2,
                        help="Ray workers (0 trains in this process without Ray)")
    parser.add_argument("--max-epochs", type=int, default=8)
    args = parser.parse_args()

    pl.seed_everything(0)
    train = DataLoader(TensorDataset(real_points(8192, 1)), batch_size=128, shuffle=True)
    gan = GAN()
    trainer = ray_lit.fit(gan, train, num_workers=args.num_workers, max_epochs=args.max_epochs,
                          default_root_dir=os.path.abspath("runs"))
    print("progress bar:", trainer.progress_bar_metrics)

    # two optimizers step once per batch each, but global_step counts batches (0.9 rule)
    assert trainer.global_step == args.max_epochs * len(train) // max(1, args.num_workers), \
        trainer.global_step
    gan.eval()
    with torch.no_grad():
        fake = gan(torch.randn(4096, gan.hparams.latent_dim))
    mean, cov = fake.mean(0), torch.cov(fake.T)
    corr = cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt()
    print(f"generated mean {mean.tolist()} (real {MEAN.tolist()}); "
          f"std {cov.diagonal().sqrt().tolist()} (real {COV.diagonal().sqrt().tolist()}); "
          f"correlation {corr:.2f} (real {COV[0, 1] / (COV[0, 0] * COV[1, 1]).sqrt():.2f})")
    assert (mean - MEAN).norm() < 0.5, mean
    assert ((cov.diagonal().sqrt() / COV.diagonal().sqrt()) - 1).abs().max() < 0.5, cov
    assert corr > 0.4, corr


if __name__ == "__main__":
    main()
