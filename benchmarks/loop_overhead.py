"""ray_lit's per-step loop overhead, in one process, without Ray or DDP.

The MLP workload on one rank: ray_lit's loop (``Trainer(num_workers=0)``: the same loop the Ray
workers run, hooks, metric store, ``self.log``) vs the textbook loop (zero_grad, forward,
backward, step) over the same DataLoader, one thread, alternated ``--repeat`` times. CPU time of
the training thread per step is the measure: it does not move when another process shares the
machine, so it resolves differences of a few percent where wall times of the multi-process runs
cannot.

    python benchmarks/loop_overhead.py                  # 512 steps x 5 repeats
    python benchmarks/loop_overhead.py --steps 256 --repeat 3 --no-log
    python benchmarks/loop_overhead.py --tiny           # Linear(8, 2), batch 4: the loop alone

``--tiny`` shrinks the model and batch until torch's own work is a few microseconds per step, so
the difference to the textbook loop is the framework's per-step cost in absolute terms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import ray_lit  # noqa: E402
from benchmarks.workloads import SyntheticDataset, build_net  # noqa: E402


TINY = False  # --tiny: Linear(8, 2) on batches of 4


def loader(steps: int) -> torch.utils.data.DataLoader:
    if TINY:
        data = torch.utils.data.TensorDataset(torch.randn(steps * 4, 8),
                                              torch.randint(0, 2, (steps * 4,)))
        return torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    data = SyntheticDataset(steps * 64, (784,), seed=1)
    data[0]  # materialise outside the timings
    return torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)


def net() -> torch.nn.Module:
    return torch.nn.Linear(8, 2) if TINY else build_net("mlp")


def plain(steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = loader(steps)
    wall, cpu = time.perf_counter(), time.thread_time()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return time.perf_counter() - wall, time.thread_time() - cpu


class Timed(ray_lit.LightningModule):
    def __init__(self, log_loss: bool) -> None:
        super().__init__()
        self.net = net()
        self.log_loss = log_loss
        self.wall = self.cpu = 0.0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.log_loss:
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def on_train_epoch_start(self):
        self._w, self._c = time.perf_counter(), time.thread_time()

    def on_train_epoch_end(self):
        self.wall, self.cpu = time.perf_counter() - self._w, time.thread_time() - self._c


def ray_lit_loop(steps: int, log_loss: bool, defaults: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    module = Timed(log_loss)
    options = {} if defaults else {"enable_progress_bar": False, "logger": False,
                                   "enable_checkpointing": False,
                                   "enable_model_summary": False}
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        trainer = ray_lit.Trainer(num_workers=0, max_epochs=1, default_root_dir=root, **options)
        trainer.fit(module, loader(steps))
    return module.wall, module.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-log", action="store_true", help="no self.log in training_step")
    parser.add_argument("--defaults", action="store_true",
                        help="ray_lit with the Trainer's defaults (progress bar, logger, ...)")
    parser.add_argument("--tiny", action="store_true",
                        help="Linear(8, 2) on batches of 4: the per-step cost of the loop alone")
    args = parser.parse_args()
    global TINY
    TINY = args.tiny
    torch.set_num_threads(1)
    plain(32)
    ray_lit_loop(32, not args.no_log, args.defaults)  # warm-up: imports, allocator
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "ray_lit": []}
    for _ in range(args.repeat):
        results["plain"].append(plain(args.steps))
        results["ray_lit"].append(ray_lit_loop(args.steps, not args.no_log, args.defaults))
    base_cpu = statistics.median(c for _, c in results["plain"]) / args.steps * 1000
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs) / args.steps * 1000
        cpu = statistics.median(c for _, c in runs) / args.steps * 1000
        best = min(c for _, c in runs) / args.steps * 1000
        best_base = min(c for _, c in results["plain"]) / args.steps * 1000
        print(f"{name:8s} wall {wall:.3f} ms/step, CPU {cpu:.3f} ms/step (best {best:.3f}), "
              f"{cpu / base_cpu:.3f}x plain, {cpu - base_cpu:+.3f} ms/step "
              f"(best {best - best_base:+.3f})")


if __name__ == "__main__":
    main()
