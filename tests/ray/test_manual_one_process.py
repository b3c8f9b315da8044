"""Manual optimisation on 2 workers (DDP and FSDP) equals ONE process on the union batch.

Session 8 compared a manual GAN on 2 workers with one process given the same ``DataLoader``
(``shuffle=False``) at twice the batch size and found weights up to 0.04 apart. That was not
gradient arithmetic: a train loader on more than one worker is shuffled whatever the user asked
(Lightning 0.9's ``replace_sampler_ddp`` rule, ``loop/sampler.py``), with the permutation of
``seed + epoch``; one process keeps the loader's own sequential order. So step k of the two
runs saw different samples, and the GAN (two Adam optimizers, lr 0.01, whose first update is
about ``lr * sign(g)`` per element) carried the difference to 4 learning rates.

Given the same order (a ``ResumableDistributedSampler`` of world size 1 with the run's seed, at
batch 16), step k of one process sees exactly the 16 samples the two ranks see together at
batch 8 (rank r takes positions r, r + 2, ... of the same epoch order). The arithmetic then
agrees up to float32 rounding: each rank's loss is the mean over its 8 samples, DDP and FSDP
average the two ranks' gradients, and (g0 + g1) / 2 is the gradient of the mean over all 16;
norm clipping runs on the global norm (all-reduced gradients under DDP, DTensor norms under
FSDP), value clipping is element-wise. What is left is the order of float32 sums (one sum of
16 terms against two sums of 8 plus one of 2): measured 6e-8, asserted at 1e-6.
"""

from __future__ import annotations

import sys

import cloudpickle
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.core.seed import global_seed
from ray_lit.loop.sampler import ResumableDistributedSampler

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ManualGAN(pl.LightningModule):
    """Two optimizers, ``toggle_optimizer``, norm clipping that clips and value clipping."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2),
                                           nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        real, noise = batch
        g_opt, d_opt = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)

        self.toggle_optimizer(g_opt)
        fake = self.generator(noise)
        g_loss = bce(self.discriminator(fake), ones)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        self.clip_gradients(g_opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        g_opt.step()
        self.untoggle_optimizer(g_opt)

        self.toggle_optimizer(d_opt)
        d_loss = (bce(self.discriminator(real), ones)
                  + bce(self.discriminator(fake.detach()), zeros)) / 2
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        self.clip_gradients(d_opt, gradient_clip_val=0.01, gradient_clip_algorithm="value")
        d_opt.step()
        self.untoggle_optimizer(d_opt)

    def configure_optimizers(self):
        return [torch.optim.Adam(self.generator.parameters(), lr=0.01),
                torch.optim.Adam(self.discriminator.parameters(), lr=0.01)]


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    real = torch.randn(64, 2, generator=g) * 0.5 + torch.tensor([2.0, -1.0])
    return TensorDataset(real, torch.randn(64, 4, generator=g))


def _fit(model: ManualGAN, num_workers: int, loader: DataLoader, tmp_path, **kwargs) -> None:
    trainer = pl.Trainer(num_workers=num_workers, max_epochs=2, default_root_dir=str(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
                         **kwargs)
    trainer.fit(model, loader)
    assert trainer.global_step == 16  # 2 epochs x 4 batches, two optimizer steps each


def _copy(initial: dict[str, torch.Tensor]) -> ManualGAN:
    model = ManualGAN()
    model.load_state_dict(initial)
    return model


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_equal_one_process_on_the_union_batch(ray_cluster, tmp_path,
                                                          strategy) -> None:
    torch.manual_seed(0)
    initial = ManualGAN().state_dict()
    data = _dataset()
    # the epoch order the workers' sampler uses (the run's sampler seed), not shuffled further
    order = ResumableDistributedSampler(len(data), 1, 0, shuffle=True, seed=global_seed() or 0)
    one = _copy(initial)
    _fit(one, 0, DataLoader(data, batch_size=16, sampler=order), tmp_path / "one")
    workers = _copy(initial)
    _fit(workers, 2, DataLoader(data, batch_size=8, shuffle=False), tmp_path / strategy,
         strategy=strategy)
    for key, value in one.state_dict().items():
        assert not torch.equal(initial[key], value), key  # every layer trained
        torch.testing.assert_close(workers.state_dict()[key], value, rtol=1e-6, atol=1e-6)
