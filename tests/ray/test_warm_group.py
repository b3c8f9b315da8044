"""One worker group per Trainer: fit, validate, test and predict on one Trainer run on the same
actors and process group; ``trainer.teardown()`` releases them; a worker lost while the group
idles is replaced at the next call."""

from __future__ import annotations

import sys

import cloudpickle
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _actor_ids(trainer: pl.Trainer) -> list[str]:
    return [w.actor._actor_id.hex() for w in trainer._kept.group.workers]


def _handles(trainer: pl.Trainer) -> list:
    return [w.actor for w in trainer._kept.group.workers]


def _alive(actors: list) -> list[bool]:
    import ray
    from ray.exceptions import RayActorError

    out = []
    for actor in actors:
        try:
            ray.get(actor.node_info.remote(), timeout=30)
            out.append(True)
        except RayActorError:
            out.append(False)
    return out


def test_every_call_of_one_trainer_runs_on_the_same_workers(ray_cluster, tmp_path):
    trainer = pl.Trainer(num_workers=2, max_epochs=2, default_root_dir=str(tmp_path),
                         logger=False, enable_progress_bar=False, enable_checkpointing=False)
    model = Tiny()
    trainer.fit(model, _loader(), _loader())
    actors, handles = _actor_ids(trainer), _handles(trainer)
    assert trainer.validate(model, _loader(), verbose=False)[0]["val_loss"] >= 0
    assert _actor_ids(trainer) == actors
    assert "test_loss" in trainer.test(model, _loader(), ckpt_path=None, verbose=False)[0]
    assert _actor_ids(trainer) == actors
    predictions = trainer.predict(model, _loader())
    assert _actor_ids(trainer) == actors
    with torch.no_grad():
        expected = [model(x) for x, _ in _loader()]
    assert all(torch.allclose(p, e) for p, e in zip(predictions, expected))
    trainer.fit(model, _loader())  # a second fit too
    assert _actor_ids(trainer) == actors and set(trainer.world_size_history) == {2}
    assert all(_alive(handles))  # idle between calls, alive
    trainer.teardown()
    assert trainer._kept.group is None
    assert not any(_alive(handles))
    trainer.teardown()  # twice is fine


def test_a_worker_lost_while_the_group_idles_is_replaced_at_the_next_call(ray_cluster,
                                                                         tmp_path):
    import ray

    trainer = pl.Trainer(num_workers=2, max_epochs=1, default_root_dir=str(tmp_path),
                         logger=False, enable_progress_bar=False, enable_checkpointing=False)
    model = Tiny()
    trainer.fit(model, _loader())
    before = _actor_ids(trainer)
    ray.kill(trainer._kept.group.workers[1].actor, no_restart=True)
    results = trainer.test(model, _loader(), ckpt_path=None, verbose=False)
    assert "test_loss" in results[0]
    after, handles = _actor_ids(trainer), _handles(trainer)
    assert after != before and len(after) == 2
    trainer.teardown()
    assert not any(_alive(handles))
