"""HostSnapshot: the checkpoint copy that overlaps the next forward/backward."""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from ray_lit.distributed.snapshot import HostSnapshot


def _model_and_adam() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, opt)  # Adam state exists
    return model, opt


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"state_dict": dict(model.state_dict()), "optimizer_states": [opt.state_dict()],
            "loops": {"step": 3, "rng": torch.get_rng_state()}}


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree


def _assert_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, list):
        for x, y in zip(a, b, strict=True):
            _assert_equal(x, y)
    else:
        assert a == b


def test_buffers_are_copied_at_once_parameters_after_the_boundary() -> None:
    model, opt = _model_and_adam()
    snap = HostSnapshot()
    host = snap.capture(_state(model, opt), [opt])
    weight = model[0].weight
    # a forward changes BatchNorm's running stats: the snapshot already holds the old ones
    running_before = model[1].running_mean.clone()
    assert torch.equal(host["state_dict"]["1.running_mean"], running_before)
    # the parameter and Adam's moments are pending: their buffers are not filled yet
    pending = {src.untyped_storage().data_ptr() for _, src, _ in snap._pending}
    assert weight.untyped_storage().data_ptr() in pending
    assert model[1].running_mean.untyped_storage().data_ptr() not in pending
    assert snap.copy_deferred()
    assert torch.equal(host["state_dict"]["0.weight"], weight)
    assert torch.equal(host["optimizer_states"][0]["state"][0]["exp_avg"],
                       opt.state[weight]["exp_avg"])


def test_an_optimizer_step_waits_for_the_copy_and_the_copy_is_of_the_boundary() -> None:
    model, opt = _model_and_adam()
    expected = _clone(_state(model, opt))
    snap = HostSnapshot()
    host = snap.capture(_state(model, opt), [opt])
    stepped = threading.Event()

    def late_copy() -> None:
        time.sleep(0.3)
        assert not stepped.is_set()  # the step below is still held back
        snap.copy_deferred()

    copier = threading.Thread(target=late_copy)
    copier.start()
    model(torch.randn(16, 4)).pow(2).mean().backward()  # overlaps the copy
    opt.step()  # the fence: returns only once the copy is done
    stepped.set()
    copier.join()
    assert snap.fence_wait_s and snap.fence_wait_s[0] > 0.1
    # the step happened after the copy: the snapshot is the state at the boundary
    _assert_equal(host, expected)
    assert not torch.equal(host["state_dict"]["0.weight"], model[0].weight)
    # the fence removed itself: later steps do not wait
    opt.zero_grad()
    _train_step(model, opt)
    assert len(snap.fence_wait_s) == 1


def test_host_buffers_are_reused_between_captures() -> None:
    model, opt = _model_and_adam()
    snap = HostSnapshot()
    first = snap.capture(_state(model, opt), [opt])
    snap.copy_deferred()
    _train_step(model, opt)
    second = snap.capture(_state(model, opt), [opt])
    snap.copy_deferred()
    assert second["state_dict"]["0.weight"] is first["state_dict"]["0.weight"]
    assert torch.equal(second["state_dict"]["0.weight"], model[0].weight)


def test_a_parameter_changed_outside_the_step_tears_the_copy() -> None:
    model, opt = _model_and_adam()
    snap = HostSnapshot()
    snap.capture(_state(model, opt), [opt])
    with torch.no_grad():
        model[0].weight.clamp_(-0.01, 0.01)  # e.g. WGAN clipping in training_step
    assert snap.copy_deferred() is False
    assert snap.torn


def test_not_deferred_copies_everything_at_once() -> None:
    model, opt = _model_and_adam()
    snap = HostSnapshot()
    host = snap.capture(_state(model, opt), [opt], deferred=False)
    assert snap._pending == []
    _train_step(model, opt)
    assert not torch.equal(host["state_dict"]["0.weight"], model[0].weight)


def test_prepare_allocates_the_buffers_a_capture_then_reuses() -> None:
    model, opt = _model_and_adam()
    snap = HostSnapshot()
    snap.prepare(_state(model, opt))
    prepared = dict(snap._buffers)
    assert prepared and all(not b.any() for b in prepared.values())  # touched, not copied
    host = snap.capture(_state(model, opt), [opt])
    snap.copy_deferred()
    assert host["state_dict"]["0.weight"] is prepared[(("state_dict", "0.weight"), (8, 4),
                                                       torch.float32)]
    assert torch.equal(host["state_dict"]["0.weight"], model[0].weight)
