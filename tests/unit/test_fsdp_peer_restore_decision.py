"""FSDP peer snapshots over more than two workers: the driver restores from the survivors that
together hold every rank's shards (``decide_restore``, the controller on ``ray_lit.testing``
fakes), and says why it falls back to storage when they do not."""

from __future__ import annotations

import pytest

import ray_lit
from ray_lit.driver.policies import decide_restore
from ray_lit.messages import FromPeers, FromStorage, SnapshotPart
from ray_lit.testing import FakeWorkerGroups, ScriptedAttempt, controller_for


def _ring(world: int, lost: set[int], keys: list[tuple[int, int]]) -> tuple[dict, dict]:
    """``(held, shards)`` as the survivors of a ring of ``world`` ranks report them when the
    ranks ``lost`` are gone (bundle = rank)."""
    held = {r: list(keys) for r in range(world) if r not in lost}
    shards = {r: {k: tuple(sorted({r, (r - 1) % world})) for k in keys} for r in held}
    return held, shards


# --- the decision (pure) -----------------------------------------------------------------------
@pytest.mark.parametrize("world,lost", [(3, {1}), (3, {0}), (3, {2}), (4, {1}), (4, {3}),
                                        (4, {0, 2})])
def test_survivors_that_together_hold_every_rank_are_chosen(world, lost) -> None:
    held, shards = _ring(world, lost, [(0, 4)])
    decision = decide_restore(None, [(0, 4)], held, shards, {(0, 4): world})
    assert decision.key == (0, 4) and decision.sharded
    got = set()
    for bundle in decision.holders:
        got |= set(shards[bundle][(0, 4)])
    assert got == set(range(world))
    assert len(decision.holders) <= len(held)
    assert f"FSDP shards of all {world} ranks" in decision.reason


def test_the_cover_is_small_two_survivors_of_four_when_two_suffice() -> None:
    held, shards = _ring(4, {1}, [(0, 4)])  # 0 holds {3, 0}, 2 {1, 2}, 3 {2, 3}
    decision = decide_restore(2, [(0, 4)], held, shards, {(0, 4): 4})
    assert decision.holders == (0, 2)
    assert "from 2 surviving workers' memory, 2 step(s) newer" in decision.reason


@pytest.mark.parametrize("world,lost,missing", [(3, {0, 1}, [0]), (3, {1, 2}, [1]),
                                                (4, {2, 3}, [2])])
def test_two_adjacent_ranks_lost_is_not_coverable(world, lost, missing) -> None:
    held, shards = _ring(world, lost, [(0, 4), (0, 6)])
    decision = decide_restore(None, [(0, 4), (0, 6)], held, shards,
                              {(0, 4): world, (0, 6): world})
    assert decision.key is None and decision.holders == ()
    assert f"no survivor holds the FSDP shards of rank(s) {missing} of {world}" \
        in decision.reason


def test_two_fsdp_workers_one_survivor_holds_all() -> None:
    held, shards = _ring(2, {1}, [(0, 4)])
    decision = decide_restore(None, [(0, 4)], held, shards, {(0, 4): 2})
    assert decision.key == (0, 4) and decision.holders == (0,) and decision.sharded
    assert "from a surviving worker's memory, no checkpoint committed yet" in decision.reason


def test_replicated_snapshots_decide_as_before() -> None:
    # no shard report: any one holder rebuilds the state; all holders are alternatives
    decision = decide_restore(4, [(0, 6), (0, 8)], {0: [(0, 6), (0, 8)], 2: [(0, 8)]})
    assert decision.key == (0, 8) and decision.holders == (0, 2) and not decision.sharded
    assert decision.reason == ("step 8 from a surviving worker's memory, 4 step(s) newer than "
                               "the latest checkpoint")


# --- the controller on fakes -------------------------------------------------------------------
def _trainer(**options) -> ray_lit.Trainer:
    return ray_lit.Trainer(logger=False, enable_progress_bar=False, **options)


def _parts(step: int, world: int) -> list[SnapshotPart]:
    return [SnapshotPart((0, step), r, world, f"part-{step}-{r}".encode()) for r in range(world)]


def _run(world: int, **script):
    groups = FakeWorkerGroups([
        ScriptedAttempt(steps=12, confirmations={4: _parts(4, world)}, held_snapshots=[(0, 4)],
                        shard_ring=True, **script),
        ScriptedAttempt()], nodes=[f"node-{r}" for r in range(world)])
    controller = controller_for(_trainer(num_workers=world, max_failures=1), groups)
    controller.run()
    return groups, controller


@pytest.mark.parametrize("world", [3, 4])
def test_one_lost_rank_of_several_is_restored_from_the_survivors_together(world) -> None:
    groups, controller = _run(world, die=(1, 5))
    restore = groups.groups[1].job.restore
    assert isinstance(restore, FromPeers) and groups.groups[1].job.checkpoint is None
    # rank 1's shards are with rank 2, rank 0's with rank 0, the rest with their owners
    assert restore.ref == ["snapshot-ref-(0, 4)-0", "snapshot-ref-(0, 4)-2"]
    assert restore.parts == {r: f"part-4-{r}".encode() for r in range(world)}
    assert controller.restored_from == [("memory", 4)]
    assert any("from 2 surviving workers' memory" in line for line in controller.sink.lines)


def test_two_adjacent_lost_ranks_fall_back_to_storage_and_say_why() -> None:
    groups, controller = _run(3, die=(1, 5), die_too=(2,))
    assert not isinstance(groups.groups[1].job.restore, FromPeers)
    assert controller.restored_from == [("start", 0)]  # no commit yet: from the start
    assert any("not restoring from the survivors' memory: no survivor holds the FSDP shards "
               "of rank(s) [1] of 3" in line for line in controller.sink.lines)


def test_a_failed_export_of_a_needed_survivor_falls_back_and_says_why() -> None:
    groups, controller = _run(3, die=(1, 5), export_fails=(2,))
    assert not isinstance(groups.groups[1].job.restore, FromPeers)
    assert any("failed to export them" in line for line in controller.sink.lines)


def test_a_fallback_to_a_committed_checkpoint_uses_storage(tmp_path) -> None:
    from ray_lit.checkpoint.manager import CheckpointManager, checkpoint_name, part_name
    from ray_lit.messages import PartWritten

    name = checkpoint_name(3, 0, "")
    directory = tmp_path / "run" / "checkpoints" / name
    directory.mkdir(parents=True)
    written = []
    for r in range(3):
        (directory / part_name(r)).write_bytes(b"part")
        written.append(PartWritten(name, r, 3, {"global_step": 3, "epoch": 0}))
    groups = FakeWorkerGroups([
        ScriptedAttempt(steps=12, confirmations={3: written, 4: _parts(4, 3)},
                        held_snapshots=[(0, 4)], shard_ring=True, die=(0, 5), die_too=(1,)),
        ScriptedAttempt()], nodes=["node-0", "node-1", "node-2"])
    controller = controller_for(_trainer(num_workers=3, max_failures=1), groups,
                                manager=CheckpointManager(str(tmp_path / "run")))
    controller.run()
    restore = groups.groups[1].job.restore
    assert isinstance(restore, FromStorage) and restore.rank0_uri.endswith(f"{name}/rank_0.pt")
    assert controller.restored_from == [("storage", 3)]
    assert any("rank(s) [0] of 3" in line for line in controller.sink.lines)


# --- the survivor's report ---------------------------------------------------------------------
def test_a_leaving_worker_reports_the_ranks_whose_shards_it_holds(monkeypatch) -> None:
    import signal

    from ray_lit.checkpoint import shard_ring
    from ray_lit.checkpoint.peer import SHARDS, PeerSnapshot
    from ray_lit.messages import LeftBehind
    from ray_lit.worker.actor import Worker

    class Shards:  # rank 2 of 3: it keeps its own shards and rank 1's
        def capture(self) -> dict:
            return {"rank": 2, "world_size": 3}

    monkeypatch.setattr(shard_ring, "exchange", lambda blob, rank, world_size: b"rank-1")
    previous = signal.getsignal(signal.SIGTERM)
    worker = Worker()  # built on the main thread: it installs its SIGTERM handler
    signal.signal(signal.SIGTERM, previous)
    worker.peer_snapshot = PeerSnapshot()
    for step in (2, 4):
        worker.peer_snapshot.take({SHARDS: Shards()}, [], (0, step))
    left = worker.abort(timeout_s=1.0)
    assert isinstance(left, LeftBehind) and not left.stuck
    assert sorted(left.snapshots) == [(0, 2), (0, 4)]
    assert dict(left.shards) == {(0, 2): (1, 2), (0, 4): (1, 2)}
