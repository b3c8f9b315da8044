"""The driver's cost against world size, on ``ray_lit.testing`` fakes (no Ray, no processes).

For each world size N the controller supervises a fake group of N ranks for a fixed number of
polls (every poll is one optimizer step on every rank, each rank hands over one checkpoint part
every ``--every`` steps), then a second run loses one worker mid-way and recovers. Printed per
N: the controller's CPU time per poll and per worker per poll, the checkpoint commit time, and
the recovery (salvage + regroup) time. The fakes cost a few microseconds per rank, so the slope
is the controller's own.

    python benchmarks/scale_curve.py [--sizes 2,8,32,128,512,1024] [--polls 200]

Targets (issue 17): work per poll grows no faster than linearly; under 1 ms per worker per poll.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray_lit  # noqa: E402
from ray_lit.checkpoint.layout import checkpoint_name  # noqa: E402
from ray_lit.checkpoint.manager import CheckpointManager  # noqa: E402
from ray_lit.messages import PartWritten  # noqa: E402
from ray_lit.testing import FakeWorkerGroups, ScriptedAttempt, controller_for  # noqa: E402


def _parts(world: int, steps: int, every: int) -> dict[int, list[PartWritten]]:
    """Each rank hands over its part of the checkpoint of every ``every``-th step."""
    return {s: [PartWritten(checkpoint_name(s, 0), r, world, {"global_step": s, "epoch": 0})
                for r in range(world)] for s in range(every, steps + 1, every)}


def measure(world: int, polls: int, every: int, root: str) -> dict[str, float]:
    trainer = ray_lit.Trainer(num_workers=world, max_failures=1, logger=False,
                              enable_progress_bar=False, default_root_dir=root)
    manager = CheckpointManager(os.path.join(root, f"run{world}"), keep=2)
    commits: list[float] = []
    original = manager._commit

    def timed_commit(name, entry):  # the manifest write and the prune, per commit
        start = time.perf_counter()
        original(name, entry)
        commits.append(time.perf_counter() - start)

    manager._commit = timed_commit
    groups = FakeWorkerGroups([ScriptedAttempt(steps=polls,
                                               confirmations=_parts(world, polls, every))])
    controller = controller_for(trainer, groups, manager=manager)
    start = time.process_time()
    controller.run()
    cpu = time.process_time() - start
    # one lost worker half-way: salvage, restart, regroup around the survivors; the CPU time
    # of those transitions (not of the polls) is the recovery's
    lost = FakeWorkerGroups([ScriptedAttempt(steps=polls, die=(world - 1, polls // 2)),
                             ScriptedAttempt(steps=polls)])
    recovery = controller_for(trainer, lost)
    spent: dict[str, float] = {}
    step = recovery.step

    def timed_step(state):
        begin = time.process_time()
        try:
            return step(state)
        finally:
            name = type(state).__name__
            spent[name] = spent.get(name, 0.0) + time.process_time() - begin

    recovery.step = timed_step
    recovery.run()
    # the second Starting is the recovery's; the first one formed the original group
    recovery_cpu = spent.get("Salvaging", 0.0) / 2 + spent.get("Restarting", 0.0) + \
        spent.get("Starting", 0.0) / 2
    return {"per_poll_ms": cpu / polls * 1e3, "per_worker_us": cpu / polls / world * 1e6,
            "commit_ms": 1e3 * sorted(commits)[len(commits) // 2] if commits else float("nan"),
            "recovery_ms": recovery_cpu * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2,8,32,128,512,1024")
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="steps between checkpoints")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"controller on fakes: {args.polls} polls, a checkpoint every {args.every} steps; "
          "CPU time of this process\n")
    print(f"| {'workers':>7} | {'ms / poll':>9} | {'us / worker / poll':>18} | "
          f"{'commit ms':>9} | {'recovery ms':>11} |")
    print(f"|{'-' * 9}|{'-' * 11}|{'-' * 20}|{'-' * 11}|{'-' * 13}|")
    with tempfile.TemporaryDirectory() as root:
        for world in sizes:
            r = measure(world, args.polls, args.every, root)
            print(f"| {world:>7} | {r['per_poll_ms']:9.3f} | {r['per_worker_us']:18.1f} | "
                  f"{r['commit_ms']:9.2f} | {r['recovery_ms']:11.1f} |")


if __name__ == "__main__":
    main()
