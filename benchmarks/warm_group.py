"""How long a call takes to reach its first batch, with and without the Trainer's kept group.

One Trainer runs ``fit`` (cold: the group forms), then ``validate``, ``test`` and ``predict``
(warm: the same actors and process group), then a second Trainer runs ``validate`` (cold again),
and a third Trainer's ``fit`` starts on the second's workers, parked in the warm pool when the
second went without ``teardown()``.
Each call's time to its first batch is measured in the module (the wall clock when the first
``*_step`` of the call runs, minus when the call started on the driver); the tiny model makes
the rest of the call negligible. Prints one table (2 workers on a local Ray).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/warm_group.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray_lit as pl  # noqa: E402


class Tiny(pl.LightningModule):
    """Rank 0 appends the wall time of each stage's first step to ``stamps`` (a file: the
    workers run on this machine; a float32 metric would round the time to minutes)."""

    def __init__(self, stamps: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.stamps = stamps

    def _first(self, batch_idx: int) -> None:
        if batch_idx == 0 and self.global_rank == 0:
            with open(self.stamps, "a") as f:
                f.write(f"{time.time()}\n")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._first(batch_idx)
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._first(batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._first(batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    x = torch.randn(64, 4)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _trainer(root: str) -> pl.Trainer:
    return pl.Trainer(num_workers=2, max_epochs=1, default_root_dir=root, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, enable_model_summary=False)


def _first_batch_s(call: Any, stamps: str) -> float:
    with open(stamps, "w"):
        pass
    start = time.time()
    call()
    with open(stamps) as f:
        return float(f.readline()) - start


def one_round(root: str) -> dict[str, float]:
    stamps = os.path.join(root, "stamps.txt")
    model = Tiny(stamps)
    trainer = _trainer(root)
    out = {"fit (cold: the group forms)": _first_batch_s(
        lambda: trainer.fit(model, _loader()), stamps)}
    out["validate after fit (warm)"] = _first_batch_s(
        lambda: trainer.validate(model, _loader(), verbose=False), stamps)
    out["test after validate (warm)"] = _first_batch_s(
        lambda: trainer.test(model, _loader(), ckpt_path=None, verbose=False), stamps)
    trainer.teardown()
    out["validate, new Trainer (cold)"] = _first_batch_s(
        lambda: _trainer(root).validate(model, _loader(), verbose=False), stamps)
    # that Trainer went without teardown (a notebook rebinding ``trainer``): its workers are
    # parked in the warm pool, and the next Trainer's fit starts on them
    model = Tiny(stamps)
    gc.collect()
    third = _trainer(root)
    out["fit, new Trainer (warm pool)"] = _first_batch_s(
        lambda: third.fit(model, _loader()), stamps)
    third.teardown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ADDRESS", "local")
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        one_round(root)  # warm-up: imports, Ray's worker pool
        for _ in range(args.repeat):
            for name, value in one_round(root).items():
                rows.setdefault(name, []).append(value)
    ray.shutdown()
    print(f"\n2 workers, tiny model, {args.repeat} rounds after one warm-up round; seconds from "
          "the call to its first batch\n")
    print(f"| {'call':<30} | {'median':>7} | {'min':>6} | {'max':>6} |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 8}|{'-' * 8}|")
    for name, values in rows.items():
        print(f"| {name:<30} | {statistics.median(values):7.2f} | {min(values):6.2f} | "
              f"{max(values):6.2f} |")


if __name__ == "__main__":
    main()
