"""FSDP peer snapshots (``checkpoint.shard_ring``): which rank keeps whose shards, the pieces
put back together, and real FSDP2 ranks (gloo on loopback, spawned as ``test_fsdp`` does)
swapping their shards with their ring neighbours."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from ray_lit.checkpoint.peer import PeerSnapshotLost, _from_shards
from ray_lit.checkpoint.shard_ring import PIECE, assemble, covers_all, neighbour, source
from ray_lit.storage.checkpoint_io import checkpoint_to_bytes


def test_each_rank_keeps_the_shards_of_the_rank_before_it() -> None:
    assert [neighbour(r, 4) for r in range(4)] == [1, 2, 3, 0]
    assert [source(r, 4) for r in range(4)] == [3, 0, 1, 2]
    assert [neighbour(r, 2) for r in range(2)] == [1, 0]  # two ranks: each keeps the other's
    # one survivor of two holds everything; of three, never (its own and one neighbour's)
    assert covers_all({0, source(0, 2)}, 2)
    assert not any(covers_all({r, source(r, 3)}, 3) for r in range(3))


def _piece(full: torch.Tensor, rank: int, world: int) -> dict[str, Any]:
    rows = list(torch.arange(full.shape[0]).chunk(world))
    start = int(rows[rank][0]) if rank < len(rows) else full.shape[0]
    count = len(rows[rank]) if rank < len(rows) else 0
    return {PIECE: True, "local": full[start:start + count].clone(), "shape": list(full.shape),
            "offset": [start] + [0] * (full.dim() - 1)}


def _shards(world: int) -> tuple[dict[int, dict[str, Any]], dict[str, torch.Tensor]]:
    # 5 rows over 4 ranks: chunks of 2, 2, 1 and an empty one
    full = {"w": torch.randn(5, 3), "b": torch.randn(5), "one": torch.randn(1)}
    step = torch.tensor(7.0)
    shards = {r: {"world_size": world, "rank": r,
                  "params": {k: _piece(v, r, world) for k, v in full.items()},
                  "optimizer_states": [{"state": {0: {"step": step,
                                                      "exp_avg": _piece(full["w"] * 2, r, world)}},
                                        "param_groups": [{"lr": 0.1, "params": [0]}]}]}
              for r in range(world)}
    return shards, full


def test_the_pieces_are_put_back_together_uneven_and_empty_ones_too() -> None:
    shards, full = _shards(4)
    params, optimizer_states = assemble(shards)
    for key, value in full.items():
        assert torch.equal(params[key], value), key
    state = optimizer_states[0]["state"][0]
    assert torch.equal(state["exp_avg"], full["w"] * 2)
    assert torch.equal(state["step"], torch.tensor(7.0))  # whole on every rank: kept as is
    assert optimizer_states[0]["param_groups"] == [{"lr": 0.1, "params": [0]}]


def test_missing_shards_are_named_and_an_incomplete_restore_is_a_lost_peer() -> None:
    shards, _ = _shards(3)
    del shards[1]
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] of 3"):
        assemble(shards)
    exported = {"fsdp_shards": {r: torch.frombuffer(bytearray(checkpoint_to_bytes(s)),
                                                    dtype=torch.uint8)
                                for r, s in shards.items()}, "world_size": 3}
    with pytest.raises(PeerSnapshotLost, match="incomplete"):
        _from_shards(exported)


def _export(shards: dict[int, dict[str, Any]], world: int) -> bytes:
    return checkpoint_to_bytes({"fsdp_shards": {
        r: torch.frombuffer(bytearray(checkpoint_to_bytes(s)), dtype=torch.uint8)
        for r, s in shards.items()}, "world_size": world})


def test_a_restore_merges_the_shards_of_several_exports_with_the_driver_parts() -> None:
    from ray_lit.checkpoint.peer import restore_checkpoint
    from ray_lit.messages import FromPeers

    shards, full = _shards(3)
    buffer = torch.arange(3.0)
    parts = {0: checkpoint_to_bytes({"state_dict": {"buf": buffer}, "loops": {"rng": "r0"}}),
             1: checkpoint_to_bytes({"loops": {"rng": "r1"}})}
    # survivors 1 and 2 of three: rank 2 holds the shards of 1 and 2, rank 1 those of 0 and 1
    exports = [_export({1: shards[1], 2: shards[2]}, 3), _export({0: shards[0], 1: shards[1]}, 3)]
    checkpoint = restore_checkpoint(FromPeers(exports, parts), world_rank=1)
    assert torch.equal(checkpoint["state_dict"]["buf"], buffer)
    for key, value in full.items():
        assert torch.equal(checkpoint["state_dict"][key], value), key
    assert torch.equal(checkpoint["optimizer_states"][0]["state"][0]["exp_avg"], full["w"] * 2)
    assert checkpoint["loops"]["rng"] == "r1"  # this rank's own RNG, from the driver's part
    with pytest.raises(PeerSnapshotLost, match=r"rank\(s\) \[0\]"):
        restore_checkpoint(FromPeers(exports[:1], parts), world_rank=0)


class _FakeShards:
    """``LocalShards`` of one rank, without a module (the ring's bookkeeping only)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def capture(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_a_survivor_advertises_its_snapshots_and_the_ranks_whose_shards_it_holds(
        world, monkeypatch, caplog) -> None:
    from ray_lit.checkpoint import shard_ring
    from ray_lit.checkpoint.peer import SHARDS, PeerSnapshot

    monkeypatch.setattr(shard_ring, "exchange", lambda blob, rank, world_size: b"neighbour")
    peer = PeerSnapshot()
    with caplog.at_level(logging.WARNING, logger="ray_lit.checkpoint.peer"):
        for step in (2, 4, 6):
            peer.take({SHARDS: _FakeShards(1 % world, world)}, [], (0, step))
    assert peer.keys == [(0, 6), (0, 4)]  # the two latest, as with DDP
    # every snapshot is advertised, partial ones too: the driver combines the survivors'
    # holdings (``decide_restore``); nothing is refused or warned at any world size
    assert sorted(peer.restorable) == [(0, 4), (0, 6)]
    ranks = tuple(sorted({1 % world, (1 % world - 1) % world}))  # its own and its source's
    assert peer.held_ranks == {(0, 4): ranks, (0, 6): ranks}
    assert not caplog.records


def test_replicated_snapshots_report_no_shard_holdings() -> None:
    from ray_lit.checkpoint.peer import PeerSnapshot

    peer = PeerSnapshot()
    params = {"w": torch.ones(3)}
    peer.take({"params": params, "optimizer_states": []}, [], (0, 2), deferred=False)
    peer.wait()
    assert peer.restorable == [(0, 2)] and peer.held_ranks == {}


# --- real FSDP2 ranks ----------------------------------------------------------------------
def _scenario(rank: int, world: int) -> dict[str, Any]:
    """Two FSDP2 ranks after one Adam step take a snapshot (COLLECTIVE: the ring swap) and
    rebuild the full state from one rank's export."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ray_lit.checkpoint.peer import SHARDS, PeerSnapshot, split_rank_state
    from ray_lit.storage.checkpoint_io import checkpoint_from_bytes

    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # each rank its own batch
    model(torch.randn(6, 4)).square().sum().backward()
    opt.step()
    replicated, own = split_rank_state({"state_dict": {}, "optimizer_states": ["gathered"],
                                        "loops": {"rng": 1}}, model, [opt])
    peer = PeerSnapshot()
    peer.take(replicated, [opt], (0, 1))
    out: dict[str, Any] = {"own": own, "kind": type(replicated[SHARDS]).__name__,
                           "keys": peer.keys, "restorable": peer.restorable}
    exported = checkpoint_from_bytes(peer.export((0, 1)))
    out["held"] = sorted(int(r) for r in exported[SHARDS])
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # COLLECTIVE
    opt_state = opt.state_dict()["state"]
    full_opt = {i: {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                    for k, v in entry.items()} for i, entry in opt_state.items()}
    if peer.restorable:
        restored = _from_shards(exported)
        out["params_equal"] = all(torch.equal(restored["params"][k], v) for k, v in full.items())
        out["optimizer_equal"] = all(
            torch.equal(restored["optimizer_states"][0]["state"][i][k], v)
            for i, entry in full_opt.items() for k, v in entry.items())
    peer.release()
    return out


def _on_rank(rank: int, port: int, world: int, out: dict) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        out[rank] = _scenario(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_ranks(world: int) -> dict[int, dict[str, Any]]:
    import torch.multiprocessing as mp

    from ray_lit.worker.process_group import find_free_port

    with mp.Manager() as manager:
        out = manager.dict()
        # spawn, not fork: a fork after this process ran torch ops can deadlock in gloo
        mp.start_processes(_on_rank, args=(find_free_port(), world, out), nprocs=world,
                           start_method="spawn")
        return dict(out)


def test_two_fsdp_ranks_each_hold_both_shards_and_rebuild_the_exact_state() -> None:
    out = _run_ranks(2)
    for rank in (0, 1):
        result = out[rank]
        assert result["kind"] == "LocalShards"
        # the gathered tensors of rank 0's dump are not sent to the driver with its own part
        assert result["own"] == {"state_dict": {}, "loops": {"rng": 1}}
        assert result["held"] == [0, 1]  # its own and its neighbour's
        assert result["keys"] == result["restorable"] == [(0, 1)]
        assert result["params_equal"] and result["optimizer_equal"]
