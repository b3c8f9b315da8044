"""``FSDPStrategy`` (issue 16): FSDP2 on the strategy seam.

The distributed tests run the strategy in a 2-process gloo group on loopback without Ray
(``torch.multiprocessing`` fork, as ``test_strategy_seam`` does): each rank holds about half the
parameters, steps match plain training of the same global batch, accumulation windows skip the
reduce-scatter, the full state gathers equal on every rank and loads back.

Tolerance: FSDP reduce-scatters gradients (a sum over the ranks, then a division) where the
plain reference averages two losses before one backward: the same numbers summed in another
order, so parameters agree to float32 rounding (``rtol=1e-5, atol=1e-6``) after a few SGD steps,
not bit for bit.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.errors import MisconfigurationException
from ray_lit.strategies import (
    FSDPStrategy,
    Strategy,
    check_strategy,
    resolve_strategy,
    shards_state,
)
from ray_lit.strategies.fsdp import default_wrap_policy

TOL = {"rtol": 1e-5, "atol": 1e-6}


class Blocks(nn.Module):
    """Two repeated blocks (the default policy's units) and a head left to the root."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.automatic_optimization = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int = 0) -> torch.Tensor:
        x, y = batch
        out = self(x)
        self.last_output_dtype = out.dtype
        return F.mse_loss(out.float(), y)

    def validation_step(self, batch: Any, batch_idx: int = 0) -> torch.Tensor:
        return self.training_step(batch, batch_idx)


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 8, generator=gen), torch.randn(4, 1, generator=gen)


def _reference(steps: int, accumulate: int = 1) -> tuple[dict, dict]:
    """Plain single-process training on both ranks' batches (the global batch)."""
    model = Blocks(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        for micro in range(accumulate):
            losses = [model.training_step(_batch(step * accumulate + micro, r)) for r in (0, 1)]
            (sum(losses) / 2 / accumulate).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()


def _train(strategy: FSDPStrategy, model: Blocks, opt: torch.optim.Optimizer, rank: int,
           steps: int, first: int = 0, accumulate: int = 1, record: list | None = None) -> None:
    for step in range(first, first + steps):
        for micro in range(accumulate):
            last = micro == accumulate - 1
            window = strategy.no_sync() if not last else torch.enable_grad()
            with window:
                loss = strategy.call_step("training_step", _batch(step * accumulate + micro,
                                                                  rank))
                (loss / accumulate).backward()
            if record is not None and not last:
                record.append(all(p.grad is None for p in model.parameters()))
        opt.step()
        opt.zero_grad()


def _sharded(rank: int, world: int = 2, **options: Any) -> tuple[FSDPStrategy, Blocks, Any]:
    strategy = FSDPStrategy(**options)
    strategy.connect(global_rank=rank, world_size=world, local_rank=rank, node_rank=0,
                     device=torch.device("cpu"))
    model = Blocks(seed=rank)  # different on each rank: setup_module starts them from rank 0's
    strategy.setup_module(model)
    return strategy, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _scenario_training(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FSDPModule

    strategy, model, opt = _sharded(rank)
    out: dict[str, Any] = {
        "units": sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule)),
        "local": sum(p.to_local().numel() for p in model.parameters()),
        "total": sum(p.numel() for p in model.parameters()),
    }
    record: list[bool] = []
    _train(strategy, model, opt, rank, steps=2, accumulate=2, record=record)
    out["no_sync_left_grads_unreduced"] = record
    _train(strategy, model, opt, rank, steps=1, first=4)  # batches 4, 5 (no accumulation)
    out["state"] = strategy.lightning_module_state_dict(model)
    out["optimizer"] = strategy.optimizer_state(opt)
    with torch.no_grad():
        out["val"] = float(strategy.call_step("validation_step", _batch(9, 0)))
    # round trip: the full state into a freshly sharded model and optimizer, one more step
    # on both, the same result
    fresh_strategy, fresh, fresh_opt = _sharded(rank)
    fresh_strategy.load_model_state_dict(fresh, out["state"])
    fresh_strategy.load_optimizer_state_dict(fresh_opt, out["optimizer"])
    out["reloaded"] = fresh_strategy.lightning_module_state_dict(fresh)
    _train(strategy, model, opt, rank, steps=1, first=7)
    _train(fresh_strategy, fresh, fresh_opt, rank, steps=1, first=7)
    out["continued"] = strategy.lightning_module_state_dict(model)
    out["fresh_continued"] = fresh_strategy.lightning_module_state_dict(fresh)
    # the fault-tolerance writer's overlapped host copy of rank 0's part: the gathered tensors
    # are fresh, so they are copied at the boundary, none deferred into the next step
    from ray_lit.checkpoint.host_copy import HostSnapshot

    snapshot = HostSnapshot()
    captured = snapshot.capture({"state_dict": strategy.lightning_module_state_dict(model),
                                 "optimizer_states": [strategy.optimizer_state(opt)]}, [opt])
    out["deferred"] = len(snapshot._pending)
    _train(strategy, model, opt, rank, steps=1, first=8)  # changes every shard
    out["captured"] = captured["state_dict"]
    out["after_capture"] = strategy.lightning_module_state_dict(model)
    snapshot.release()
    return out


def _scenario_options(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    out: dict[str, Any] = {}
    # bf16 mixed precision: the forward computes in bfloat16, the shards stay float32
    strategy, model, opt = _sharded(rank, mixed_precision="bf16-mixed")
    _train(strategy, model, opt, rank, steps=2)
    out["bf16_output"] = str(model.last_output_dtype)
    out["bf16_param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    out["bf16_state"] = strategy.lightning_module_state_dict(model)
    # cpu_offload on CPU workers: accepted, nothing to move (FSDP's policy needs a GPU)
    strategy, model, opt = _sharded(rank, cpu_offload=True)
    _train(strategy, model, opt, rank, steps=1)
    out["offload_state"] = strategy.lightning_module_state_dict(model)
    # gradient clipping over sharded gradients (the loop's clip_gradients): the global norm
    strategy, model, opt = _sharded(rank)
    strategy.call_step("training_step", _batch(0, rank)).backward()
    out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1e-3))
    out["clipped_norm"] = float(torch.nn.utils.get_total_norm(
        [p.grad for p in model.parameters()]).full_tensor())
    # a policy by class: every Linear is a unit (the head too)
    strategy, model, _ = _sharded(rank, auto_wrap_policy={nn.Linear})
    out["class_units"] = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))
    # a callable policy
    strategy, model, _ = _sharded(rank, auto_wrap_policy=lambda m: m is not None and
                                  isinstance(m, nn.Sequential))
    out["callable_units"] = sorted(n for n, m in model.named_modules()
                                   if isinstance(m, FSDPModule))
    # the user's configure_model sharded a block itself: no policy on top of it
    user = Blocks(seed=0)
    fully_shard(user.body[0])
    strategy = FSDPStrategy()
    strategy.connect(global_rank=rank, world_size=2, local_rank=rank, node_rank=0,
                     device=torch.device("cpu"))
    strategy.setup_module(user)
    out["user_units"] = sorted(n for n, m in user.named_modules() if isinstance(m, FSDPModule))
    out["user_loss"] = float(strategy.call_step("training_step", _batch(0, 0)))
    # fully_shard of the module itself is refused (its steps are not its forward)
    whole = Blocks(seed=0)
    fully_shard(whole)
    strategy = FSDPStrategy()
    strategy.connect(global_rank=rank, world_size=2, local_rank=rank, node_rank=0,
                     device=torch.device("cpu"))
    try:
        strategy.setup_module(whole)
        out["whole"] = "accepted"
    except MisconfigurationException as err:
        out["whole"] = str(err)
    return out


def _on_rank(rank: int, port: int, scenario: str, out: dict) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    # a rank that fails leaves the other in a collective: time it out instead of hanging
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=120))
    try:
        out[rank] = globals()[scenario](rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_two_ranks(scenario: str) -> dict[int, dict[str, Any]]:
    import torch.multiprocessing as mp

    from ray_lit.worker.process_group import find_free_port

    with mp.Manager() as manager:
        out = manager.dict()
        # spawn, not fork: after earlier tests in this process ran torch's intra-op thread
        # pool, a forked child's first parallel kernel can deadlock (the pool's locks are
        # copied held); the two ranks here run real forward/backward work
        mp.start_processes(_on_rank, args=(find_free_port(), scenario, out), nprocs=2,
                           start_method="spawn")
        return dict(out)


def _scenario_all(rank: int) -> dict[str, Any]:
    """Both scenarios in one group: a spawned pair of ranks costs seconds to start."""
    return {"training": _scenario_training(rank), "options": _scenario_options(rank)}


@pytest.fixture(scope="module")
def two_ranks() -> dict[int, dict[str, Any]]:
    return _run_two_ranks("_scenario_all")


@pytest.fixture(scope="module")
def training(two_ranks) -> dict[int, dict[str, Any]]:
    return {rank: out["training"] for rank, out in two_ranks.items()}


def test_each_rank_holds_about_half_of_the_parameters(training) -> None:
    total = training[0]["total"]
    assert total == sum(p.numel() for p in Blocks().parameters())
    assert training[0]["local"] + training[1]["local"] == total
    for rank in (0, 1):
        # dim-0 chunks: a rank holds at most one row per tensor more than half
        assert abs(training[rank]["local"] - total / 2) <= 40, training[rank]["local"]
        # the default policy: the two repeated Linear blocks are units, the head is the root's
        assert training[rank]["units"] == ["body.0", "body.2"]


def test_steps_match_plain_training_of_the_global_batch(training) -> None:
    # two accumulated steps (batches 0-3), then one plain step (batch 4), as the ranks did
    state, opt_state = _reference(steps=2, accumulate=2)
    expected, expected_opt = _reference_continue(state, opt_state, first=4)
    for rank in (0, 1):
        got = training[rank]["state"]
        assert set(got) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, **TOL)
        got_opt = training[rank]["optimizer"]["state"]
        assert sorted(got_opt) == sorted(expected_opt["state"])  # by parameter index
        for idx, entry in expected_opt["state"].items():
            # full shapes, as a plain run saves them
            torch.testing.assert_close(got_opt[idx]["momentum_buffer"],
                                       entry["momentum_buffer"], **TOL)


def _reference_continue(state: dict, opt_state: dict, first: int) -> tuple[dict, dict]:
    model = Blocks(seed=0)
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(opt_state)
    losses = [model.training_step(_batch(first, r)) for r in (0, 1)]
    (sum(losses) / 2).backward()
    opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()


def test_an_accumulation_window_does_not_reduce_gradients(training) -> None:
    # inside no_sync the backward leaves the sharded gradients untouched (FSDP keeps the
    # unsharded ones until the window's last backward reduce-scatters them)
    for rank in (0, 1):
        assert training[rank]["no_sync_left_grads_unreduced"] == [True, True]


def test_the_full_state_gathers_equal_on_every_rank_and_loads_back(training) -> None:
    zero, one = training[0], training[1]
    for key in zero["state"]:
        assert type(zero["state"][key]) is torch.Tensor  # plain host tensors, not shards
        assert zero["state"][key].device.type == "cpu"
        assert torch.equal(zero["state"][key], one["state"][key])
    for idx, entry in zero["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, one["optimizer"]["state"][idx][name])
    for rank in (0, 1):
        for key, value in training[rank]["state"].items():
            assert torch.equal(training[rank]["reloaded"][key], value)
        for key, value in training[rank]["continued"].items():
            torch.testing.assert_close(training[rank]["fresh_continued"][key], value,
                                       rtol=0, atol=0)
    assert zero["val"] == one["val"]


def test_the_overlapped_host_copy_takes_the_gathered_state_at_the_boundary(training) -> None:
    for rank in (0, 1):
        out = training[rank]
        assert out["deferred"] == 0  # nothing left for the next step to race with
        for key, value in out["continued"].items():
            assert torch.equal(out["captured"][key], value), key  # the boundary's state
            assert not torch.equal(out["after_capture"][key], value), key  # then it trained


@pytest.fixture(scope="module")
def options(two_ranks) -> dict[int, dict[str, Any]]:
    return {rank: out["options"] for rank, out in two_ranks.items()}


def test_bf16_mixed_precision_computes_in_bf16_and_keeps_float32_shards(options) -> None:
    for rank in (0, 1):
        assert options[rank]["bf16_output"] == "torch.bfloat16"
        assert options[rank]["bf16_param_dtypes"] == ["torch.float32"]
    # close to float32 training of the same batches (bf16 has 8 bits of mantissa)
    expected, _ = _reference(steps=2)
    for key, value in expected.items():
        torch.testing.assert_close(options[0]["bf16_state"][key], value, rtol=0.05, atol=0.02)


def test_cpu_offload_on_cpu_workers_trains_as_without_it(options) -> None:
    expected, _ = _reference(steps=1)
    for key, value in expected.items():
        torch.testing.assert_close(options[0]["offload_state"][key], value, **TOL)


def test_gradient_clipping_sees_the_global_norm_of_sharded_gradients(options) -> None:
    model = Blocks(seed=0)
    losses = [model.training_step(_batch(0, r)) for r in (0, 1)]
    (sum(losses) / 2).backward()
    expected = float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1e-3))
    for rank in (0, 1):
        assert options[rank]["grad_norm"] == pytest.approx(expected, rel=1e-5)
        assert options[rank]["clipped_norm"] == pytest.approx(1e-3, rel=1e-3)


def test_wrap_policies_by_class_by_callable_and_the_users_own(options) -> None:
    for rank in (0, 1):
        assert options[rank]["class_units"] == ["body.0", "body.2", "head"]
        assert options[rank]["callable_units"] == ["body"]
        assert options[rank]["user_units"] == ["body.0"]  # not wrapped again by the policy
        assert "fully_shard its layers only" in options[rank]["whole"]
    assert options[0]["user_loss"] == options[1]["user_loss"]


# --- one process ---------------------------------------------------------------------------------

def test_fsdp_is_a_strategy_name_and_stays_inside_the_protocol() -> None:
    check_strategy("fsdp")
    assert isinstance(resolve_strategy("fsdp", distributed=True), FSDPStrategy)
    assert shards_state("fsdp") and shards_state(FSDPStrategy())
    assert not shards_state("ddp") and not shards_state(None)
    protocol = {name for name in vars(Strategy) if not name.startswith("_")}
    extra = {name for name in vars(FSDPStrategy) if not name.startswith("_")} - protocol
    assert not extra, f"FSDPStrategy adds {extra} outside the Strategy protocol"


def test_bad_options_are_refused_when_the_trainer_is_built() -> None:
    with pytest.raises(MisconfigurationException, match="state_dict_type='local'"):
        FSDPStrategy(state_dict_type="local")
    with pytest.raises(MisconfigurationException, match="mixed_precision='fp8'"):
        FSDPStrategy(mixed_precision="fp8")
    with pytest.raises(MisconfigurationException, match="auto_wrap_policy"):
        FSDPStrategy(auto_wrap_policy={"Linear"})
    # peer snapshots: FSDP's shards are kept by ring neighbours (checkpoint.shard_ring); a
    # sharded strategy ray_lit does not know is refused
    pl.Trainer(strategy="fsdp", num_workers=2, snapshot_every_n_steps=5)
    pl.Trainer(strategy=FSDPStrategy(), num_workers=2, snapshot_every_n_steps=5)
    pl.Trainer(strategy="ddp", num_workers=2, snapshot_every_n_steps=5)

    from ray_lit.strategies.parallel import ParallelStrategy

    class OtherSharded(ParallelStrategy):
        shards_state = True

    with pytest.raises(MisconfigurationException, match="snapshot_every_n_steps with strategy"):
        pl.Trainer(strategy=OtherSharded(), num_workers=2, snapshot_every_n_steps=5)


def test_manual_optimisation_gives_every_parameter_owner_its_own_unit() -> None:
    from ray_lit.strategies.fsdp import manual_units

    model = Blocks()
    # no unit yet: each module owning parameters, innermost first (the root keeps none)
    assert manual_units(model) == [model.body[0], model.body[2], model.head]
    model.scale = nn.Parameter(torch.ones(1))  # on the module itself: no unit can take it
    with pytest.raises(MisconfigurationException, match=r"\['scale'\].*Move them"):
        manual_units(model)
    one = Blocks()
    one.automatic_optimization = False
    FSDPStrategy().setup_module(one)  # a world of one: trains unwrapped, no refusal


class Plain(nn.Module):
    """No ``reset_parameters``: a meta tensor here cannot be materialised."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2))


def test_meta_device_parameters_are_materialised_like_an_eager_build() -> None:
    with torch.device("meta"):
        model = Blocks(seed=5)  # seeds the RNG, draws nothing on the meta device
    torch.manual_seed(5)
    FSDPStrategy().setup_module(model)  # one process: reset_parameters, module by module
    eager = Blocks(seed=5)
    for key, value in eager.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with torch.device("meta"):
        bad = nn.Sequential(Plain())
    with pytest.raises(MisconfigurationException, match=r"meta device.*\['Plain'\]"):
        FSDPStrategy().setup_module(bad)


def test_the_default_policy_picks_repeated_blocks_and_large_children() -> None:
    model = Blocks()
    assert default_wrap_policy(model, 2) == {model.body[0], model.body[2]}

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.big = nn.Linear(32, 32)  # most of the parameters: a unit
            self.small = nn.Linear(2, 2)  # a few: stays with the root

    wide = Wide()
    assert default_wrap_policy(wide, 2) == {wide.big}


class ConfiguredModel(pl.LightningModule):
    """Builds its layer in ``configure_model`` (idempotent, as 2.x asks)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer: nn.Module | None = None
        self.configured = 0

    def configure_model(self) -> None:
        self.configured += 1
        if self.layer is None:
            self.layer = nn.Linear(4, 1)
            self.initial = self.layer.weight.detach().clone()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=gen),
                                    torch.randn(16, 1, generator=gen)), batch_size=4)


def test_in_process_fsdp_is_a_world_of_one_and_trains_like_one_device(make_trainer) -> None:
    torch.manual_seed(0)
    plain = Blocks()
    runs = {}
    for name in ("single_device", "fsdp"):
        model = _LitBlocks()
        model.load_state_dict(plain.state_dict(), strict=False)
        trainer = make_trainer(strategy=name, max_epochs=2)
        trainer.fit(model, train_dataloaders=_block_loader())
        runs[name] = model.state_dict()
        if name == "fsdp":
            assert isinstance(trainer.strategy, FSDPStrategy)
            assert all(type(p) is nn.Parameter for p in model.parameters())  # nothing sharded
    for key, value in runs["single_device"].items():
        assert torch.equal(runs["fsdp"][key], value)


class _LitBlocks(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Blocks()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net.training_step(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _block_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(16, 8, generator=gen),
                                    torch.randn(16, 1, generator=gen)), batch_size=4)


def test_configure_model_builds_layers_that_train_and_reload(make_trainer, tmp_path) -> None:
    model = ConfiguredModel()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, train_dataloaders=_loader())
    assert model.configured == 1 and model.layer is not None
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(trained["layer.weight"], model.initial)  # it trained
    path = tmp_path / "configured.ckpt"
    trainer.save_checkpoint(str(path))
    loaded = ConfiguredModel.load_from_checkpoint(str(path))
    assert loaded.configured == 1  # load_from_checkpoint built the layer to load into
    for key, value in trained.items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_configure_model_runs_before_the_driver_loads_a_workers_weights() -> None:
    from ray_lit.driver.results import apply_final_state
    from ray_lit.messages import FinalState

    worker_side = ConfiguredModel()
    worker_side.configure_model()
    with torch.no_grad():
        worker_side.layer.weight.fill_(0.5)
    state = FinalState(state_dict=worker_side.state_dict(), hparams=None, callback_metrics={},
                       logged_metrics={}, pbar={}, progress={}, should_stop=False, callbacks={},
                       num_training_batches=0, num_val_batches=[], num_test_batches=[],
                       results=None, interrupted=False)
    driver_side = ConfiguredModel()  # configure_model never ran here
    apply_final_state(pl.Trainer(logger=False, enable_progress_bar=False), driver_side, None,
                      state, fitted=False)
    assert driver_side.configured == 1
    assert torch.equal(driver_side.layer.weight, torch.full((1, 4), 0.5))


# --- the fault-tolerance writer: every rank joins a sharded gather --------------------------------

class _GatherRecorder(Strategy):
    def __init__(self, sharded: bool) -> None:
        super().__init__()
        self.shards_state = sharded
        self.calls: list[str] = []

    def lightning_module_state_dict(self, module):
        self.calls.append("module")
        return super().lightning_module_state_dict(module)

    def optimizer_state(self, optimizer):
        self.calls.append("optimizer")
        return super().optimizer_state(optimizer)


def _writer_trainer(strategy: Strategy) -> Any:
    module = nn.Linear(2, 2)
    optimizers = [torch.optim.SGD(module.parameters(), lr=0.1),
                  torch.optim.SGD(module.parameters(), lr=0.2)]
    progress = types.SimpleNamespace(state_dict=lambda: {"epoch": 0}, batches_done=1)
    host = types.SimpleNamespace(sampler_state=lambda done: None, strategy=strategy)
    trainer = types.SimpleNamespace(strategy=strategy, lightning_module=module,
                                    optimizers=optimizers, num_training_batches=4, global_step=1)
    # a stand-in loop context (what the writer takes): counters and host, and the trainer
    return types.SimpleNamespace(trainer=trainer, strategy=strategy, progress=progress,
                                 host=host)


@pytest.mark.parametrize("sharded", [True, False])
def test_a_non_writing_rank_joins_the_gather_only_for_a_sharded_strategy(sharded) -> None:
    from ray_lit.checkpoint.writer import CheckpointWriter

    writer = CheckpointWriter("file:///unused", every_n_steps=1)
    writer._rank, writer._world_size = 1, 2
    strategy = _GatherRecorder(sharded)
    state = writer._rank_state(_writer_trainer(strategy))
    assert "state_dict" not in state  # rank 1's own part stays small
    # the same calls in the same order as rank 0's dump_checkpoint
    assert strategy.calls == (["module", "optimizer", "optimizer"] if sharded else [])


def test_rank_zero_does_not_start_a_sharded_gather_alone_to_prepare_buffers() -> None:
    from ray_lit.checkpoint.writer import CheckpointWriter

    writer = CheckpointWriter("file:///unused", every_n_steps=1)
    writer._rank, writer._world_size = 0, 2
    strategy = _GatherRecorder(sharded=True)
    writer._prepare(_writer_trainer(strategy))
    assert strategy.calls == [] and writer._thread is None
    replicated = _GatherRecorder(sharded=False)
    writer = CheckpointWriter("file:///unused", every_n_steps=1)
    writer._prepare(_writer_trainer(replicated))
    writer._thread.join()
    assert replicated.calls == ["module", "optimizer", "optimizer"]
