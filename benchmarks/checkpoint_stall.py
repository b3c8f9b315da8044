"""Checkpoint stall for a ~100M-parameter model: ray_lit's asynchronous fault-tolerance
checkpoint vs a synchronous ``torch.save`` of the same state.

A real ``ray_lit.fit`` on Ray workers trains a stack of ``Linear`` layers (~100M parameters,
Adam: model + optimizer state ~1.2 GB) with ``checkpoint_every_n_steps`` set. It reports:

* ``stall_s`` - what ``CheckpointWriter.take`` records per checkpoint: the time the loop is
  blocked at the boundary (waiting for the previous write, copying buffers, counters, RNG);
* ``fence_wait_s`` - the time optimizer steps waited for the copy of parameters and optimizer
  state that runs during the next forward/backward (``HostSnapshot``); "blocked" is the sum;
* the effective cost - training time of the checkpointing run minus that of the same run
  without step checkpoints, per checkpoint (the background serialisation shares the CPUs and
  the GIL with the training thread, and a take waits for the previous write);
* the synchronous baseline, measured on the worker after training on the same trainer state:
  ``dump_checkpoint`` + ``torch.save`` to a local file (plain), and ``dump_checkpoint`` + ray_lit's
  own ``save_checkpoint`` (what ``CheckpointWriter(asynchronous=False)`` would block for).

Memory: ~1.6 GB of parameters and Adam state per worker plus ~3.6 GB transient on rank 0 while
a checkpoint is serialised; one worker by default (``--workers 2`` adds a DDP peer, ~2 GB more).

    python benchmarks/checkpoint_stall.py
    python benchmarks/checkpoint_stall.py --quick          # a ~10M model, a few steps
    python benchmarks/checkpoint_stall.py --snapshot       # in-memory peer snapshots instead
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"]
                                   if os.environ.get("PYTHONPATH") else "")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import ray_lit  # noqa: E402
from benchmarks.workloads import SyntheticDataset, current_rank, peak_rss_mb  # noqa: E402


def big_net(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class BigModule(ray_lit.LightningModule):
    def __init__(self, width: int, depth: int, out_dir: str, tag: str, sync_repeats: int) -> None:
        super().__init__()
        self.net = big_net(width, depth)
        self.out_dir, self.tag, self.sync_repeats = out_dir, tag, sync_repeats
        self.step_starts: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.step_starts.append(time.perf_counter())
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)

    def on_train_end(self):
        end = time.perf_counter()
        writer = self.trainer._host.checkpointer
        writer.wait()  # a write still in flight belongs to the run
        record: dict[str, Any] = {
            "rank": current_rank(), "params": sum(p.numel() for p in self.parameters()),
            "step_starts": self.step_starts, "train_end": end,
            "stall_s": list(writer.stall_s), "fence_wait_s": list(writer.fence_wait_s),
            "peak_rss_mb_during_training": peak_rss_mb()}
        if record["rank"] == 0 and self.sync_repeats:
            record.update(self._sync_baseline())
        with open(os.path.join(self.out_dir, f"{self.tag}_rank{record['rank']}.json"), "w") as f:
            json.dump(record, f)

    def _sync_baseline(self) -> dict[str, Any]:
        """The same state saved synchronously, as a loop without a writer thread would."""
        from ray_lit.storage.checkpoint_io import save_checkpoint
        from ray_lit.loop.checkpoint_state import dump_checkpoint

        plain, ray_lit_save, sizes = [], [], []
        target = os.path.join(self.out_dir, "sync_ckpt.pt")
        for _ in range(self.sync_repeats):
            start = time.perf_counter()
            torch.save(dump_checkpoint(self.trainer._ctx), target)
            plain.append(time.perf_counter() - start)
            sizes.append(os.path.getsize(target))
            os.remove(target)
            start = time.perf_counter()
            save_checkpoint(dump_checkpoint(self.trainer._ctx), target)
            ray_lit_save.append(time.perf_counter() - start)
            os.remove(target)
        return {"sync_torch_save_s": plain, "sync_ray_lit_save_s": ray_lit_save,
                "checkpoint_bytes": sizes[0], "peak_rss_mb_after_sync": peak_rss_mb()}


def fit_once(args: argparse.Namespace, out_dir: str, tag: str, every: int | None,
             sync_repeats: int, snapshot_every: int | None = None) -> dict[str, Any]:
    steps = args.steps
    data = SyntheticDataset(steps * args.batch * args.workers, (args.width,), seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False)
    module = BigModule(args.width, args.depth, out_dir, tag, sync_repeats)
    shutil.rmtree(os.path.join(out_dir, "runs"), ignore_errors=True)
    start = time.time()
    trainer = ray_lit.fit(module, loader, num_workers=args.workers, max_epochs=1,
                          checkpoint_every_n_steps=every,
                          snapshot_every_n_steps=snapshot_every,
                          storage_path=os.path.join(out_dir, "runs"), run_name=tag,
                          resume="never", enable_progress_bar=False, logger=False,
                          enable_checkpointing=False, enable_model_summary=False)
    wall = time.time() - start
    with open(os.path.join(out_dir, f"{tag}_rank0.json")) as f:
        record = json.load(f)
    record["fit_wall_s"] = wall
    record["global_step"] = trainer.global_step
    return record


def _step_times(record: dict[str, Any]) -> list[float]:
    marks = record["step_starts"] + [record["train_end"]]
    return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=2896)
    parser.add_argument("--depth", type=int, default=12, help="12 x 2896^2 ~ 100.7M params")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="checkpoint_every_n_steps")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--window", type=int, default=4,
                        help="steps after a take that count towards its effective cost")
    parser.add_argument("--sync-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--snapshot", action="store_true",
                        help="in-memory peer snapshots every --every steps instead of storage "
                             "checkpoints (snapshot_every_n_steps)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.width, args.depth, args.steps, args.every, args.sync_repeats = 1024, 8, 12, 4, 1
    import cloudpickle
    import ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count(),
             log_to_driver=False)
    out_dir = args.out or tempfile.mkdtemp(prefix="ray_lit_ckpt_stall_")
    os.makedirs(out_dir, exist_ok=True)
    # without step checkpoints first (only the one at the end of the epoch, after the last step)
    base = fit_once(args, out_dir, "nockpt", None, 0)
    if args.snapshot:
        with_ckpt = fit_once(args, out_dir, "ckpt", None, args.sync_repeats,
                             snapshot_every=args.every)
    else:
        with_ckpt = fit_once(args, out_dir, "ckpt", args.every, args.sync_repeats)
    ray.shutdown()

    # the end-of-epoch/end-of-fit checkpoint is taken after the last step in both runs
    base_train = sum(_step_times(base)[1:-1])
    ckpt_train = sum(_step_times(with_ckpt)[1:-1])
    mid_run = list(range(args.every, args.steps, args.every))  # checkpoints between steps
    n_ckpt = max(1, len(mid_run))
    stalls = with_ckpt["stall_s"]
    step_stalls = stalls[:len(mid_run)]
    sync_plain = statistics.median(with_ckpt["sync_torch_save_s"])
    sync_rl = statistics.median(with_ckpt["sync_ray_lit_save_s"])
    effective = (ckpt_train - base_train) / n_ckpt
    # blocked per checkpoint: the copy at the boundary plus the optimizer steps that waited for
    # the copy of parameters and optimizer state overlapped with the next forward/backward
    fence = with_ckpt.get("fence_wait_s", [])
    blocked = [s + (sum(fence) / len(step_stalls) if step_stalls else 0.0)
               for s in step_stalls]
    # window method (robust to drift between the two runs): the steps from the one that ends
    # with the take to ``window`` steps later, against the median step of the same run outside
    # the windows
    durations = _step_times(with_ckpt)
    windows = [list(range(k - 1, min(k - 1 + args.window, len(durations) - 1)))
               for k in mid_run]
    inside = {i for w in windows for i in w}
    outside = [d for i, d in enumerate(durations[1:-1], start=1) if i not in inside]
    typical = statistics.median(outside)
    window_costs = [sum(durations[i] for i in w) - len(w) * typical for w in windows]
    result = {
        "params": with_ckpt["params"], "checkpoint_bytes": with_ckpt["checkpoint_bytes"],
        "workers": args.workers, "steps": args.steps, "every": args.every,
        "median_step_s_without_ckpt": statistics.median(_step_times(base)[1:]),
        "async_stall_s_per_take": step_stalls, "async_stall_median_s":
            statistics.median(step_stalls) if step_stalls else None,
        "fence_wait_s": fence,
        "blocked_s_per_ckpt": blocked,
        "blocked_median_s": statistics.median(blocked) if blocked else None,
        "blocked_ratio_vs_sync_torch_save":
            statistics.median(blocked) / sync_plain if blocked else None,
        "async_effective_cost_per_ckpt_s": effective,
        "async_window_cost_per_ckpt_s": window_costs,
        "async_window_cost_median_s": statistics.median(window_costs) if window_costs else None,
        "median_step_s_outside_windows": typical,
        "sync_torch_save_s": with_ckpt["sync_torch_save_s"],
        "sync_ray_lit_save_s": with_ckpt["sync_ray_lit_save_s"],
        "stall_ratio_vs_sync_torch_save":
            statistics.median(step_stalls) / sync_plain if step_stalls else None,
        "effective_ratio_vs_sync_torch_save": effective / sync_plain,
        "window_ratio_vs_sync_torch_save":
            statistics.median(window_costs) / sync_plain if window_costs else None,
        "sync_ray_lit_over_torch_save": sync_rl / sync_plain,
        "peak_rss_mb_rank0": with_ckpt["peak_rss_mb_after_sync"],
        "peak_rss_mb_rank0_during_training": with_ckpt["peak_rss_mb_during_training"],
        "train_s_without_ckpt": base_train, "train_s_with_ckpt": ckpt_train,
    }
    print(json.dumps(result, indent=1))
    print("in-memory peer snapshots (snapshot_every_n_steps)" if args.snapshot else
          "storage checkpoints (checkpoint_every_n_steps)")
    print(f"{result['params'] / 1e6:.1f}M params, checkpoint {result['checkpoint_bytes'] / 1e9:.2f}"
          f" GB: training blocked {result['blocked_median_s']:.3f} s per checkpoint "
          f"({result['blocked_ratio_vs_sync_torch_save']:.1%} of a synchronous torch.save, "
          f"{sync_plain:.2f} s; target <= 10%): copy at the boundary "
          f"{result['async_stall_median_s']:.3f} s, optimizer steps waiting for the overlapped "
          f"copy {sum(fence):.3f} s in all; training time lost per checkpoint: "
          f"{result['async_window_cost_median_s']:.2f} s over the {args.window} steps from the "
          f"take ({result['window_ratio_vs_sync_torch_save']:.1%} of sync), "
          f"{effective:.2f} s by the difference of the two runs "
          f"({result['effective_ratio_vs_sync_torch_save']:.1%}); synchronous ray_lit "
          f"save_checkpoint (fsync) {sync_rl:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
