"""The baseline: the workload in plain torch DDP (gloo, one process per rank, one thread each).

``torch.multiprocessing.spawn`` starts one process per rank; each builds the same lazily
generated data set, shards it with ``DistributedSampler``, wraps the model in DDP and runs the
textbook loop (zero_grad, forward, backward, step). Nothing else: no logging, no checkpoints.

Run alone::

    python benchmarks/raw_ddp.py --workload mlp --out /tmp/raw_mlp
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.workloads import Recorder, Workload, build_net, dataset  # noqa: E402


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, w: Workload, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=w.num_workers, timeout=timedelta(seconds=120))
    rec = Recorder(out_dir)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_net(w.name))
    optimizer = torch.optim.Adam(model.parameters(), lr=w.lr)
    data = dataset(w)
    sampler = DistributedSampler(data, num_replicas=w.num_workers, rank=rank, shuffle=True,
                                 seed=0)
    loader = DataLoader(data, batch_size=w.batch_size, sampler=sampler)
    model.train()
    for epoch in range(w.max_epochs):
        rec.epoch_start()
        sampler.set_epoch(epoch)
        for x, y in loader:
            rec.step()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
    rec.train_end()
    rec.dump({"final_loss": float(loss.item())})
    dist.destroy_process_group()


def run(w: Workload, out_dir: str) -> dict:
    """Spawn the ranks, train, return driver-side timestamps."""
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    mp.spawn(_rank_main, args=(w, _free_port(), out_dir), nprocs=w.num_workers, join=True)
    return {"fit_start_ts": start, "done_ts": time.time()}


def run_in_ray_actors(w: Workload, out_dir: str) -> dict:
    """The same ranks, each in a plain Ray actor instead of a spawned process: what any
    Ray-based trainer pays before doing anything of its own (the Ray core worker, Ray's imports,
    its serialization context). Ray must already be initialised."""
    import cloudpickle
    import ray

    import benchmarks.workloads as wl

    for module in (sys.modules[__name__], wl):  # the actors cannot import benchmarks/
        cloudpickle.register_pickle_by_value(module)

    @ray.remote(num_cpus=1)
    class Rank:
        def run(self, rank: int, w: Workload, port: int, out_dir: str) -> None:
            _rank_main(rank, w, port, out_dir)

    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    ranks = [Rank.remote() for _ in range(w.num_workers)]
    port = _free_port()
    ray.get([r.run.remote(i, w, port, out_dir) for i, r in enumerate(ranks)])
    done = time.time()
    for r in ranks:
        ray.kill(r)
    return {"fit_start_ts": start, "done_ts": done}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="mlp", choices=["mlp", "conv"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="/tmp/ray_lit_bench/raw_ddp")
    args = parser.parse_args()
    from benchmarks.workloads import workload

    info = run(workload(args.workload, args.quick), args.out)
    with open(os.path.join(args.out, "driver.json"), "w") as f:
        json.dump(info, f)
    for name in sorted(os.listdir(args.out)):
        with open(os.path.join(args.out, name)) as f:
            print(name, f.read())


if __name__ == "__main__":
    main()
