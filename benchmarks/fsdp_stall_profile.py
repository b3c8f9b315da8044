"""Where the training loop waits during an asynchronous sharded (FSDP) checkpoint.

Runs ``fsdp_memory.py``'s model with ``strategy="fsdp"`` and ``checkpoint_every_n_steps`` on Ray
workers and times, on every rank, each part of ``CheckpointWriter.take`` (the loop's stall at a
checkpoint boundary): waiting for the previous write (``_settle_previous``), collecting this
rank's state (``_shard_state``: rank 0's ``dump_checkpoint`` included), splitting it
(``split_checkpoint``), the plan at the boundary (``ShardPlanner.plan``; its gathers through the
store, ``_StoreExchange.all_gather``, run in a background thread and are listed apart: they no
longer block the loop), and the host capture (``HostSnapshot.capture``). The timers are
installed in each worker by the module's ``setup`` hook (wrapping the methods in that process
only).

    python benchmarks/fsdp_stall_profile.py --workers 4
    python benchmarks/fsdp_stall_profile.py --workers 2 --quick

Prints one row per checkpoint: the slowest rank's time in each part (ms).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import ray_lit  # noqa: E402
from benchmarks.fsdp_memory import Net  # noqa: E402  (sets the Ray environment variables)
from benchmarks.workloads import SyntheticDataset, current_rank  # noqa: E402

# (module, attribute path, label): what ``take`` spends its time in
PARTS = [
    ("ray_lit.checkpoint.writer", "CheckpointWriter.take", "take (stall)"),
    ("ray_lit.checkpoint.writer", "CheckpointWriter._settle_previous", "previous write"),
    ("ray_lit.checkpoint.writer", "CheckpointWriter._shard_state", "state"),
    ("ray_lit.storage.sharded_io", "split_checkpoint", "split"),
    ("ray_lit.storage.dcp_plan", "ShardPlanner.plan", "plan"),
    ("ray_lit.storage.dcp_plan", "_StoreExchange.all_gather", "store gathers (background)"),
    ("ray_lit.checkpoint.host_copy", "HostSnapshot.capture", "host capture"),
]
TIMES: dict[str, list[float]] = defaultdict(list)


def _timed(label: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - start)
    return wrapper


def install_timers() -> None:
    """Wrap every part in this process (a worker). Names imported inside functions are looked
    up in their module at call time, so wrapping the module attribute is enough."""
    import importlib

    for module_name, path, label in PARTS:
        owner: Any = importlib.import_module(module_name)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        setattr(owner, name, _timed(label, getattr(owner, name)))


class Profiled(Net):
    def setup(self, stage: str) -> None:
        install_timers()

    def on_train_end(self) -> None:
        writer = self.trainer._host.checkpointer
        if writer is not None:
            writer.wait()
        with open(os.path.join(self.out_dir, f"profile_rank{current_rank()}.json"), "w") as f:
            json.dump(dict(TIMES), f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.width, args.depth, args.steps, args.every = 128, 4, 8, 2
    out_dir = tempfile.mkdtemp(prefix="ray_lit_stall_profile_")
    import ray

    ray.init(address="local", num_cpus=max(args.workers, os.cpu_count() or 1),
             include_dashboard=False, log_to_driver=False)
    try:
        data = SyntheticDataset(args.steps * args.batch * args.workers, (args.width,), seed=0)
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False)
        torch.manual_seed(0)
        module = Profiled(args.width, args.depth, out_dir, "profile", False)
        trainer = ray_lit.fit(module, loader, num_workers=args.workers, max_epochs=1,
                              strategy="fsdp", checkpoint_every_n_steps=args.every,
                              storage_path=os.path.join(out_dir, "runs"), run_name="profile",
                              resume="never", enable_progress_bar=False, logger=False,
                              enable_checkpointing=False, enable_model_summary=False,
                              num_sanity_val_steps=0)
        trainer.teardown()
    finally:
        ray.shutdown()
    ranks = []
    for r in range(args.workers):
        with open(os.path.join(out_dir, f"profile_rank{r}.json")) as f:
            ranks.append(json.load(f))
    background = "store gathers (background)"  # not one per checkpoint: summed below
    labels = [label for _, _, label in PARTS if label != background]
    takes = len(ranks[0].get("take (stall)", []))
    print(f"{args.workers} workers, every {args.every} steps; the slowest rank's ms per part")
    print("| checkpoint | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for i in range(takes):
        cells = []
        for label in labels:
            values = [r[label][i] for r in ranks if len(r.get(label, [])) > i]
            cells.append(f"{max(values) * 1e3:.1f}" if values else "-")
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    gathers = [sum(r.get(background, [])) for r in ranks]
    print(f"\n{background}, off the loop thread: {max(gathers) * 1e3:.1f} ms in all "
          "(slowest rank)")
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
