"""HostSnapshot: the checkpoint copy that overlaps the next forward/backward."""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from ray_lit.checkpoint.host_copy import HostSnapshot


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
    held_back: list[bool] = []  # asserted on the test's thread: a thread's assert fails nothing

    def late_copy() -> None:
        # long enough that the step below reaches the fence first, even on a loaded machine
        time.sleep(1.0)
        held_back.append(not stepped.is_set())  # the step below is still held back
        snap.copy_deferred()

    copier = threading.Thread(target=late_copy)
    copier.start()
    model(torch.randn(16, 4)).pow(2).mean().backward()  # overlaps the copy
    opt.step()  # the fence: returns only once the copy is done
    stepped.set()
    copier.join()
    assert held_back == [True]
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


# --- peer snapshots: the replicated part in each worker's memory, own parts at the driver -----
def test_a_peer_snapshot_rebuilds_each_ranks_checkpoint_of_the_boundary() -> None:
    from ray_lit.checkpoint.peer import (
        PeerSnapshot,
        own_part_bytes,
        restore_checkpoint,
        split_rank_state,
    )
    from ray_lit.messages import FromPeers

    model, opt = _model_and_adam()
    rank0 = _state(model, opt)
    rank1 = {"loops": {"step": 3, "rng": torch.arange(5, dtype=torch.uint8)}}
    expected = _clone(rank0)
    replicated, own = split_rank_state(rank0, model, [opt])
    # parameters and optimizer state are the replicated part; buffers stay rank 0's own
    assert set(replicated["params"]) == {"0.weight", "0.bias", "1.weight", "1.bias",
                                         "2.weight", "2.bias"}
    assert "1.running_mean" in own["state_dict"] and "optimizer_states" not in own
    peer = PeerSnapshot()
    peer.take(replicated, [opt], key=(0, 3))
    parts = {0: own_part_bytes(own), 1: own_part_bytes(rank1)}  # at the boundary, as sent
    _train_step(model, opt)  # the step waits for the copy: the snapshot is of the boundary
    assert peer.keys == [(0, 3)]
    memory = FromPeers(peer.export((0, 3)), parts)
    _assert_equal(restore_checkpoint(memory, 0), expected)
    on_rank1 = restore_checkpoint(memory, 1)
    assert torch.equal(on_rank1["loops"]["rng"], rank1["loops"]["rng"])  # its own RNG
    _assert_equal(on_rank1["state_dict"], expected["state_dict"])
    # a rank that the snapshot's world did not have takes rank 0's loop state
    assert torch.equal(restore_checkpoint(memory, 2)["loops"]["rng"], expected["loops"]["rng"])


def test_another_ranks_replicated_part_is_read_from_its_module() -> None:
    from ray_lit.checkpoint.peer import split_rank_state

    model, opt = _model_and_adam()
    replicated, own = split_rank_state({"loops": {"step": 3}}, model, [opt])
    assert own == {"loops": {"step": 3}}
    assert torch.equal(replicated["params"]["2.weight"], model[2].weight)
    assert replicated["optimizer_states"][0]["state"].keys() == opt.state_dict()["state"].keys()


def test_a_torn_peer_snapshot_is_not_held() -> None:
    import pytest

    from ray_lit.checkpoint.peer import PeerSnapshot, split_rank_state

    model, opt = _model_and_adam()
    replicated, _ = split_rank_state(_state(model, opt), model, [opt])
    peer = PeerSnapshot()
    gate = threading.Event()
    original = peer._slots[0].copy_deferred

    def slow_copy() -> bool:
        gate.wait(5)
        return original()

    peer._slots[0].copy_deferred = slow_copy
    peer.take(replicated, [opt], key=(0, 3))
    with torch.no_grad():
        model[0].weight.add_(1.0)  # outside optimizer.step, while the copy is pending
    gate.set()
    peer.wait()
    assert peer.keys == [] and peer.torn  # the writer then copies synchronously
    with pytest.raises(RuntimeError, match="not held"):
        peer.export((0, 3))


def test_a_peer_keeps_its_two_latest_snapshots() -> None:
    from ray_lit.checkpoint.peer import PeerSnapshot, split_rank_state

    model, opt = _model_and_adam()
    peer = PeerSnapshot()
    weights = {}
    for step in (1, 2, 3):
        replicated, _ = split_rank_state(_state(model, opt), model, [opt])
        weights[step] = model[2].weight.detach().clone()
        peer.take(replicated, [opt], key=(0, step))
        _train_step(model, opt)
    assert sorted(peer.keys) == [(0, 2), (0, 3)]  # step 1's buffers took step 3
    from ray_lit.storage.checkpoint_io import checkpoint_from_bytes

    for step in (2, 3):
        exported = checkpoint_from_bytes(peer.export((0, step)))
        assert torch.equal(exported["params"]["2.weight"], weights[step])


def test_a_torn_peer_snapshot_makes_the_writer_copy_synchronously(caplog) -> None:
    from types import SimpleNamespace

    from ray_lit.checkpoint.writer import CheckpointWriter

    model, opt = _model_and_adam()

    class Progress:
        global_step, epoch, batches_done = 3, 0, 3

        def state_dict(self) -> dict:
            return {"global_step": self.global_step}

    trainer = SimpleNamespace(global_step=3, lightning_module=model, optimizers=[opt],
                              num_training_batches=10)
    ctx = SimpleNamespace(trainer=trainer, progress=Progress(), strategy=None,
                          host=SimpleNamespace(sampler_state=lambda n: {"done": n}))
    writer = CheckpointWriter("/tmp/unused", None, snapshot_every_n_steps=1)
    writer.attach(None, SimpleNamespace(world_rank=1, world_size=2))
    peer = writer._peer()
    gate = threading.Event()
    original = peer._slots[0].copy_deferred
    peer._slots[0].copy_deferred = lambda: (gate.wait(5), original())[1]
    writer.snapshot(ctx)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # outside optimizer.step, while the copy is pending
    gate.set()
    peer.wait()
    assert peer.torn and peer.keys == []
    trainer.global_step = 4
    with caplog.at_level("WARNING", logger="ray_lit"):
        writer.snapshot(ctx)
    assert not writer.overlap_copy and "copy synchronously" in caplog.text
    peer.wait()
    assert peer.keys == [(0, 4)]  # copied at once, not torn
