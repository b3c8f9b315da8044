"""Attempts are fenced: every checkpoint part carries the attempt that wrote it (in its file
name), and a commit takes the parts of one attempt only, so a straggler of an earlier attempt
or an orphan of a killed driver can never end up inside a committed checkpoint."""

from __future__ import annotations

import json

from ray_lit.checkpoint.layout import checkpoint_name, part_name, part_rank
from ray_lit.checkpoint.manager import CheckpointManager
from ray_lit.testing import FakeWorkerGroups, ScriptedAttempt, controller_for

META = {"global_step": 6, "epoch": 0}


def _write(tmp_path, name: str, rank: int, fence: str, data: bytes = b"part") -> None:
    directory = tmp_path / "run" / "checkpoints" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / part_name(rank, fence)).write_bytes(data)


def test_parts_of_two_attempts_never_make_one_checkpoint(tmp_path) -> None:
    manager = CheckpointManager(str(tmp_path / "run"))
    name = checkpoint_name(6, 0)
    _write(tmp_path, name, 0, "new1")
    _write(tmp_path, name, 1, "old0")  # a straggler of the earlier attempt
    assert not manager.confirm(name, 0, 2, META, fence="new1")
    assert not manager.confirm(name, 1, 2, META, fence="old0")  # not the same attempt
    assert manager.committed() == []
    _write(tmp_path, name, 1, "new1")
    assert manager.confirm(name, 1, 2, META, fence="new1")
    manifest = json.loads((tmp_path / "run" / "checkpoints" / name / "manifest.json").read_text())
    assert manifest["parts"] == ["rank_0-new1.pt", "rank_1-new1.pt"]


def test_a_straggler_writing_into_a_committed_checkpoint_changes_nothing_read(tmp_path):
    manager = CheckpointManager(str(tmp_path / "run"))
    name = checkpoint_name(6, 0)
    for rank in (0, 1):
        _write(tmp_path, name, rank, "b2")
        manager.confirm(name, rank, 2, META, fence="b2")
    # an orphan of a killed driver finishes its write of the same step afterwards
    _write(tmp_path, name, 1, "a0", data=b"stale")
    latest = manager.latest()
    assert latest.part_uri(1).endswith("/rank_1-b2.pt")
    assert latest.part_uri(0).endswith("/rank_0-b2.pt")
    assert latest.part_uri(3).endswith("/rank_0-b2.pt")  # fewer ranks: rank 0's (elastic)


def test_checkpoints_written_before_fencing_still_load(tmp_path) -> None:
    manager = CheckpointManager(str(tmp_path / "run"))
    name = checkpoint_name(4, 0)
    for rank in (0, 1):
        _write(tmp_path, name, rank, "")
        manager.confirm(name, rank, 2, {"global_step": 4, "epoch": 0})
    assert manager.latest().part_uri(1).endswith("/rank_1.pt")
    assert [part_rank(n) for n in ("rank_0.pt", "rank_12-ab3.pt", "manifest.json")] == \
        [0, 12, None]


def test_every_attempt_of_every_driver_run_has_its_own_fence() -> None:
    import ray_lit

    trainer = ray_lit.Trainer(num_workers=2, max_failures=1, logger=False,
                              enable_progress_bar=False)
    groups = FakeWorkerGroups([ScriptedAttempt(die=(1, 2)), ScriptedAttempt()])
    controller_for(trainer, groups).run()
    first, second = (g.job.fence for g in groups.groups)
    assert first and second and first != second
    again = FakeWorkerGroups([ScriptedAttempt()])
    controller_for(trainer, again).run()  # another driver run: attempt 0 again
    assert again.groups[0].job.fence not in (first, second)


def test_a_worker_writes_its_part_under_its_attempts_fence(tmp_path) -> None:
    from types import SimpleNamespace

    from ray_lit.checkpoint.writer import CheckpointWriter
    from ray_lit.messages import PartWritten
    from ray_lit.strategies import SingleDeviceStrategy

    class Progress:
        global_step, epoch, batches_done = 6, 0, 2

        def state_dict(self) -> dict:
            return {"global_step": self.global_step}

    posted = []
    worker = SimpleNamespace(post=posted.append, aborting=False, stop_at_step=None)
    # a stand-in loop context: the writer reads the counters and the host from it, Lightning's
    # names from its trainer
    trainer = SimpleNamespace(global_step=6, optimizers=[], num_training_batches=10)
    ctx = SimpleNamespace(trainer=trainer, progress=Progress(), strategy=SingleDeviceStrategy(),
                          host=SimpleNamespace(sampler_state=lambda n: {"done": n}))
    writer = CheckpointWriter(str(tmp_path / "run"), None, asynchronous=False)
    writer.attach(worker, SimpleNamespace(world_rank=1, world_size=2), attempt=3,
                  fence="c0ffeea3")
    writer.take(ctx)
    name = checkpoint_name(6, 0)
    assert (tmp_path / "run" / "checkpoints" / name / "rank_1-c0ffeea3.pt").exists()
    assert posted == [PartWritten(name, 1, 2, META, "c0ffeea3")]
