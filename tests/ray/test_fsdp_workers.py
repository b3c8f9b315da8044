"""``strategy="fsdp"`` on Ray workers (issue 16): FSDP2 over 2 CPU workers (gloo) trains like
DDP, hands the driver the full trained weights, writes ordinary checkpoints, and recovers a
lost rank exactly from its full-state fault-tolerance checkpoints."""

from __future__ import annotations

import os
import sys

import cloudpickle
import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.callbacks import ModelCheckpoint
from ray_lit.errors import MisconfigurationException

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class BlockNet(pl.LightningModule):
    """Layers built in ``configure_model`` (2.x), Adam, a shuffled loader."""

    def __init__(self, kill_marker: str = "", kill_step: int = 5) -> None:
        super().__init__()
        self.net: nn.Module | None = None
        self.kill_marker = kill_marker
        self.kill_step = kill_step
        self.configured = 0  # calls on this copy of the module (the driver's, a worker's)

    def configure_model(self) -> None:
        self.configured += 1
        if self.net is not None:
            return
        # each worker builds its layers from its own RNG state: FSDPStrategy starts every
        # rank from rank 0's before sharding, as DDP does
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                 nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        if (self.kill_marker and self.global_rank == 1 and self.global_step == self.kill_step
                and not os.path.exists(self.kill_marker)):
            open(self.kill_marker, "w").close()
            os._exit(1)  # the worker process dies: no exception, no cleanup
        # the share of the parameters this rank holds between steps (about 1/2 under FSDP on
        # 2 workers, all of them under DDP), measured before the forward gathers any unit
        held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                   for p in self.parameters())
        self.log("held_fraction", held / sum(p.numel() for p in self.parameters()))
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch  # through FSDP's root too: the parameters are sharded between steps
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)


def _val_data() -> DataLoader:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _fit(tmp_path, name: str, strategy: str, num_workers: int = 2, max_epochs: int = 2,
         ckpt_path: str | None = None, **model_args):
    pl.seed_everything(11)
    model = BlockNet(**model_args)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / name / "ckpts"), save_last=True)
    trainer = pl.Trainer(num_workers=num_workers, strategy=strategy, max_epochs=max_epochs,
                         max_failures=2, storage_path=str(tmp_path / "runs"), run_name=name,
                         checkpoint_every_n_steps=2, callbacks=[checkpoint],
                         enable_progress_bar=False, enable_model_summary=False, logger=False)
    trainer.fit(model, _data(), _val_data(), ckpt_path=ckpt_path)
    return model, trainer


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fsdp")
    return {"tmp": tmp_path, "ddp": _fit(tmp_path, "ddp", "ddp"),
            "fsdp": _fit(tmp_path, "fsdp", "fsdp")}


def test_fsdp_on_two_workers_ends_close_to_ddp(runs) -> None:
    (ddp, ddp_trainer), (fsdp, fsdp_trainer) = runs["ddp"], runs["fsdp"]
    assert fsdp_trainer.global_step == ddp_trainer.global_step == 12
    # rank 0 held 705 of the 1377 parameters (dim-0 chunks of each tensor); DDP all of them
    assert float(ddp_trainer.callback_metrics["held_fraction"]) == 1.0
    assert float(fsdp_trainer.callback_metrics["held_fraction"]) == pytest.approx(705 / 1377)
    # same seed, same data, same init (rank 0's): FSDP's reduce-scatter sums the gradients
    # in another order than DDP's all-reduce, float32 rounding apart after 12 Adam steps
    for key, value in ddp.state_dict().items():
        torch.testing.assert_close(fsdp.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    for metric in ("train_loss", "val_loss"):  # validation and its sanity check ran too
        assert abs(float(fsdp_trainer.callback_metrics[metric])
                   - float(ddp_trainer.callback_metrics[metric])) < 1e-4, metric


def test_the_driver_holds_the_full_trained_layers_configure_model_built(runs) -> None:
    fsdp, _ = runs["fsdp"]
    # the module went to the workers without layers: each worker's configure_model built
    # them (training ran), and the driver's own call built them here before the load
    assert fsdp.configured == 1 and fsdp.net is not None
    weights = fsdp.state_dict()
    assert all(type(v) is torch.Tensor for v in weights.values())  # full, not shards
    assert weights["net.0.weight"].shape == (32, 8)


def test_last_ckpt_is_an_ordinary_checkpoint_load_from_checkpoint_reads(runs) -> None:
    fsdp, trainer = runs["fsdp"]
    last = trainer.checkpoint_callback.last_model_path
    assert last and os.path.exists(last)
    loaded = BlockNet.load_from_checkpoint(last)
    for key, value in fsdp.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 12
    # the optimizer state is the full one, by parameter index, as a plain run saves it
    exp_avg = state["optimizer_states"][0]["state"][0]["exp_avg"]
    assert type(exp_avg) is torch.Tensor and exp_avg.shape == (32, 8)


def test_validate_on_fsdp_workers_matches_ddp(runs) -> None:
    fsdp, fsdp_trainer = runs["fsdp"]
    ddp, ddp_trainer = runs["ddp"]
    # the same (driver-side, full) weights in both: FSDP shards them on the workers again
    fsdp_result = fsdp_trainer.validate(fsdp, _val_data(), verbose=False)
    ddp_result = ddp_trainer.validate(fsdp, _val_data(), verbose=False)
    assert fsdp_result[0]["val_loss"] == pytest.approx(ddp_result[0]["val_loss"], rel=1e-5)
    assert fsdp.configured >= 1 and fsdp.net is not None


def test_a_killed_rank_resumes_exactly_from_full_state_checkpoints(runs) -> None:
    tmp_path = runs["tmp"]
    reference, ref_trainer = runs["fsdp"]
    marker = str(tmp_path / "killed")
    model, trainer = _fit(tmp_path, "fsdp_killed", "fsdp", kill_marker=marker)
    assert os.path.exists(marker), "the kill did not happen"
    assert trainer.num_restarts == 1
    assert trainer.global_step == ref_trainer.global_step == 12
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_a_two_worker_fsdp_checkpoint_resumes_at_one_worker(runs) -> None:
    tmp_path = runs["tmp"]
    _, trainer = runs["fsdp"]
    last = trainer.checkpoint_callback.last_model_path
    # one worker: nothing to shard; the full state (module and Adam) loads as it is, exactly
    # as a DDP run of one worker loads it; one more epoch of 12 batches
    fsdp, fsdp_trainer = _fit(tmp_path, "resume_fsdp_1", "fsdp", num_workers=1, max_epochs=3,
                              ckpt_path=last)
    ddp, ddp_trainer = _fit(tmp_path, "resume_ddp_1", "ddp", num_workers=1, max_epochs=3,
                            ckpt_path=last)
    assert fsdp_trainer.global_step == ddp_trainer.global_step == 12 + 12
    for key, value in ddp.state_dict().items():
        assert torch.equal(fsdp.state_dict()[key], value), key


def test_an_unknown_strategy_fails_before_any_worker_starts() -> None:
    with pytest.raises(MisconfigurationException, match=r"strategy='fsdp2'.*'fsdp'"):
        pl.Trainer(strategy="fsdp2", num_workers=2)
