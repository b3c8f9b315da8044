"""One prepared script that proves and times ray_lit's GPU paths on one GPU, in one table.

Rows (each a check that passes or fails, with its numbers):

* ``raw torch``        - the textbook loop on the GPU: step time and peak memory (the baseline);
* ``in process fp32``  - ``Trainer(accelerator="gpu")``: step time against raw torch, peak memory;
* ``bf16``             - ``precision="bf16"``: autocast to bfloat16, loss finite, step time;
* ``fp16 + scaler``    - ``precision=16``: a ``GradScaler`` is in use and its scale moved;
* ``pinned ckpt copy`` - the fault-tolerance host copy of GPU state is in pinned memory, and
  how long a copy of the model and Adam state takes;
* ``1 worker, NCCL``   - ``num_workers=1, use_gpu=True`` on a local Ray: the process group is
  NCCL, the run finishes, launch-to-done and steady step time;
* ``FSDP, 1 GPU``      - ``strategy="fsdp"`` on one worker (reported as unavailable when this
  ray_lit has no FSDP strategy).

Usage (under 8 minutes on one GPU; ``--quick`` for a smoke run)::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/gpu_check.py [--steps 200] [--quick]

Without CUDA it says so and exits 0 after the checks that need no GPU (``--allow-cpu`` runs
every row on the CPU instead, to test the script itself).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray_lit  # noqa: E402
import ray_lit as pl  # noqa: E402

WIDTH, DEPTH, BATCH = 1024, 4, 256


def _net() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(256, WIDTH), nn.ReLU()]
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, 10))
    return nn.Sequential(*layers)


def _data(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * BATCH, 256, generator=g)
    teacher = torch.randn(256, 10, generator=g)
    y = (x @ teacher).argmax(1)  # learnable: the loss must fall
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, num_workers=0)


class Timed(pl.LightningModule):
    """The same network as the raw loop; records each training step's wall time."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self._t = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_batch_start(self, batch: Any, batch_idx: int, *args: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        if torch.distributed.is_initialized():  # on a worker: what the driver cannot see
            self.log("nccl", float(torch.distributed.get_backend() == "nccl"), on_step=False,
                     on_epoch=True)
            if len(self.step_times) > 2:  # after warm-up, the epoch mean reaches the driver
                self.log("step_s", self.step_times[-1], on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step_times.append(time.perf_counter() - self._t)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def _steady(times: list[float]) -> float:
    """Median step time after the first 10% (warm-up, cudnn autotune, allocator growth)."""
    return _median(times[max(1, len(times) // 10):])


def raw_torch(device: torch.device, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = _net().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for x, y in _data(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {"step_ms": _steady(times) * 1e3, "peak_mib": peak / 2**20, "ok": True}


def _fit_in_process(device: torch.device, steps: int, **options: Any) -> tuple[Timed, Any]:
    torch.manual_seed(0)
    model = Timed()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0,
                         accelerator="gpu" if device.type == "cuda" else "cpu", **options)
    trainer.fit(model, _data(steps))
    return model, trainer


def in_process(device: torch.device, steps: int, raw: dict[str, Any]) -> dict[str, Any]:
    model, _ = _fit_in_process(device, steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    step = _steady(model.step_times) * 1e3
    return {"step_ms": step, "vs_raw": step / raw["step_ms"], "peak_mib": peak / 2**20,
            "ok": _median(model.losses[-5:]) < _median(model.losses[:5])}


def bf16(device: torch.device, steps: int, raw: dict[str, Any]) -> dict[str, Any]:
    model, _ = _fit_in_process(device, steps, precision="bf16")
    finite = all(torch.isfinite(torch.tensor(model.losses)))
    step = _steady(model.step_times) * 1e3
    return {"step_ms": step, "vs_raw": step / raw["step_ms"], "ok": bool(finite)}


def fp16_scaler(device: torch.device, steps: int, raw: dict[str, Any]) -> dict[str, Any]:
    model, trainer = _fit_in_process(device, steps, precision=16)
    scaler = getattr(trainer._precision, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None else None
    step = _steady(model.step_times) * 1e3
    ok = all(torch.isfinite(torch.tensor(model.losses)))
    if device.type == "cuda":
        ok = ok and scaler is not None  # CUDA fp16 must run with a GradScaler
    return {"step_ms": step, "vs_raw": step / raw["step_ms"], "ok": bool(ok),
            "note": f"scaler scale {scale}" if scale is not None else "no scaler (CPU)"}


def pinned_copy(device: torch.device, steps: int, raw: dict[str, Any]) -> dict[str, Any]:
    from ray_lit.checkpoint.host_copy import HostSnapshot

    net = _net().to(device)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(8, 256, device=device)).sum().backward()
    opt.step()
    state = {"state_dict": {k: v.detach() for k, v in net.state_dict().items()},
             "optimizer_states": [opt.state_dict()]}
    snap = HostSnapshot()
    snap.prepare(state)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        host = snap.capture(state, [opt], deferred=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tensors = _tensors(host)
    pinned = all(t.is_pinned() for t in tensors) if device.type == "cuda" else None
    size = sum(t.numel() * t.element_size() for t in tensors)
    return {"step_ms": _median(times) * 1e3, "ok": pinned is not False,
            "note": f"{size / 2**20:.0f} MiB, pinned={pinned}, "
                    f"{size / 2**30 / max(_median(times), 1e-9):.1f} GiB/s"}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _on_workers(device: torch.device, steps: int, raw: dict[str, Any],
                **options: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Timed()
    start = time.perf_counter()
    trainer = ray_lit.fit(model, _data(steps), num_workers=1,
                          use_gpu=device.type == "cuda", max_epochs=1, logger=False,
                          enable_progress_bar=False, enable_checkpointing=False,
                          enable_model_summary=False, num_sanity_val_steps=0, **options)
    done = time.perf_counter() - start
    metrics = trainer.callback_metrics
    ok = trainer.global_step == steps
    if device.type == "cuda":
        ok = ok and float(metrics.get("nccl", 0.0)) == 1.0
    step = float(metrics["step_s"]) * 1e3 if "step_s" in metrics else float("nan")
    return {"step_ms": step, "vs_raw": step / raw["step_ms"], "ok": ok,
            "note": f"launch-to-done {done:.1f} s, {steps} steps, "
                    f"backend {'nccl' if float(metrics.get('nccl', 0)) else 'gloo'}"}


def one_worker_nccl(device: torch.device, steps: int, raw: dict[str, Any]) -> dict[str, Any]:
    return _on_workers(device, steps, raw)


def fsdp_one_gpu(device: torch.device, steps: int, raw: dict[str, Any]) -> dict[str, Any]:
    from ray_lit.strategies import STRATEGY_NAMES

    if "fsdp" not in STRATEGY_NAMES:
        return {"ok": None, "note": "this ray_lit has no FSDP strategy"}
    return _on_workers(device, steps, raw, strategy="fsdp")


CHECKS: list[tuple[str, Callable[..., dict[str, Any]], bool]] = [
    # (row, check, needs Ray)
    ("in process fp32", in_process, False),
    ("bf16", bf16, False),
    ("fp16 + scaler", fp16_scaler, False),
    ("pinned ckpt copy", pinned_copy, False),
    ("1 worker, NCCL", one_worker_nccl, True),
    ("FSDP, 1 GPU", fsdp_one_gpu, True),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="20 steps, for a smoke run")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run every row on the CPU (tests the script, measures nothing)")
    parser.add_argument("--no-ray", action="store_true", help="skip the rows that start Ray")
    args = parser.parse_args()
    steps = 20 if args.quick else args.steps
    os.environ.setdefault("RAY_ADDRESS", "local")  # a Ray of its own, never a shared cluster
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA device here; nothing to prove (use --allow-cpu to test the "
              "script on the CPU)")
        return 0
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}, ray_lit {ray_lit.__version__}, "
          f"{steps} steps of batch {BATCH}, MLP {WIDTH}x{DEPTH}")
    raw = raw_torch(device, steps)
    rows = [("raw torch", raw)]
    for row, check, needs_ray in CHECKS:
        if needs_ray and args.no_ray:
            rows.append((row, {"ok": None, "note": "skipped (--no-ray)"}))
            continue
        start = time.perf_counter()
        try:
            result = check(device, steps, raw)
        except Exception as err:  # a failed check is a row, not the end of the table
            traceback.print_exc()
            result = {"ok": False, "note": f"{type(err).__name__}: {str(err)[:80]}"}
        result["wall_s"] = time.perf_counter() - start
        rows.append((row, result))
    print()
    print(f"| {'check':<18} | {'ok':<4} | {'step ms':>8} | {'x raw':>6} | {'peak MiB':>8} | note")
    print(f"|{'-' * 20}|{'-' * 6}|{'-' * 10}|{'-' * 8}|{'-' * 10}|------")
    failed = 0
    for row, r in rows:
        ok = {True: "yes", False: "NO", None: "n/a"}[r.get("ok")]
        failed += r.get("ok") is False
        step = f"{r['step_ms']:.2f}" if r.get("step_ms") == r.get("step_ms") and \
            r.get("step_ms") is not None else "-"
        ratio = f"{r['vs_raw']:.2f}" if "vs_raw" in r else "-"
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "-"
        print(f"| {row:<18} | {ok:<4} | {step:>8} | {ratio:>6} | {peak:>8} | "
              f"{r.get('note', '')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
