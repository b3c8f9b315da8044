"""The benchmark workloads, shared by every runner (ray_lit, raw DDP, Lightning, Ray Train).

Two workloads, identical in every framework:

* ``mlp``  - 784-256-10 MLP, Adam, batch 64 per worker, 32,768 synthetic samples (overhead-bound:
  a step is a few hundred microseconds of math, so framework overhead shows);
* ``conv`` - a small convnet on 28x28 synthetic images (compute-bound).

The data set is synthetic and generated lazily, deterministically, in whichever process first
touches it (``SyntheticDataset`` pickles as its recipe, not its tensors), so every framework's
ranks hold the same data in the same way and nobody pays for shipping 100 MB of tensors: the
comparison isolates the trainer. Every rank records per-epoch wall times, the time of its first
training step and its peak RSS (``VmHWM``) and writes them to ``<out_dir>/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset


@dataclass
class Workload:
    name: str
    num_samples: int
    batch_size: int  # per worker
    max_epochs: int
    num_workers: int = 2
    lr: float = 1e-3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def steps_per_epoch(self) -> int:
        per_rank = -(-self.num_samples // self.num_workers)
        return -(-per_rank // self.batch_size)


def workload(name: str, quick: bool = False) -> Workload:
    if name == "mlp":
        return Workload("mlp", 2048 if quick else 32_768, 64, 2 if quick else 3)
    if name == "conv":
        return Workload("conv", 512 if quick else 4_096, 64, 2 if quick else 3)
    raise ValueError(f"unknown workload {name!r}")


# --- data -----------------------------------------------------------------------------------------
class SyntheticDataset(Dataset):
    """``num_samples`` (x, y) pairs: x ~ N(0, 1) of shape ``shape``, y in [0, 10). Built on first
    use from ``seed``; pickles without its tensors."""

    def __init__(self, num_samples: int, shape: tuple[int, ...], seed: int = 0) -> None:
        self.num_samples = num_samples
        self.shape = tuple(shape)
        self.seed = seed
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def _build(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self._x = torch.randn((self.num_samples, *self.shape), generator=gen)
        self._y = torch.randint(0, 10, (self.num_samples,), generator=gen)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_x"] = state["_y"] = None
        return state

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._x is None:
            self._build()
        return self._x[index], self._y[index]


def dataset(w: Workload) -> SyntheticDataset:
    shape = (784,) if w.name == "mlp" else (1, 28, 28)
    return SyntheticDataset(w.num_samples, shape, seed=1234)


def train_loader(w: Workload, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """The user's loader (the frameworks put their own distributed sampler in)."""
    return torch.utils.data.DataLoader(dataset(w), batch_size=w.batch_size, shuffle=shuffle)


# --- models ---------------------------------------------------------------------------------------
def build_net(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


# --- worker warm-up (an experiment: not something ray_lit does today) ---------------------
def warm_imports() -> None:
    """A Ray ``worker_process_setup_hook``: import what a ray_lit rank imports anyway (torch, the
    DDP machinery, which pulls in ``torch._dynamo``) while the worker process idles in Ray's
    pool, before any actor lands in it."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch.nn.parallel  # noqa: F401

    import ray_lit.worker.actor  # noqa: F401
    import ray_lit.worker.host  # noqa: F401
    import ray_lit.loop.stages  # noqa: F401


# --- measurements ---------------------------------------------------------------------------------
def time_calls(phases: list[tuple[str, float, float]], owner: Any, name: str, label: str,
               is_classmethod: bool = False) -> None:
    """Replace ``owner.name`` (a module function, method or classmethod) with a wrapper that
    appends ``(label, start, end)`` wall times to ``phases`` (in this process only)."""
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    func = original.__func__ if is_classmethod else original

    def timed(*args: Any, **kwargs: Any) -> Any:
        begin = time.time()
        try:
            return func(*args, **kwargs)
        finally:
            phases.append((label, begin, time.time()))

    setattr(owner, name, classmethod(timed) if is_classmethod else timed)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def process_start_ts() -> float:
    """When this process started (wall clock), from /proc."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def current_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


class Recorder:
    """Per-rank timestamps. Epoch ``k`` lasts from its start to the start of epoch ``k + 1``
    (the last one: to the end of training), so whatever a trainer does between epochs (epoch-end
    hooks, checkpoints) counts in the epoch it follows."""

    def __init__(self, out_dir: str | None) -> None:
        self.out_dir = out_dir
        self.marks: list[float] = []
        self.thread_cpu_marks: list[float] = []  # CPU time of the training thread
        self.process_cpu_marks: list[float] = []  # CPU time of the whole rank process
        self.first_step_ts: float | None = None

    def step(self) -> None:
        if self.first_step_ts is None:
            self.first_step_ts = time.time()

    def _mark(self) -> None:
        self.marks.append(time.perf_counter())
        self.thread_cpu_marks.append(time.thread_time())
        self.process_cpu_marks.append(time.process_time())

    def epoch_start(self) -> None:
        self._mark()

    def train_end(self) -> None:
        self._mark()

    @staticmethod
    def _diffs(marks: list[float]) -> list[float]:
        return [b - a for a, b in zip(marks, marks[1:])]

    @property
    def epoch_times(self) -> list[float]:
        return self._diffs(self.marks)

    def dump(self, extra: dict[str, Any] | None = None) -> None:
        if not self.out_dir:
            return
        rank = current_rank()
        os.makedirs(self.out_dir, exist_ok=True)
        record = {"rank": rank, "pid": os.getpid(), "epoch_times": self.epoch_times,
                  "epoch_thread_cpu": self._diffs(self.thread_cpu_marks),
                  "epoch_process_cpu": self._diffs(self.process_cpu_marks),
                  "first_step_ts": self.first_step_ts, "peak_rss_mb": peak_rss_mb(),
                  "process_start_ts": process_start_ts(),
                  "torch_threads": torch.get_num_threads(),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        record.update(extra or {})
        if os.environ.get("BENCH_SMAPS"):  # where the memory goes: see benchmarks/memory.py
            import shutil
            import sys

            shutil.copy("/proc/self/smaps", os.path.join(self.out_dir, f"smaps{rank}.txt"))
            with open(os.path.join(self.out_dir, f"modules{rank}.txt"), "w") as f:
                f.write("\n".join(sorted(sys.modules)))
        with open(os.path.join(self.out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)


def _lit_methods(base: type, log_loss: bool) -> dict[str, Any]:
    """The LightningModule body, the same for ray_lit and Lightning."""

    def __init__(self, name: str, lr: float, out_dir: str | None) -> None:
        base.__init__(self)
        self.net = build_net(name)
        self.lr = lr
        self.out_dir = out_dir
        self.rec = None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.rec is None:
            self.rec = Recorder(self.out_dir)
        self.rec.step()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if log_loss:
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def on_train_epoch_start(self):
        if self.rec is None:
            self.rec = Recorder(self.out_dir)
        self.rec.epoch_start()

    def on_train_end(self):
        self.rec.train_end()
        self.rec.dump()

    return {"__init__": __init__, "forward": forward, "training_step": training_step,
            "configure_optimizers": configure_optimizers,
            "on_train_epoch_start": on_train_epoch_start, "on_train_end": on_train_end}


def make_module_class(base: type, log_loss: bool = True) -> type:
    """A LightningModule subclass of ``base`` (ray_lit's or Lightning's) for the workloads."""
    return type("BenchModule", (base,), _lit_methods(base, log_loss))
