"""The controller on ``ray_lit.testing`` fakes: attempts, failures, departures, elastic sizing
and kept survivors, without Ray (ARCHITECTURE principle 8)."""

from __future__ import annotations

import pytest

import ray_lit
from ray_lit.errors import MisconfigurationException, PreemptionStop, TrainingFailedError
from ray_lit.messages import (
    FromPeers,
    FromStorage,
    LeftBehind,
    PartWritten,
    SnapshotPart,
    WorkerState,
)
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
    assert groups.created[1] == {"num_workers": 2, "kept": 1, "fill": [1]}
    assert any("rank 1 failed (actor_died)" in line for line in controller.sink.lines)
    assert any("kept 1 worker(s), started 1 new" in line
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


def test_a_rank_without_progress_counts_as_failed(tmp_path) -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(hang=(1, 2)), ScriptedAttempt()])
    trainer = _trainer(max_failures=1, default_root_dir=str(tmp_path))  # the stacks go there
    controller = controller_for(trainer, groups, hang_timeout_s=60)
    controller.run()
    assert trainer.num_restarts == 1
    assert any("(hang)" in line for line in controller.sink.lines)
    # the hung rank is named to the salvage: it is let go first, so its peers waiting in a
    # collective are freed and kept
    assert groups.groups[0].salvaged and groups.groups[0].hung_rank == 1


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
    with pytest.raises(PreemptionStop, match="preemption checkpoint"):
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


def _lose_node_b(cluster: FakeCluster) -> None:
    cluster.lost.add("node-b")  # a probe does not reach it
    cluster.unplaced.add(1)  # its bundle is not on a live node
    cluster.free = [{"CPU": 0.0}]


def test_elastic_loss_of_a_node_continues_with_the_kept_worker(tmp_path) -> None:
    from ray_lit.checkpoint.manager import CheckpointManager

    cluster = FakeCluster()
    groups = FakeWorkerGroups([ScriptedAttempt(die=(1, 2), at_step={2: lambda: _lose_node_b(
        cluster)}), ScriptedAttempt()], nodes=["node-a", "node-b"])
    trainer = _trainer(num_workers=(1, 2), max_failures=1)
    controller = controller_for(trainer, groups, cluster,
                                manager=CheckpointManager(str(tmp_path / "run")))
    controller.run()
    # rank 0's worker is kept; rank 1's place is on the lost node: the group shrinks to 1
    assert groups.groups[0].salvaged and not groups.groups[0].shut_down
    assert groups.created[1] == {"num_workers": 1, "kept": 1, "fill": []}
    assert trainer.world_size_history == [2, 1]
    assert any("continuing with the 1 kept worker(s) (1 place(s) not available now)" in line
               for line in controller.sink.lines)


def test_the_place_of_a_lost_node_coming_back_grows_the_group_around_the_kept_worker(tmp_path):
    from ray_lit.checkpoint.manager import CheckpointManager

    cluster = FakeCluster()

    def node_back() -> None:  # Ray re-placed the lost bundle on a node that came back
        cluster.lost.clear()
        cluster.unplaced.clear()

    groups = FakeWorkerGroups([
        ScriptedAttempt(die=(1, 2), at_step={2: lambda: _lose_node_b(cluster)}),
        ScriptedAttempt(steps=10, at_step={3: node_back}),
        ScriptedAttempt()], nodes=["node-a", "node-b"])
    trainer = _trainer(num_workers=(1, 2), max_failures=1)
    controller = controller_for(trainer, groups, cluster,
                                manager=CheckpointManager(str(tmp_path / "run")))
    controller.run()
    assert trainer.world_size_history == [2, 1, 2]
    # the shrunk group's worker stayed for the growth; only the returned place got a new one
    assert groups.groups[1].salvaged and not groups.groups[1].shut_down
    assert groups.created[2] == {"num_workers": 2, "kept": 1, "fill": [1]}
    assert trainer.num_restarts == 1  # the growth is planned, not a failure


def test_a_fixed_size_group_that_lost_a_node_starts_afresh() -> None:
    cluster = FakeCluster()
    groups = FakeWorkerGroups([ScriptedAttempt(die=(1, 2), at_step={2: lambda: _lose_node_b(
        cluster)}), ScriptedAttempt()], nodes=["node-a", "node-b"])
    cluster.free = [{"CPU": 8.0}]
    controller_for(_trainer(max_failures=1), groups, cluster).run()
    assert groups.groups[0].shut_down and not groups.groups[0].salvaged
    assert groups.created[1] == {"num_workers": 2, "kept": 0}


def test_when_re_forming_around_survivors_fails_a_new_group_starts() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(die=(1, 2)), ScriptedAttempt()],
                              refuse_survivors=True)
    trainer = _trainer(max_failures=1)
    controller = controller_for(trainer, groups)
    assert controller.run() == b"rank0-result"
    assert groups.created[1]["failed"] and groups.created[2] == {"num_workers": 2, "kept": 0}
    assert trainer.world_size_history == [2, 2]
    assert any("starting a new group" in line for line in controller.sink.lines)


def _part(tmp_path, name: str, rank: int) -> PartWritten:
    """A part as a rank writes it, and its confirmation."""
    from ray_lit.checkpoint.manager import checkpoint_name, part_name

    assert name == checkpoint_name(6, 0, "")
    directory = tmp_path / "run" / "checkpoints" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / part_name(rank)).write_bytes(b"part")
    return PartWritten(name, rank, 2, {"global_step": 6, "epoch": 0})


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
    assert groups.groups[1].job.restore.rank0_uri.endswith(f"{name}/rank_0.pt")
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
    assert groups.groups[1].job.restore is None


def test_a_surviving_worker_hands_over_the_part_it_finished_while_leaving() -> None:
    from ray_lit.worker.actor import Worker

    class SlowWriter:
        def wait(self) -> None:  # the write in flight completes and confirms
            worker.outbox.append(PartWritten("step-6", 0, 2, {"global_step": 6}))

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
    assert left == LeftBehind((PartWritten("step-6", 0, 2, {"global_step": 6}),), ())
    assert worker._state is WorkerState.IDLE and worker._trainer is None and worker.outbox == []


def _snapshot_part(step: int, rank: int, world_size: int = 2, attempt: int = 0
                   ) -> SnapshotPart:
    return SnapshotPart((attempt, step), rank, world_size, f"part-{step}-{rank}".encode())


def test_a_survivors_memory_snapshot_newer_than_the_checkpoint_is_restored(tmp_path):
    from ray_lit.checkpoint.manager import CheckpointManager, checkpoint_name

    name = checkpoint_name(6, 0, "")
    parts = [_part(tmp_path, name, r) for r in (0, 1)]
    # storage checkpoint at step 6 (both parts); in-memory snapshot of step 8 (both ranks'
    # own parts reached the driver); rank 1 dies at step 9; rank 0 holds snapshots 7 and 8
    groups = FakeWorkerGroups([
        ScriptedAttempt(steps=12, die=(1, 9), confirmations={
            7: parts, 8: [_snapshot_part(8, 0), _snapshot_part(8, 1)]},
            held_snapshots=[(0, 7), (0, 8)]),
        ScriptedAttempt()])
    manager = CheckpointManager(str(tmp_path / "run"))
    controller = controller_for(_trainer(max_failures=1), groups, manager=manager)
    controller.run()
    job = groups.groups[1].job
    # the ranks load the snapshot, not the older storage checkpoint (load_restore)
    assert isinstance(job.restore, FromPeers) and job.checkpoint is None
    assert job.restore.ref == "snapshot-ref-(0, 8)"
    assert job.restore.parts == {0: b"part-8-0", 1: b"part-8-1"}
    assert job.attempt == 1
    assert any("restoring from step 8 from a surviving worker's memory, 2 step(s) newer"
               in line for line in controller.sink.lines)


def test_a_snapshot_whose_lost_rank_part_never_arrived_is_not_used(tmp_path):
    from ray_lit.checkpoint.manager import CheckpointManager, checkpoint_name

    name = checkpoint_name(6, 0, "")
    parts = [_part(tmp_path, name, r) for r in (0, 1)]
    groups = FakeWorkerGroups([
        ScriptedAttempt(steps=12, die=(1, 9), confirmations={
            7: parts, 8: [_snapshot_part(8, 0)]}, held_snapshots=[(0, 7), (0, 8)]),
        ScriptedAttempt()])
    manager = CheckpointManager(str(tmp_path / "run"))
    controller_for(_trainer(max_failures=1), groups, manager=manager).run()
    restore = groups.groups[1].job.restore
    assert isinstance(restore, FromStorage) and restore.rank0_uri.endswith(f"{name}/rank_0.pt")


def test_a_stuck_survivor_hands_over_its_snapshot_before_it_is_replaced(tmp_path):
    from ray_lit.checkpoint.manager import CheckpointManager

    # rank 1 dies; rank 0's loop stays stuck in its collective (a lost peer without a reset):
    # rank 0 is replaced too, but only after the snapshot of step 8 was exported from it
    groups = FakeWorkerGroups([
        ScriptedAttempt(steps=12, die=(1, 9), stuck=(0,), confirmations={
            8: [_snapshot_part(8, 0), _snapshot_part(8, 1)]}, held_snapshots=[(0, 8)]),
        ScriptedAttempt()])
    manager = CheckpointManager(str(tmp_path / "run"))
    controller = controller_for(_trainer(max_failures=1), groups, manager=manager)
    controller.run()
    assert groups.created[1] == {"num_workers": 2, "kept": 0}  # nobody kept
    assert groups.groups[1].job.restore.ref == "snapshot-ref-(0, 8)"
    assert controller.restored_from == [("memory", 8)]
    assert any("no checkpoint committed yet" in line for line in controller.sink.lines)


def test_a_fixed_group_that_lost_a_node_still_restores_from_a_survivors_snapshot(tmp_path):
    from ray_lit.checkpoint.manager import CheckpointManager

    cluster = FakeCluster()
    groups = FakeWorkerGroups([
        ScriptedAttempt(steps=12, die=(1, 9), at_step={9: lambda: _lose_node_b(cluster)},
                        confirmations={8: [_snapshot_part(8, 0), _snapshot_part(8, 1)]},
                        held_snapshots=[(0, 8)]),
        ScriptedAttempt()], nodes=["node-a", "node-b"])
    cluster.free = [{"CPU": 8.0}]
    trainer = _trainer(max_failures=1, snapshot_every_n_steps=4)
    controller = controller_for(trainer, groups, cluster,
                                manager=CheckpointManager(str(tmp_path / "run")))
    controller.run()
    # the lost place cannot be refilled: a fresh group, restored from rank 0's memory
    assert groups.created[1] == {"num_workers": 2, "kept": 0}
    assert controller.restored_from == [("memory", 8)]


def test_a_node_a_probe_missed_once_is_asked_again_and_the_group_grows_back(tmp_path):
    from ray_lit.checkpoint.manager import CheckpointManager

    cluster = FakeCluster()
    cluster.placements = {0: "node-a", 1: "node-b"}  # Ray still lists node-b, bundle 1 there

    def probe_misses_node_b() -> None:  # slow, not gone
        cluster.lost.add("node-b")
        cluster.free = [{"CPU": 0.0}]

    groups = FakeWorkerGroups([
        ScriptedAttempt(die=(1, 2), at_step={2: probe_misses_node_b}),
        ScriptedAttempt(steps=10, at_step={3: cluster.lost.clear}),
        ScriptedAttempt()], nodes=["node-a", "node-b"])
    trainer = _trainer(num_workers=(1, 2), max_failures=1)
    controller = controller_for(trainer, groups, cluster,
                                manager=CheckpointManager(str(tmp_path / "run")),
                                lost_recheck_s=0.0)
    controller.run()
    assert trainer.world_size_history == [2, 1, 2]
    assert groups.created[2] == {"num_workers": 2, "kept": 1, "fill": [1]}


def test_a_part_confirmed_while_the_stop_step_is_chosen_is_committed(tmp_path) -> None:
    """The poll that reads the ranks' steps for a planned stop also hands over checkpoint
    parts: they are confirmed like any other poll's, not dropped."""
    from ray_lit.checkpoint.manager import CheckpointManager, checkpoint_name

    name = checkpoint_name(6, 0, "")
    groups = FakeWorkerGroups([
        ScriptedAttempt(steps=10, sigterm=(1, 3),
                        confirmations={4: [_part(tmp_path, name, 0), _part(tmp_path, name, 1)]}),
        ScriptedAttempt()])
    manager = CheckpointManager(str(tmp_path / "run"))
    controller_for(_trainer(max_failures=0), groups, manager=manager).run()
    assert groups.groups[0].stop_at == 6  # chosen from the poll at step 4
    assert [c.global_step for c in manager.committed()] == [6]
    assert groups.groups[1].job.restore.rank0_uri.endswith(f"{name}/rank_0.pt")


def test_a_ctrl_c_swallowed_on_its_way_up_is_raised_again(default_sigint) -> None:
    """A Ctrl-C whose KeyboardInterrupt lands in code that swallows it still ends the run:
    the controller remembers it and raises it from its supervision loop."""
    import signal

    def swallowed_ctrl_c() -> None:
        try:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        except KeyboardInterrupt:
            pass  # e.g. caught by a library's broad handler

    groups = FakeWorkerGroups([ScriptedAttempt(steps=10, at_step={3: swallowed_ctrl_c})])
    with pytest.raises(KeyboardInterrupt):
        controller_for(_trainer(), groups).run()
    assert groups.groups[0].step == 3  # not one more step after the Ctrl-C
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


# --- the controller as a state machine: the sequence of states each scenario goes through ----
def _states(scripts, trainer=None, cluster=None, expect=None, **kw) -> list[str]:
    groups = FakeWorkerGroups(scripts, nodes=kw.pop("nodes", None))
    controller = controller_for(trainer or _trainer(max_failures=1), groups, cluster, **kw)
    if expect is None:
        controller.run()
    else:
        with pytest.raises(expect):
            controller.run()
    return controller.states


def test_states_of_a_clean_run() -> None:
    assert _states([ScriptedAttempt()]) == ["Starting", "Running", "Salvaging", "Finished"]


def test_states_of_a_lost_worker_then_a_restart() -> None:
    assert _states([ScriptedAttempt(die=(1, 2)), ScriptedAttempt()]) == [
        "Starting", "Running", "Salvaging", "Restarting", "Starting", "Running", "Salvaging",
        "Finished"]


def test_states_of_a_user_error() -> None:
    assert _states([ScriptedAttempt(user_error=(0, 2, ValueError("bad")))],
                   expect=ValueError) == ["Starting", "Running", "Salvaging", "Errored"]


def test_states_of_a_drain_notice_stop_and_continue() -> None:
    cluster = FakeCluster(driver="head")
    drain = {2: lambda: cluster.draining.update({"spot-1": 0})}
    assert _states([ScriptedAttempt(steps=10, at_step=drain),
                    ScriptedAttempt(nodes=["head", "spot-2"])], cluster=cluster,
                   nodes=["head", "spot-1"]) == [
        "Starting", "Running", "Stopping", "Salvaging", "Starting", "Running", "Salvaging",
        "Finished"]


def test_states_of_a_driver_sigterm_stop(tmp_path) -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(steps=10)])
    controller = controller_for(_trainer(), groups)
    groups.attempts[0].at_step[2] = controller._preempt.set  # SIGTERM to the driver at step 2
    with pytest.raises(PreemptionStop):
        controller.run()
    assert controller.states == ["Starting", "Running", "Stopping", "Salvaging", "Errored"]
    # two steps ahead of the furthest rank (the fake moves a step with the poll that reads it)
    assert groups.groups[0].stop_at in (4, 5)


def test_states_of_an_elastic_group_growing_at_a_checkpoint(tmp_path) -> None:
    from ray_lit.checkpoint.manager import CheckpointManager

    cluster = FakeCluster(free=[{"CPU": 1.0}])  # room for one worker at the start
    room = {3: lambda: setattr(cluster, "free", [{"CPU": 8.0}])}
    trainer = _trainer(num_workers=(1, 2))
    states = _states([ScriptedAttempt(steps=10, at_step=room), ScriptedAttempt()],
                     trainer=trainer, cluster=cluster,
                     manager=CheckpointManager(str(tmp_path / "run")))
    assert states == ["Starting", "Running", "Stopping", "Salvaging", "Starting", "Running",
                      "Salvaging", "Finished"]
    assert trainer.world_size_history == [1, 2]


def test_a_ctrl_c_while_running_releases_the_group() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(steps=10)])
    controller = controller_for(_trainer(), groups)
    groups.attempts[0].at_step[2] = controller._interrupted.set  # a swallowed Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        controller.run()
    assert groups.groups[0].shut_down
    assert controller.states == ["Starting", "Running"]


def test_supervision_settings_live_in_one_config() -> None:
    from ray_lit.driver.supervision import SupervisionConfig

    controller = controller_for(_trainer(), FakeWorkerGroups([ScriptedAttempt()]),
                                lost_recheck_s=7.0)
    assert controller.supervision == SupervisionConfig.fast(lost_recheck_s=7.0)
    assert SupervisionConfig().poll_wait_s == 0.5 and SupervisionConfig().poll_timeout_s == 30


# --- one worker group per Trainer: a finished group is kept and the next call runs on it -----
def test_a_finished_group_is_kept_and_the_next_call_runs_on_it() -> None:
    trainer = _trainer()
    first = FakeWorkerGroups([ScriptedAttempt(result=b"fit")])
    controller = controller_for(trainer, first, keep_group=True)
    assert controller.run() == b"fit"
    kept = controller.kept_group
    assert kept is first.groups[0] and not kept.shut_down  # not released
    kept.reset_for_reuse(ScriptedAttempt(result=b"test"))
    second = FakeWorkerGroups([ScriptedAttempt(result=b"never")])
    again = controller_for(trainer, second, stage="test", reuse=kept, keep_group=True)
    assert again.run() == b"test"
    assert second.created == [] and again.kept_group is kept  # nothing new was formed


def test_a_kept_group_with_a_dead_worker_is_replaced() -> None:
    trainer = _trainer()
    first = FakeWorkerGroups([ScriptedAttempt()])
    controller = controller_for(trainer, first, keep_group=True)
    controller.run()
    kept = controller.kept_group
    kept.dead = True  # a node went while the group idled
    second = FakeWorkerGroups([ScriptedAttempt(result=b"fresh")])
    again = controller_for(trainer, second, stage="test", reuse=kept, keep_group=True)
    assert again.run() == b"fresh"
    assert kept.shut_down and len(second.created) == 1


def test_a_failed_run_keeps_no_group() -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(user_error=(0, 2, ValueError("bad")))])
    controller = controller_for(_trainer(), groups, keep_group=True)
    with pytest.raises(ValueError):
        controller.run()
    assert controller.kept_group is None and groups.groups[0].shut_down


def test_a_kept_group_not_started_on_is_released() -> None:
    trainer = _trainer()
    first = FakeWorkerGroups([ScriptedAttempt()])
    controller = controller_for(trainer, first, keep_group=True)
    controller.run()
    kept = controller.kept_group
    interrupted = controller_for(trainer, FakeWorkerGroups([ScriptedAttempt()]), reuse=kept)
    interrupted._interrupted.set()  # a Ctrl-C before the first poll
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    assert kept.shut_down
