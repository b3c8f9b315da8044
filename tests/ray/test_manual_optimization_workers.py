"""Issue 15 on 2 Ray workers: a Lightning 2.x GAN with manual optimisation (two optimizers,
``toggle_optimizer``, ``manual_backward``, ``clip_gradients``, two schedulers) trains under
DDP. ``manual_backward`` runs inside DDP's forward; it used to fail at the second batch
("initialize_buckets must NOT be called during autograd execution")."""

from __future__ import annotations

import json
import os
import sys

import cloudpickle
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class GAN(pl.LightningModule):
    """Generator maps noise to 2-d points; the discriminator tells them from the data."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
        self.out_dir = out_dir
        self.g_losses: list[float] = []
        self.d_losses: list[float] = []
        self.first_batch_sum: float | None = None

    def training_step(self, batch, batch_idx):
        (real,) = batch
        if self.first_batch_sum is None:
            self.first_batch_sum = float(real.sum())
        g_opt, d_opt = self.optimizers()
        g_sched, d_sched = self.lr_schedulers()
        bce = nn.functional.binary_cross_entropy_with_logits
        noise = torch.randn(len(real), 4)

        # generator: fool the discriminator; its parameters alone require grad
        self.toggle_optimizer(g_opt)
        fake = self.generator(noise)
        g_loss = bce(self.discriminator(fake), torch.ones(len(real), 1))
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        self.clip_gradients(g_opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        g_opt.step()
        self.untoggle_optimizer(g_opt)

        # discriminator: real against a detached fake (the generator gets no gradient)
        self.toggle_optimizer(d_opt)
        d_loss = (bce(self.discriminator(real), torch.ones(len(real), 1))
                  + bce(self.discriminator(fake.detach()), torch.zeros(len(real), 1))) / 2
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        self.untoggle_optimizer(d_opt)
        g_sched.step()
        d_sched.step()

        self.g_losses.append(float(g_loss))
        self.d_losses.append(float(d_loss))
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss}, prog_bar=True)

    def configure_optimizers(self):
        g_opt = torch.optim.Adam(self.generator.parameters(), lr=0.01)
        d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=0.01)
        g_sched = torch.optim.lr_scheduler.StepLR(g_opt, step_size=100)
        d_sched = torch.optim.lr_scheduler.StepLR(d_opt, step_size=100)
        return [g_opt, d_opt], [g_sched, d_sched]

    def on_train_end(self):
        rank = self.global_rank
        torch.save({k: v.detach().clone() for k, v in self.state_dict().items()},
                   os.path.join(self.out_dir, f"weights_rank{rank}.pt"))
        with open(os.path.join(self.out_dir, f"losses_rank{rank}.json"), "w") as f:
            json.dump({"g": self.g_losses, "d": self.d_losses, "first": self.first_batch_sum,
                       "steps": self.trainer.global_step}, f)


def test_gan_with_manual_optimization_trains_on_two_workers(ray_cluster, tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(128, 2) * 0.5 + torch.tensor([2.0, -1.0]))
    model = GAN(str(tmp_path))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(num_workers=2, max_epochs=3, default_root_dir=str(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, enable_checkpointing=False, logger=False)
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True))

    ranks = [json.loads((tmp_path / f"losses_rank{r}.json").read_text()) for r in (0, 1)]
    weights = [torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1)]
    # each rank ran 3 epochs of its half (64 samples, 4 batches); 2 optimizer steps a batch
    for losses in ranks:
        assert len(losses["g"]) == len(losses["d"]) == 12
        assert losses["steps"] == 24
        assert losses["g"][0] != losses["g"][-1]
        assert losses["d"][0] != losses["d"][-1]
    # the ranks trained on different shards, yet DDP kept their weights identical
    assert ranks[0]["first"] != ranks[1]["first"]
    assert ranks[0]["g"][0] != ranks[1]["g"][0]
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-6), key
    # both networks moved, and the driver's module got the trained weights
    for prefix in ("generator", "discriminator"):
        assert any(not torch.equal(initial[k], weights[0][k]) for k in initial
                   if k.startswith(prefix)), prefix
    for key, value in model.state_dict().items():
        assert torch.allclose(value, weights[0][key], atol=1e-6), key


class AttributesOnWorkers(pl.LightningModule):
    """Records, on each rank, the 2.x trainer attributes and collectives a module uses."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.out_dir = out_dir
        self.seen: dict = {}

    def configure_optimizers(self):
        self.seen["estimated"] = self.trainer.estimated_stepping_batches
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1,
                                                    total_steps=self.seen["estimated"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        (x,) = batch
        if batch_idx == 0 and self.current_epoch == 0:
            rank = torch.tensor(float(self.global_rank))
            self.trainer.strategy.barrier()
            self.seen.update(
                devices=self.trainer.num_devices, nodes=self.trainer.num_nodes,
                gathered=self.all_gather(rank).tolist(),
                gathered_dict=self.all_gather({"r": rank * 10})["r"].tolist(),
                broadcast=self.trainer.strategy.broadcast(self.global_rank + 5),
                deterministic=(torch.are_deterministic_algorithms_enabled(),
                               torch.is_deterministic_algorithms_warn_only_enabled(),
                               os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return self.layer(x).pow(2).mean()

    def on_train_end(self):
        self.seen["steps"] = self.trainer.global_step
        with open(os.path.join(self.out_dir, f"seen_rank{self.global_rank}.json"), "w") as f:
            json.dump(self.seen, f)


def test_2x_trainer_attributes_and_determinism_on_workers(ray_cluster, tmp_path):
    data = TensorDataset(torch.randn(80, 2))
    trainer = pl.Trainer(num_workers=2, max_epochs=2, default_root_dir=str(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
                         accumulate_grad_batches=2, limit_train_batches=3,
                         deterministic="warn")
    trainer.fit(AttributesOnWorkers(str(tmp_path)), DataLoader(data, batch_size=8))
    seen = [json.loads((tmp_path / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    for rank, s in enumerate(seen):
        # each rank's shard: 40 samples, 5 batches, limited to 3; ceil(3 / 2) steps an epoch
        assert s["estimated"] == 4 and s["steps"] == 4
        assert s["devices"] * s["nodes"] >= 2
        assert s["gathered"] == [0.0, 1.0] and s["gathered_dict"] == [0.0, 10.0]
        assert s["broadcast"] == 5
        assert s["deterministic"] == [True, True, ":4096:8"], rank
