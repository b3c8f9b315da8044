"""Hangs are diagnosed errors by default: ``worker_hang_timeout_s="auto"`` declares a rank hung
after max(60 s, 20x its slowest step) without progress (armed after the first steps, never in
a marked long phase); the driver then collects every rank's stacks, writes them to a file and
names the rank that is not waiting in a collective."""

from __future__ import annotations

import datetime
import pathlib
import threading
import time

import pytest

import ray_lit
from ray_lit.errors import MisconfigurationException, TrainingFailedError
from ray_lit.loop.liveness import in_long_phase, long_phase
from ray_lit.messages import WorkerState, WorkerStatus
from ray_lit.testing import FakeWorkerGroups, ScriptedAttempt, controller_for


def _trainer(tmp_path, **options) -> ray_lit.Trainer:
    options.setdefault("num_workers", 2)
    return ray_lit.Trainer(logger=False, enable_progress_bar=False,
                           default_root_dir=str(tmp_path), **options)


def test_auto_is_the_default_and_bad_values_name_the_option(tmp_path) -> None:
    assert _trainer(tmp_path).config.worker_hang_timeout_s == "auto"
    for bad in (0, -3, "soon", True):
        with pytest.raises(MisconfigurationException, match="worker_hang_timeout_s="):
            _trainer(tmp_path, worker_hang_timeout_s=bad)


def test_auto_scales_with_the_slowest_step_and_waits_for_the_first_steps(tmp_path) -> None:
    controller = controller_for(_trainer(tmp_path), FakeWorkerGroups([ScriptedAttempt()]),
                                hang_timeout_s="auto", hang_floor_s=60.0)

    def status(idle_s, steps=5, slowest=1.0, long=False):
        return WorkerStatus(WorkerState.RUNNING, idle_s=idle_s, steps=steps,
                            slowest_step_s=slowest, long_phase=long)

    assert not controller._is_hung(status(59))
    assert controller._is_hung(status(61))
    assert not controller._is_hung(status(61, slowest=4.0))  # 20 x 4 s = 80 s
    assert controller._is_hung(status(81, slowest=4.0))
    assert not controller._is_hung(status(1e6, steps=0))  # a long first step, a compile
    assert not controller._is_hung(status(1e6, long=True))  # ray_lit.long_phase()
    off = controller_for(_trainer(tmp_path), FakeWorkerGroups([ScriptedAttempt()]),
                         hang_timeout_s=None)
    assert not off._is_hung(status(1e6))


def test_a_hang_names_the_rank_outside_the_collective_and_writes_the_stacks(tmp_path):
    groups = FakeWorkerGroups([ScriptedAttempt(steps=10, hang=(1, 3))])
    trainer = _trainer(tmp_path, max_failures=0)
    controller = controller_for(trainer, groups, hang_timeout_s="auto", hang_floor_s=0.5)
    with pytest.raises(TrainingFailedError) as info:
        controller.run()
    error = info.value
    assert error.rank == 1
    text = error.original_traceback
    assert "not in a collective" in text and "in training_step" in text
    assert "rank(s) 0 wait in a collective" in text
    path = text.split("the stacks of every rank: ")[1].strip()
    body = pathlib.Path(path).read_text()
    assert "--- rank 0 ---" in body and "--- rank 1 ---" in body
    assert path.startswith(str(tmp_path / "ray_lit_hangs"))


def test_a_hang_with_restarts_left_is_handled_like_a_lost_worker(tmp_path) -> None:
    groups = FakeWorkerGroups([ScriptedAttempt(steps=10, hang=(1, 3)), ScriptedAttempt()])
    trainer = _trainer(tmp_path, max_failures=1)
    controller = controller_for(trainer, groups, hang_timeout_s="auto", hang_floor_s=0.5)
    controller.run()
    assert trainer.num_restarts == 1
    assert controller.states == ["Starting", "Running", "Salvaging", "Restarting", "Starting",
                                 "Running", "Salvaging", "Finished"]


def test_long_phases_nest_and_end() -> None:
    assert not in_long_phase()
    with long_phase("outer"):
        with ray_lit.long_phase("inner"):
            assert in_long_phase()
        assert in_long_phase()
    assert not in_long_phase()


def _stacks_on_rank(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from ray_lit.worker.stacks import rank_stacks

    # a rank that fails leaves the other in a collective: time it out instead of hanging
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=120))

    def stuck_in_user_code() -> None:
        time.sleep(3.0)

    def loop() -> None:
        if rank == 1:
            stuck_in_user_code()  # the culprit: rank 0 waits for it in the barrier
        dist.barrier()

    thread = threading.Thread(target=loop, name="ray_lit-loop")
    thread.start()
    time.sleep(1.5)
    stacks = rank_stacks(rank, thread)
    out[rank] = (stacks.in_collective, stacks.where, "ray_lit-loop" in stacks.text)
    thread.join()
    dist.destroy_process_group()


def test_stacks_tell_the_rank_in_user_code_from_the_rank_in_a_collective() -> None:
    import torch.multiprocessing as mp

    from ray_lit.worker.process_group import find_free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_stacks_on_rank, args=(find_free_port(), out), nprocs=2,
                           start_method="spawn")
        results = dict(out)
    in_collective_0, _, named_0 = results[0]
    in_collective_1, where_1, named_1 = results[1]
    assert in_collective_0 and not in_collective_1
    assert "stuck_in_user_code" in where_1 and named_0 and named_1


def test_a_rank_in_a_long_phase_keeps_its_waiting_peers_from_being_hung(tmp_path) -> None:
    """Rank 0 writes a big checkpoint (a long phase) while rank 1 waits for it in a
    collective: nobody is hung. Without the long phase rank 1 would be."""
    from ray_lit.driver.states import Running, Starting

    trainer = _trainer(tmp_path, max_failures=0)
    # rank 1 stops at step 3 and never finishes: step the state machine a bounded number
    # of times instead of running it to the end
    for phase, expected in (((0, 3), Running), (None, type(None))):
        groups = FakeWorkerGroups([ScriptedAttempt(steps=100, hang=(1, 3),
                                                   long_phase=phase)])
        controller = controller_for(trainer, groups, hang_timeout_s="auto", hang_floor_s=0.5)
        state = controller.step(Starting())
        for _ in range(10):
            state = controller.step(state)
            if not isinstance(state, Running):
                break
        if expected is Running:
            assert isinstance(state, Running)  # still training: nobody is hung
        else:
            assert state.outcome.error.kind == "hang" and state.outcome.error.world_rank == 1
        groups.groups[0].shutdown()


def test_checkpoint_saves_and_writes_are_long_phases(make_trainer, tmp_path) -> None:
    from doubles import DeterministicModel

    seen = []

    class Probe(ray_lit.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            seen.append(in_long_phase())

    trainer = make_trainer(callbacks=[Probe()], max_epochs=1, limit_train_batches=2,
                           num_sanity_val_steps=0)
    trainer.fit(DeterministicModel())
    trainer.save_checkpoint(str(tmp_path / "x.ckpt"))
    assert seen == [True] and not in_long_phase()
