"""One worker group per Trainer: fit, validate, test and predict on one Trainer run on the same
actors and process group; ``trainer.teardown()`` releases them; a worker lost while the group
idles is replaced at the next call."""

from __future__ import annotations

import gc
import sys
import time

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


# --- the warm pool: a Trainer that goes leaves its workers to the next one ------------------
class Seeded(Tiny):
    """Dropout and a shuffled loader: a run that inherited RNG or optimizer state from the
    workers' earlier run would end with other weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3),
                                         torch.nn.Linear(8, 1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def _shuffled() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)


def _fit_seeded(tmp_path, name: str, workers: int = 2) -> tuple[pl.Trainer, Seeded]:
    pl.seed_everything(9)
    model = Seeded()
    trainer = pl.Trainer(num_workers=workers, max_epochs=2, default_root_dir=str(tmp_path),
                         run_name=name, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False)
    trainer.fit(model, _shuffled())
    return trainer, model


def test_a_gone_trainers_workers_start_the_next_trainer_with_nothing_of_its_run(ray_cluster,
                                                                                tmp_path):
    from ray_lit.driver.pool import POOL

    POOL.drain()
    first, first_model = _fit_seeded(tmp_path, "first")
    actors = _actor_ids(first)
    taken = POOL.taken_total
    del first, first_model  # the module refers to its Trainer
    gc.collect()
    assert len(POOL) == 1  # parked, not killed
    second, model = _fit_seeded(tmp_path, "second")
    assert _actor_ids(second) == actors and POOL.taken_total == taken + 1
    second.teardown()  # an explicit release never parks
    assert len(POOL) == 0
    fresh, reference = _fit_seeded(tmp_path, "fresh")  # on new workers
    assert _actor_ids(fresh) != actors
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    fresh.teardown()


def test_another_shape_releases_the_parked_workers_and_an_idle_pool_empties(ray_cluster,
                                                                            tmp_path):
    from ray_lit.driver.pool import POOL

    POOL.drain()
    trainer, model = _fit_seeded(tmp_path, "two")
    handles = _handles(trainer)
    del trainer, model
    gc.collect()
    assert len(POOL) == 1
    one, model = _fit_seeded(tmp_path, "one", workers=1)  # another shape: they give way
    assert len(POOL) == 0 and not any(_alive(handles))
    handles = _handles(one)
    saved = POOL.idle_s
    POOL.idle_s = 0.5
    try:
        del one, model
        gc.collect()
        assert len(POOL) == 1
        deadline = time.monotonic() + 30
        while len(POOL) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(POOL) == 0 and not any(_alive(handles))
    finally:
        POOL.idle_s = saved


def test_a_group_of_an_earlier_ray_session_is_never_called(ray_cluster, tmp_path):
    """A Trainer kept alive across ``ray.shutdown()`` / ``ray.init()`` (a notebook, a test
    suite) holds handles of dead actors: the next Trainer neither adopts nor calls them, and
    the old Trainer going does not park them."""
    import ray

    from ray_lit.driver.pool import POOL

    POOL.drain()
    old, old_model = _fit_seeded(tmp_path, "old")
    ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    new, _ = _fit_seeded(tmp_path, "new")  # the same shape: would adopt the old group
    assert new.global_step == old.global_step
    parked = POOL.parked_total
    del old, old_model
    gc.collect()
    assert POOL.parked_total == parked and len(POOL) == 0
    new.teardown()
