"""``DDPStrategy.setup_module`` fixes DDP's bucket layout before the first step, so a resumed
run's DDP reduces its first step with the layout the uninterrupted run had (bit-identical
resume at more than two ranks; the end-to-end check is tests/ray/test_resume_bit_identical_4.py).

A one-rank gloo group in this process stands in for the workers' group; the strategy is told
it is one of two ranks so that it wraps the module in DDP.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ray_lit.strategies.ddp as ddp_module
from ray_lit.strategies import DDPStrategy
from ray_lit.worker.process_group import find_free_port


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


class Net(nn.Module):
    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 3, sparse=sparse)
        self.body = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def training_step(self, idx: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.body(self.embed(idx))).sum()


def _strategy(**kwargs) -> DDPStrategy:
    strategy = DDPStrategy(**kwargs)
    strategy.connect(global_rank=0, world_size=2, local_rank=0, node_rank=0,
                     device=torch.device("cpu"))
    return strategy


def test_the_first_step_already_reduces_with_the_rebuilt_layout(one_rank_group) -> None:
    strategy = _strategy()
    net = Net()
    strategy.setup_module(net)
    strategy.call_step("training_step", torch.tensor([1, 2])).backward()
    data = strategy._ddp._get_ddp_logging_data()
    # without the layout pass DDP only rebuilds after this first backward (has_rebuilt 0 here)
    assert data["has_rebuilt_buckets"] == 1
    # reverse parameter order: body.2.bias, body.2.weight, body.0.bias, body.0.weight, embed
    assert data["rebuilt_per_bucket_param_indices"] == "4 3 2 1 0"
    # the pass's zero gradients were thrown away: this step's gradients are the step's own
    expected = Net()
    expected.load_state_dict(net.state_dict())
    expected.training_step(torch.tensor([1, 2])).backward()
    for got, want in zip(net.parameters(), expected.parameters()):
        assert (got.grad is None) == (want.grad is None)
        if want.grad is not None:
            assert torch.equal(got.grad, want.grad)


def test_the_layout_pass_leaves_existing_gradients_untouched(one_rank_group) -> None:
    net = Net()
    net.body[0].weight.grad = torch.full_like(net.body[0].weight, 3.0)
    held = net.body[0].weight.grad
    _strategy().setup_module(net)
    assert net.body[0].weight.grad is held and torch.equal(held, torch.full_like(held, 3.0))
    assert net.body[2].weight.grad is None and net.embed.weight.grad is None


@pytest.mark.parametrize("kwargs, sparse", [
    ({"find_unused_parameters": True}, False),  # DDP never rebuilds its buckets then
    ({"static_graph": True}, False),  # its first backward records the graph: not a zero pass
    ({}, True),  # a sparse gradient cannot come from the dense zero pass
])
def test_the_layout_pass_is_skipped_where_it_does_not_apply(one_rank_group, monkeypatch, kwargs,
                                                            sparse) -> None:
    calls = []
    monkeypatch.setattr(ddp_module, "_settle_bucket_layout", calls.append)
    strategy = _strategy(**kwargs)
    strategy.setup_module(Net(sparse=sparse))
    assert strategy._ddp is not None and calls == []
    strategy.call_step("training_step", torch.tensor([1, 2])).backward()  # DDP still trains


def test_the_layout_pass_runs_for_a_plain_ddp_setup(one_rank_group, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(ddp_module, "_settle_bucket_layout", calls.append)
    strategy = _strategy()
    strategy.setup_module(Net())
    assert calls == [strategy._ddp]
