"""The strategy seam: ``Trainer(strategy=...)`` names or passes a ``Strategy``; the loop
wraps the module, runs steps, skips gradient sync, agrees on stops and collects checkpoint
state only through it, so a new strategy plugs in without touching the loop."""

from __future__ import annotations

import datetime

import pytest
import torch
from doubles import DeterministicModel

import ray_lit as pl
from ray_lit.errors import MisconfigurationException
from ray_lit.strategies import (
    DDPStrategy,
    SingleDeviceStrategy,
    Strategy,
    check_strategy,
    resolve_strategy,
)


class RecordingStrategy(SingleDeviceStrategy):
    """A strategy of the user's own: records what the loop asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def setup_module(self, module, find_unused_parameters=False, sync_batchnorm=False):
        self.calls.append("setup_module")
        super().setup_module(module, find_unused_parameters, sync_batchnorm)

    def call_step(self, name, *args):
        self.calls.append(name)
        return super().call_step(name, *args)

    def no_sync(self):
        self.calls.append("no_sync")
        return super().no_sync()

    def agree_on_rank_zero(self, flag, needed=True):
        self.calls.append("agree_on_rank_zero")
        return super().agree_on_rank_zero(flag, needed)

    def lightning_module_state_dict(self, module):
        self.calls.append("lightning_module_state_dict")
        return super().lightning_module_state_dict(module)

    def optimizer_state(self, optimizer):
        self.calls.append("optimizer_state")
        return super().optimizer_state(optimizer)

    def load_model_state_dict(self, module, state_dict, strict=True):
        self.calls.append("load_model_state_dict")
        return super().load_model_state_dict(module, state_dict, strict)

    def load_optimizer_state_dict(self, optimizer, state_dict):
        self.calls.append("load_optimizer_state_dict")
        super().load_optimizer_state_dict(optimizer, state_dict)


def test_an_unknown_strategy_fails_when_the_trainer_is_built() -> None:
    with pytest.raises(MisconfigurationException, match=r"strategy='deepspeed'.*'ddp'"):
        pl.Trainer(strategy="deepspeed")
    with pytest.raises(MisconfigurationException, match="Strategy object"):
        check_strategy(object())


def test_the_in_process_strategy_is_one_device_and_its_collectives_are_identities(
        make_trainer) -> None:
    trainer = make_trainer()
    strategy = trainer.strategy
    assert isinstance(strategy, SingleDeviceStrategy)
    assert strategy.root_device == torch.device("cpu") and strategy.world_size == 1
    assert strategy.is_global_zero and strategy.broadcast({"a": 1}) == {"a": 1}
    assert torch.equal(strategy.all_gather(torch.tensor([1.0, 2.0])), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(strategy.reduce(torch.tensor(3.0), "sum"), torch.tensor(3.0))
    assert strategy.reduce_boolean_decision(True) is True
    strategy.barrier("anywhere")


def test_names_resolve_to_the_strategy_a_rank_runs() -> None:
    assert isinstance(resolve_strategy("auto", distributed=True), DDPStrategy)
    assert isinstance(resolve_strategy(None, distributed=False), SingleDeviceStrategy)
    assert isinstance(resolve_strategy("ddp", distributed=True), DDPStrategy)
    own = DDPStrategy(find_unused_parameters=True)
    assert resolve_strategy(own, distributed=True) is own


def test_the_loop_goes_through_the_strategy_it_was_given(make_trainer, tmp_path) -> None:
    strategy = RecordingStrategy()
    trainer = make_trainer(strategy=strategy, max_epochs=2, limit_train_batches=4,
                           accumulate_grad_batches=2, num_sanity_val_steps=0)
    assert trainer.strategy is strategy
    model = DeterministicModel()
    trainer.fit(model)
    assert strategy.calls[0] == "setup_module"
    assert strategy.calls.count("training_step") == 8
    assert strategy.calls.count("no_sync") == 4  # the first batch of each accumulation window
    assert "agree_on_rank_zero" in strategy.calls  # the stop decision of each epoch
    path = tmp_path / "seam.ckpt"
    trainer.save_checkpoint(str(path))
    assert {"lightning_module_state_dict", "optimizer_state"} <= set(strategy.calls)

    strategy.calls.clear()
    resumed = make_trainer(strategy=strategy, max_epochs=3, limit_train_batches=4,
                           accumulate_grad_batches=2, num_sanity_val_steps=0)
    resumed.fit(DeterministicModel(), ckpt_path=str(path))
    assert {"load_model_state_dict", "load_optimizer_state_dict"} <= set(strategy.calls)
    assert resumed.global_step == trainer.global_step + 2


def test_every_strategy_method_is_in_the_documented_base() -> None:
    protocol = {name for name in vars(Strategy) if not name.startswith("_")}
    for cls in (SingleDeviceStrategy, DDPStrategy):
        extra = {name for name in vars(cls) if not name.startswith("_")} - protocol - {
            "strategy_name", "find_unused_parameters", "static_graph"}
        assert not extra, f"{cls.__name__} adds {extra} outside the Strategy protocol"


def _collectives_on_rank(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    # a rank that fails leaves the other in a collective: time it out instead of hanging
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        strategy = DDPStrategy()
        strategy.connect(global_rank=rank, world_size=2, local_rank=rank, node_rank=0,
                         device=torch.device("cpu"))
        value = torch.tensor(float(rank + 1))
        out[rank] = {
            "broadcast": strategy.broadcast({"from": rank}),
            "gather": strategy.all_gather(value).tolist(),
            "sum": float(strategy.reduce(value, "sum")),
            "mean": float(strategy.reduce(value, "mean")),
            "all": strategy.reduce_boolean_decision(rank == 0, all=True),
            "any": strategy.reduce_boolean_decision(rank == 0, all=False),
            "rank0": strategy.agree_on_rank_zero(rank == 0),
        }
        strategy.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_collectives_agree_across_two_gloo_ranks() -> None:
    import torch.multiprocessing as mp

    from ray_lit.worker.process_group import find_free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_collectives_on_rank, args=(find_free_port(), out), nprocs=2,
                           start_method="spawn")
        results = dict(out)
    for rank in (0, 1):
        assert results[rank] == {"broadcast": {"from": 0}, "gather": [1.0, 2.0], "sum": 3.0,
                                 "mean": 1.5, "all": False, "any": True, "rank0": True}
