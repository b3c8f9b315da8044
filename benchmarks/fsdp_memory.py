"""FSDP vs DDP on Ray workers: per-rank memory, steady step time, checkpoint stall.

Three measurements on one model (a stack of ``Linear`` layers sized so that DDP's per-rank
parameters + gradients + Adam state are a few hundred MB):

1. **Memory per rank** (ray_lit ``strategy="ddp"`` vs ``strategy="fsdp"``): the bytes of this
   rank's own parameters, gradients and optimizer state (a DTensor counts its local shard),
   measured after the last optimizer step, and the process's peak RSS (VmHWM).
2. **Steady step time**: the median time between two ``training_step`` starts after a warm-up,
   for ray_lit DDP, ray_lit FSDP and raw torch FSDP2 (``fully_shard`` per layer and on the
   root, gloo, plain processes from ``torch.multiprocessing``: no Ray, no ray_lit).
3. **Checkpoint stall** (ray_lit FSDP with ``checkpoint_every_n_steps``): the time the loop is
   blocked per sharded asynchronous fault-tolerance checkpoint (``CheckpointWriter.stall_s``:
   the plan gather and the small copies at the boundary, plus ``fence_wait_s``: optimizer steps
   waiting for the overlapped copy of the shards), vs a synchronous full save of the same state
   on the same workers after training (``trainer.save_checkpoint``: every rank joins the
   gather, rank 0 writes one file; the loop would be blocked for all of it).

    python benchmarks/fsdp_memory.py                 # 2 workers, ~19M parameters
    python benchmarks/fsdp_memory.py --workers 4
    python benchmarks/fsdp_memory.py --quick         # a small model, a few steps (smoke test)
    python benchmarks/fsdp_memory.py --runs raw,fsdp --repeats 3 --steps 30   # step time vs raw

Prints a table and writes ``--out/fsdp_memory.json``.
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

WARMUP = 3  # steps left out of the step time (first all-gathers, allocator warm-up)


def stack(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def local_bytes(tensor: torch.Tensor | None) -> int:
    """The bytes this rank holds of ``tensor`` (a DTensor: its local shard)."""
    if tensor is None:
        return 0
    local = getattr(tensor, "_local_tensor", tensor)
    return local.numel() * local.element_size()


def state_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's parameter, gradient and optimizer-state bytes."""
    opt = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
              if isinstance(v, torch.Tensor))
    return {"param_bytes": sum(local_bytes(p) for p in params),
            "grad_bytes": sum(local_bytes(p.grad) for p in params), "optim_bytes": opt}


def median_step_s(starts: list[float]) -> float:
    gaps = [b - a for a, b in zip(starts[WARMUP:], starts[WARMUP + 1:])]
    return statistics.median(gaps) if gaps else float("nan")


class Net(ray_lit.LightningModule):
    def __init__(self, width: int, depth: int, out_dir: str, tag: str, sync_save: bool) -> None:
        super().__init__()
        self.net = stack(width, depth)
        self.out_dir, self.tag, self.sync_save = out_dir, tag, sync_save
        self.step_starts: list[float] = []
        self.memory: dict[str, int] = {}

    def training_step(self, batch, batch_idx):
        self.step_starts.append(time.perf_counter())
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_before_zero_grad(self, optimizer) -> None:  # after the step: gradients still there
        self.memory = state_bytes(list(self.parameters()), optimizer)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)

    def on_train_end(self) -> None:
        writer = self.trainer._host.checkpointer
        if writer is not None:
            writer.wait()  # a write still in flight belongs to the run
        record: dict[str, Any] = {
            "rank": current_rank(), **self.memory, "peak_rss_mb": peak_rss_mb(),
            "step_s": median_step_s(self.step_starts),
            "stall_s": list(writer.stall_s) if writer is not None else [],
            "fence_wait_s": list(writer.fence_wait_s) if writer is not None else []}
        if self.sync_save:  # COLLECTIVE: every rank joins the gather of the full state
            target = os.path.join(self.out_dir, f"{self.tag}_sync.ckpt")
            start = time.perf_counter()
            self.trainer.save_checkpoint(target)
            record["sync_full_save_s"] = time.perf_counter() - start
            if record["rank"] == 0:
                record["full_checkpoint_mb"] = os.path.getsize(target) / 2**20
        with open(os.path.join(self.out_dir, f"{self.tag}_rank{record['rank']}.json"), "w") as f:
            json.dump(record, f)


def ray_lit_run(args: argparse.Namespace, out_dir: str, strategy: str, every: int | None,
                sync_save: bool = False) -> list[dict[str, Any]]:
    tag = f"{strategy}_ckpt{every or 0}"
    data = SyntheticDataset(args.steps * args.batch * args.workers, (args.width,), seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False)
    torch.manual_seed(0)
    module = Net(args.width, args.depth, out_dir, tag, sync_save)
    runs = os.path.join(out_dir, "runs")
    shutil.rmtree(runs, ignore_errors=True)
    trainer = ray_lit.fit(module, loader, num_workers=args.workers, max_epochs=1,
                          strategy=strategy, checkpoint_every_n_steps=every,
                          storage_path=runs, run_name=tag, resume="never",
                          enable_progress_bar=False, logger=False, enable_checkpointing=False,
                          enable_model_summary=False, num_sanity_val_steps=0)
    trainer.teardown()
    return [json.load(open(os.path.join(out_dir, f"{tag}_rank{r}.json")))
            for r in range(args.workers)]


# --- raw torch FSDP2 in plain processes ------------------------------------------------------
def _raw_fsdp_rank(rank: int, args: argparse.Namespace, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.workers))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.workers)
    torch.manual_seed(0)
    model = stack(args.width, args.depth)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = SyntheticDataset(args.steps * args.batch * args.workers, (args.width,), seed=0)
    starts: list[float] = []
    memory: dict[str, int] = {}
    for step in range(args.steps):
        starts.append(time.perf_counter())
        index = [(step * args.workers + rank) * args.batch + i for i in range(args.batch)]
        x = torch.stack([data[i][0] for i in index])
        y = torch.stack([torch.as_tensor(data[i][1]) for i in index])
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        memory = state_bytes(list(model.parameters()), optimizer)
        optimizer.zero_grad()
    record = {"rank": rank, **memory, "peak_rss_mb": peak_rss_mb(),
              "step_s": median_step_s(starts)}
    with open(os.path.join(out_dir, f"raw_fsdp_rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def raw_fsdp_run(args: argparse.Namespace, out_dir: str) -> list[dict[str, Any]]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_raw_fsdp_rank, args=(args, port, out_dir), nprocs=args.workers, join=True)
    return [json.load(open(os.path.join(out_dir, f"raw_fsdp_rank{r}.json")))
            for r in range(args.workers)]


# --- report -----------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [f"{args.workers} workers, {args.params / 1e6:.1f}M parameters "
             f"(width {args.width}, depth {args.depth}), batch {args.batch} per rank, "
             f"{args.steps} steps",
             "",
             "| run | params MB | grads MB | optim MB | sum MB (max rank) | peak RSS MB | "
             "step s (median) |",
             "|---|---|---|---|---|---|---|"]
    for name, ranks in results.items():
        worst = max(ranks, key=lambda r: r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"])
        total = worst["param_bytes"] + worst["grad_bytes"] + worst["optim_bytes"]
        lines.append(f"| {name} | {_mb(worst['param_bytes'])} | {_mb(worst['grad_bytes'])} | "
                     f"{_mb(worst['optim_bytes'])} | {_mb(total)} | "
                     f"{max(r['peak_rss_mb'] for r in ranks):8.0f} | "
                     f"{max(r['step_s'] for r in ranks):.3f} |")
    ddp, fsdp = results.get("ray_lit ddp"), results.get("ray_lit fsdp")
    if ddp and fsdp:
        d = max(r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] for r in ddp)
        f = max(r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] for r in fsdp)
        lines.append(f"\nFSDP per-rank state / (DDP's / N): {f / (d / args.workers):.3f}")
    raw = results.get("raw fsdp2")
    if fsdp and raw:
        ratio = max(r["step_s"] for r in fsdp) / max(r["step_s"] for r in raw)
        lines.append(f"ray_lit FSDP step time / raw FSDP2's: {ratio:.3f}")
    ckpt = results.get("ray_lit fsdp + checkpoints")
    if ckpt:
        per_take = [max(r["stall_s"][i] for r in ckpt) for i in range(len(ckpt[0]["stall_s"]))]
        fence = max(sum(r["fence_wait_s"]) for r in ckpt)
        blocked = (sum(per_take) + fence) / max(1, len(per_take))
        sync = max(r.get("sync_full_save_s", 0.0) for r in ckpt)
        lines.append(f"checkpoint stall, sharded async: {blocked * 1e3:.1f} ms per checkpoint "
                     f"({len(per_take)} checkpoints; boundary median "
                     f"{statistics.median(per_take) * 1e3:.1f} ms, fence waits "
                     f"{fence * 1e3:.1f} ms in all); synchronous full save "
                     f"({ckpt[0].get('full_checkpoint_mb', 0):.0f} MB): {sync * 1e3:.0f} ms; "
                     f"ratio {blocked / sync:.3f}")
    return "\n".join(lines)


def step_table(repeats: dict[str, list[tuple[float, list[dict[str, Any]]]]]) -> str:
    """Step time of every repeat of every run (the slowest rank's median), in the order they
    ran, with the 1-minute load average at each run's start; then median and spread per run."""
    lines = ["", "| run | step s per repeat (load average at start) | median | spread |",
             "|---|---|---|---|"]
    medians: dict[str, float] = {}
    for name, runs in repeats.items():
        steps = [max(r["step_s"] for r in ranks) for _, ranks in runs]
        medians[name] = statistics.median(steps)
        cells = ", ".join(f"{s:.3f} ({load:.1f})" for s, (load, _) in zip(steps, runs))
        lines.append(f"| {name} | {cells} | {medians[name]:.3f} | "
                     f"{(max(steps) - min(steps)) / medians[name] * 100:.0f} % |")
    if "ray_lit fsdp" in medians and "raw fsdp2" in medians:
        lines.append(f"\nmedian step time, ray_lit FSDP / raw FSDP2: "
                     f"{medians['ray_lit fsdp'] / medians['raw fsdp2']:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=4, help="checkpoint_every_n_steps")
    parser.add_argument("--runs", default="ddp,fsdp,ckpt,raw",
                        help="which runs, comma-separated, in this order: ddp, fsdp, ckpt, raw")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the whole --runs sequence this many times, interleaved "
                             "(raw, fsdp, raw, fsdp, ...): a shared machine's load drifts")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.width, args.depth, args.steps, args.every = 128, 4, 8, 2
    args.params = sum(p.numel() for p in stack(args.width, args.depth).parameters())
    out_dir = args.out or tempfile.mkdtemp(prefix="ray_lit_fsdp_bench_")
    os.makedirs(out_dir, exist_ok=True)
    import ray

    # Ray stays up during the raw runs (idle) so that the runs can alternate
    ray.init(address="local", num_cpus=max(args.workers, os.cpu_count() or 1),
             include_dashboard=False, log_to_driver=False)
    names = {"ddp": "ray_lit ddp", "fsdp": "ray_lit fsdp",
             "ckpt": "ray_lit fsdp + checkpoints", "raw": "raw fsdp2"}
    runs = args.runs.split(",")
    repeats: dict[str, list[tuple[float, list[dict[str, Any]]]]] = {names[r]: [] for r in runs}
    try:
        for _ in range(args.repeats):
            for run in runs:
                load = os.getloadavg()[0]
                if run == "raw":
                    ranks = raw_fsdp_run(args, out_dir)
                elif run == "ckpt":
                    ranks = ray_lit_run(args, out_dir, "fsdp", args.every, sync_save=True)
                else:
                    ranks = ray_lit_run(args, out_dir, run, None)
                repeats[names[run]].append((load, ranks))
    finally:
        ray.shutdown()
    results = {name: runs_[-1][1] for name, runs_ in repeats.items()}  # the last repeat
    text = report(results, args)
    if args.repeats > 1:
        text += "\n" + step_table(repeats)
        for name, runs_ in repeats.items():
            if name == "ray_lit fsdp + checkpoints":
                text += "\n" + "\n".join(
                    f"repeat {i + 1}: " + report({name: ranks}, args).splitlines()[-1]
                    for i, (_, ranks) in enumerate(runs_))
    print(text)
    with open(os.path.join(out_dir, "fsdp_memory.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "repeats": repeats, "table": text},
                  f, indent=1)
    print(f"\nraw results: {out_dir}/fsdp_memory.json")


if __name__ == "__main__":
    main()
