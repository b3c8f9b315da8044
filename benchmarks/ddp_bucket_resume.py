"""Does a DDP run resumed mid-way end bit-identical to the uninterrupted run? (torch only)

Four gloo ranks (torch.multiprocessing spawn, no Ray) train a small MLP with Adam on fixed
per-rank batches. Run A trains ``STEPS`` steps in one ``DistributedDataParallel``. Run B trains
``SPLIT`` steps, then (as a resumed job would) builds a new DDP around a fresh module, loads
the model and optimizer state, and trains the remaining steps. The script prints whether the
final weights are equal and their largest difference, and DDP's bucket sizes and whether it had
rebuilt its buckets at each step. ``--mode``: plain DDP, DDP with
``find_unused_parameters=True`` (which never rebuilds its buckets: the control), or ``ray_lit``'s
``DDPStrategy``.

Run: ``python benchmarks/ddp_bucket_resume.py [--world 4] [--mode plain|find_unused|ray_lit]``

``--timing`` instead measures the steady-state step time of ``ray_lit``'s DDP with its setup-time
bucket layout pass and without it (the pass switched off), alternating rounds, at ``--world``
ranks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 6
SPLIT = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    # layers of different sizes so a bucket's element offsets depend on its parameter order
    return nn.Sequential(nn.Linear(37, 300), nn.Tanh(), nn.Linear(300, 129), nn.Tanh(),
                         nn.Linear(129, 11), nn.Tanh(), nn.Linear(11, 5))


def _wrap(module: nn.Module, mode: str) -> nn.Module:
    if mode != "ray_lit":
        # find_unused_parameters=True is the control: DDP never rebuilds its buckets then
        return nn.parallel.DistributedDataParallel(
            module, find_unused_parameters=mode == "find_unused")
    from ray_lit.strategies.ddp import DDPStrategy

    strategy = DDPStrategy()
    strategy.connect(global_rank=dist.get_rank(), world_size=dist.get_world_size(),
                     local_rank=dist.get_rank(), node_rank=0, device=torch.device("cpu"))
    strategy.setup_module(module)
    return strategy._ddp


def _train(rank: int, world: int, steps: range, state: dict | None, mode: str
           ) -> tuple[dict, dict, str]:
    module = _model()
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    if state is not None:
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    ddp = _wrap(module, mode)
    layouts = []
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(16, 37, generator=gen), torch.randn(16, 5, generator=gen)
        if mode == "ray_lit":
            out = ddp("__call__", x)
        else:
            out = ddp(x)
        loss = ((out - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        data = ddp._get_ddp_logging_data()
        layouts.append((data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes"),
                        data.get("has_rebuilt_buckets")))
    return module.state_dict(), opt.state_dict(), f"{layouts}"


def _worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    whole, _, layout_a = _train(rank, world, range(STEPS), None, mode)
    model, opt, layout_b1 = _train(rank, world, range(SPLIT), None, mode)
    resumed, _, layout_b2 = _train(rank, world, range(SPLIT, STEPS),
                                   {"model": model, "opt": opt}, mode)
    if rank == 0:
        diff = max((whole[k] - resumed[k]).abs().max().item() for k in whole)
        equal = all(torch.equal(whole[k], resumed[k]) for k in whole)
        torch.save({"diff": diff, "equal": equal, "layouts": (layout_a, layout_b1, layout_b2)},
                   out)
    dist.destroy_process_group()


def _time_steps(rank: int, settle: bool, steps: int, warmup: int) -> float:
    """Median seconds per training step of ``ray_lit``'s DDP, its layout pass on or off."""
    import ray_lit.strategies.ddp as ddp_module

    real = ddp_module._settle_bucket_layout
    if not settle:
        ddp_module._settle_bucket_layout = lambda ddp: None
    try:
        module = _model()
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)
        ddp = _wrap(module, "ray_lit")
    finally:
        ddp_module._settle_bucket_layout = real
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(64, 37, generator=gen), torch.randn(64, 5, generator=gen)
    times = []
    for step in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        loss = ((ddp("__call__", x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timing_worker(rank: int, world: int, port: int, out: str, rounds: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict[str, list[float]] = {"without the pass": [], "with the pass": []}
    for _ in range(rounds):
        results["without the pass"].append(_time_steps(rank, False, 200, 10))
        results["with the pass"].append(_time_steps(rank, True, 200, 10))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _timing(world: int, port: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "timing.pt")
        mp.spawn(_timing_worker, args=(world, port, out, 5), nprocs=world)
        results = torch.load(out)
    for name, medians in results.items():
        print(f"world={world} {name}: median step {1e3 * statistics.median(medians):.3f} ms "
              f"(per round: {', '.join(f'{1e3 * m:.3f}' for m in medians)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--mode", choices=("plain", "find_unused", "ray_lit"), default="plain",
                        help="plain DDP, DDP that never rebuilds buckets, ray_lit's DDPStrategy")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--timing", action="store_true", help="step time with / without the fix")
    args = parser.parse_args()
    if args.timing:
        _timing(args.world, args.port)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(args.world, args.port, out, args.mode), nprocs=args.world)
        result = torch.load(out)
    print(f"world={args.world} mode={args.mode} equal={result['equal']} "
          f"max|diff|={result['diff']:.3g}")
    for name, layout in zip(("uninterrupted", "first part", "resumed part"), result["layouts"]):
        print(f"  bucket sizes per step, {name}: {layout}")


if __name__ == "__main__":
    main()
