"""0.9-era optimizer wrappers whose ``step`` takes no closure (bolts' ``LARSWrapper``) step,
also with an LR scheduler attached: torch's scheduler replaces ``optimizer.step`` by a function
whose signature shows the class's ``step(self)``, which must not read as "takes a closure"."""

from __future__ import annotations

import torch

from ray_lit.core.module import step_optimizer


class NoClosureWrapper:
    """Wraps an optimizer the way bolts 0.2.2's ``LARSWrapper`` does (``step(self)``)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optim = optimizer
        self.steps = 0

    @property
    def __class__(self):  # noqa: D105 (LARSWrapper poses as the wrapped optimizer's class)
        return self.optim.__class__

    @property
    def param_groups(self):
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    @torch.no_grad()
    def step(self):
        self.steps += 1
        self.optim.step()


def _wrapped() -> tuple[NoClosureWrapper, torch.nn.Parameter]:
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.ones(2)
    return NoClosureWrapper(torch.optim.SGD([weight], lr=0.5)), weight


def test_a_closureless_wrapper_steps_with_a_scheduler_attached():
    wrapper, weight = _wrapped()
    torch.optim.lr_scheduler.StepLR(wrapper, step_size=1)  # patches wrapper.step
    step_optimizer(wrapper, closure=lambda: None)
    assert wrapper.steps == 1 and torch.allclose(weight.detach(), torch.full((2,), 0.5))


def test_a_closureless_wrapper_steps_without_a_scheduler():
    wrapper, _ = _wrapped()
    step_optimizer(wrapper, closure=lambda: None)
    assert wrapper.steps == 1
