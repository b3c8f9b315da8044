"""The controller on ``ray_lit.testing`` fakes: attempts, failures, departures, elastic sizing
and kept survivors, without Ray (ARCHITECTURE principle 8)."""

from __future__ import annotations

import pytest

import ray_lit
from ray_lit.errors import MisconfigurationException, TrainingFailedError
from ray_lit.testing import FakeCluster, FakeWorkerGroups, ScriptedAttempt, controller_for


def _trainer(**options) -> ray_lit.Trainer:
    options.setdefault("num_workers", 2)
    return ray_lit.Trainer(logger=False, enable_progress_bar=False, **options)


def test_a_clean_attempt_returns_rank_zeros_result() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(steps=3, result=b"weights")])
    trainer = _trainer()
    controller = controller_for(trainer, groups)
    assert controller.run() == b"weights"
    assert len(groups.groups) == 1 and groups.groups[0].shut_down
    assert trainer.num_restarts == 0 and trainer.world_size_history == [2]


def test_a_dead_worker_restarts_with_the_survivor_kept() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(die=(1, 2)), ScriptedAttempt(result=b"second")])
    trainer = _trainer(max_failures=1)
    controller = controller_for(trainer, groups)
    assert controller.run() == b"second"
    assert trainer.num_restarts == 1 and controller.failures == 1
    first, second = groups.groups
    assert first.salvaged and not first.shut_down  # rank 0 left the group alive
    assert groups.created[1] == {"num_workers": 2, "kept": 1}
    assert any("rank 1 failed (actor_died)" in line for line in controller.sink.lines)
    assert any("kept 1 surviving worker(s), started 1 new" in line
               for line in controller.sink.lines)


def test_the_dead_rank_is_blamed_not_its_peers() -> None:
    # rank 0 fails in its collective ("Connection closed by peer"), rank 1's actor is gone
    groups = FakeWorkerGroups([ScriptedAttempt(die=(1, 1))])
    trainer = _trainer(max_failures=0)
    with pytest.raises(TrainingFailedError) as info:
        controller_for(trainer, groups).run()
    assert info.value.rank == 1
    assert groups.groups[0].shut_down  # no restart coming: nothing kept


def test_failures_beyond_max_failures_raise() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(die=(1, 2))])  # every attempt dies
    trainer = _trainer(max_failures=2)
    with pytest.raises(TrainingFailedError):
        controller_for(trainer, groups).run()
    assert len(groups.groups) == 3 and trainer.num_restarts == 2


def test_a_user_error_is_raised_as_itself_without_restart() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(user_error=(0, 2, ValueError("bad batch")))])
    trainer = _trainer(max_failures=3)
    with pytest.raises(ValueError, match="bad batch") as info:
        controller_for(trainer, groups).run()
    assert len(groups.groups) == 1 and groups.groups[0].shut_down
    assert "raised on ray_lit worker rank 0" in "".join(getattr(info.value, "__notes__", []))


def test_a_rank_without_progress_counts_as_failed() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(hang=(1, 2)), ScriptedAttempt()])
    trainer = _trainer(max_failures=1)
    controller = controller_for(trainer, groups, hang_timeout_s=60)
    controller.run()
    assert trainer.num_restarts == 1
    assert any("(hang)" in line for line in controller.sink.lines)


def test_a_drain_notice_stops_at_a_common_step_and_continues_without_counting() -> None:
    cluster = FakeCluster(driver="head")
    drain = {2: lambda: cluster.draining.update({"spot-1": 0})}
    # Ray places no new work on a draining node: the next group lands elsewhere
    groups = FakeWorkerGroups([ScriptedAttempt(steps=10, at_step=drain),
                               ScriptedAttempt(nodes=["head", "spot-2"])],
                              nodes=["head", "spot-1"])
    trainer = _trainer(max_failures=0)
    controller = controller_for(trainer, groups, cluster)
    assert controller.run() == b"rank0-result"
    first = groups.groups[0]
    # one step for every rank, two ahead of the furthest one when the notice was read
    assert first.stop_at in (4, 5) and first.step == first.stop_at
    assert first.shut_down  # a planned stop tears down, keeps nothing
    assert trainer.num_restarts == 0 and len(groups.groups) == 2
    assert any("node spot-1 is draining" in line for line in controller.sink.lines)


def test_a_drain_of_the_driver_node_stops_the_run() -> None:
    cluster = FakeCluster(driver="head")
    drain = {1: lambda: cluster.draining.update({"head": 0})}
    groups = FakeWorkerGroups([ScriptedAttempt(steps=10, at_step=drain)],
                              nodes=["head", "other"])
    with pytest.raises(SystemExit, match="preemption checkpoint"):
        controller_for(_trainer(), groups, cluster).run()
    assert groups.groups[0].stop_at is not None


def test_sigterm_to_a_worker_checkpoints_then_continues() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(steps=10, sigterm=(1, 3)), ScriptedAttempt()])
    trainer = _trainer(max_failures=0)
    controller = controller_for(trainer, groups)
    controller.run()
    assert groups.groups[0].stop_at in (5, 6) and trainer.num_restarts == 0


def test_a_stop_asked_after_the_last_step_is_just_the_end() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(steps=2, sigterm=(1, 2))])
    assert controller_for(_trainer(), groups).run() == b"rank0-result"


def test_elastic_start_takes_what_can_be_placed() -> None:
    cluster = FakeCluster(free=[{"CPU": 1.0}, {"CPU": 2.0}])
    groups = FakeWorkerGroups([ScriptedAttempt()])
    trainer = _trainer(num_workers=(1, 4))
    controller_for(trainer, groups, cluster).run()
    assert groups.created[0]["num_workers"] == 3 and trainer.world_size_history == [3]


def test_elastic_start_below_min_is_a_clear_error() -> None:
    cluster = FakeCluster(free=[{"CPU": 1.0}])
    groups = FakeWorkerGroups([ScriptedAttempt()])
    with pytest.raises(MisconfigurationException, match="Lower the minimum or add nodes"):
        controller_for(_trainer(num_workers=(2, 4)), groups, cluster).run()
    assert groups.groups == []


def test_elastic_loss_whose_place_is_gone_sizes_the_group_afresh() -> None:
    cluster = FakeCluster(free=[{"CPU": 2.0}])
    lose_node = {2: lambda: (setattr(cluster, "placed", False),
                             setattr(cluster, "free", [{"CPU": 1.0}]))}
    groups = FakeWorkerGroups([ScriptedAttempt(die=(1, 2), at_step=lose_node),
                               ScriptedAttempt()])
    trainer = _trainer(num_workers=(1, 2), max_failures=1)
    controller_for(trainer, groups, cluster).run()
    # the survivor could not be joined by a replacement: a group of what fits now
    assert groups.created[1] == {"num_workers": 1, "kept": 0}
    assert trainer.world_size_history == [2, 1]


def test_when_re_forming_around_survivors_fails_a_new_group_starts() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(die=(1, 2)), ScriptedAttempt()],
                              refuse_survivors=True)
    trainer = _trainer(max_failures=1)
    controller = controller_for(trainer, groups)
    assert controller.run() == b"rank0-result"
    assert groups.created[1]["failed"] and groups.created[2] == {"num_workers": 2, "kept": 0}
    assert trainer.world_size_history == [2, 2]
    assert any("starting a new group" in line for line in controller.sink.lines)


def _part(tmp_path, name: str, rank: int) -> tuple:
    """A part as a rank writes it, and its confirmation."""
    from ray_lit.checkpoint.manager import checkpoint_name, part_name

    assert name == checkpoint_name(6, 0, "")
    directory = tmp_path / "run" / "checkpoints" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / part_name(rank)).write_bytes(b"part")
    return ("checkpoint", name, rank, 2, {"global_step": 6, "epoch": 0})


def test_a_checkpoint_the_survivors_finish_while_leaving_is_committed_and_used(tmp_path):
    from ray_lit.checkpoint.manager import CheckpointManager, checkpoint_name

    name = checkpoint_name(6, 0, "")
    # rank 1 wrote its part of step 6 and died; rank 0's write was still in flight: it finishes
    # it from memory while leaving the failed group
    dead_rank_part = _part(tmp_path, name, 1)
    survivor_part = _part(tmp_path, name, 0)
    groups = FakeWorkerGroups([
        ScriptedAttempt(steps=10, die=(1, 8), confirmations={7: [dead_rank_part]},
                        leftover_confirmations=[survivor_part]),
        ScriptedAttempt()])
    manager = CheckpointManager(str(tmp_path / "run"))
    trainer = _trainer(max_failures=1)
    controller = controller_for(trainer, groups, manager=manager)
    controller.run()
    assert [c.global_step for c in manager.committed()] == [6]
    assert groups.groups[1].job["restore"]["rank0"].endswith(f"{name}/rank_0.pt")
    assert any("from the surviving workers' memory" in line for line in controller.sink.lines)


def test_an_incomplete_leftover_checkpoint_is_never_committed(tmp_path):
    from ray_lit.checkpoint.manager import CheckpointManager, checkpoint_name

    name = checkpoint_name(6, 0, "")
    groups = FakeWorkerGroups([
        ScriptedAttempt(steps=10, die=(1, 8), leftover_confirmations=[_part(tmp_path, name, 0)]),
        ScriptedAttempt()])
    manager = CheckpointManager(str(tmp_path / "run"))
    controller_for(_trainer(max_failures=1), groups, manager=manager).run()
    assert manager.committed() == []  # rank 1's part never came: nothing to resume from
    assert "restore" not in groups.groups[1].job


def test_a_surviving_worker_hands_over_the_part_it_finished_while_leaving() -> None:
    from ray_lit.distributed.worker import Worker

    class SlowWriter:
        def wait(self) -> None:  # the write in flight completes and confirms
            worker.outbox.append(("checkpoint", "step-6", 0, 2, {"global_step": 6}))

    class Host:
        checkpointer = SlowWriter()

    class Trainer:
        _host = Host()

    import signal

    previous = signal.getsignal(signal.SIGTERM)
    worker = Worker()  # built on the main thread: it installs its SIGTERM handler
    signal.signal(signal.SIGTERM, previous)
    worker._trainer = Trainer()
    left = worker.abort(timeout_s=1.0)
    assert left == [("checkpoint", "step-6", 0, 2, {"global_step": 6})]
    assert worker._state == "idle" and worker._trainer is None and worker.outbox == []
