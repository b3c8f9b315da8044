"""Trial start in a Ray Tune sweep of ray_lit runs: cold (every trial starts its workers) against
warm (``TuneConfig(reuse_actors=True)``: a trial runs on the workers the previous trial left in
the same trial actor, ``driver.pool``).

One sweep of ``--trials`` sequential trials (``max_concurrent_trials=1``) of 2 workers and a
tiny model per mode. Per trial, from the module's stamps (wall clock, one machine):

- **in-trial start**: the trial function's start (``build(config)``) to rank 0's first training
  step: the ray_lit part (workers placed or adopted, process group, payload);
- **gap**: the previous trial's last training step to this trial's first: what a sweep waits
  between trials (Tune's bookkeeping, a new trial actor when cold, the in-trial start).

The first trial of either mode is cold; the table reports trials 2.. of each.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/tune_warm.py [--trials 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray_lit as pl  # noqa: E402


class Tiny(pl.LightningModule):
    """Rank 0 stamps its first and last training step into ``<directory>/<tag>.json``."""

    def __init__(self, tag: str, directory: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)
        self.tag, self.directory = tag, directory
        self.built = time.time()
        self.first: float | None = None

    def training_step(self, batch, batch_idx):
        if self.first is None:
            self.first = time.time()
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def on_train_end(self) -> None:
        if self.global_rank == 0:
            with open(os.path.join(self.directory, f"{self.tag}.json"), "w") as f:
                json.dump({"built": self.built, "first": self.first, "last": time.time()}, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def sweep(reuse: bool, trials: int, root: str) -> list[dict[str, float]]:
    """One sweep; returns each trial's stamps, in trial order."""
    from ray import tune

    from ray_lit.tune import trainable

    directory = os.path.join(root, f"stamps{int(reuse)}")
    os.makedirs(directory)
    tuner = tune.Tuner(
        trainable(lambda c: Tiny(f"{c['i']:03d}", directory), _loader(), num_workers=2,
                  max_epochs=1, logger=False, enable_model_summary=False,
                  enable_checkpointing=False),
        param_space={"i": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(reuse_actors=reuse, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=os.path.join(root, "tune"),
                                  name=f"reuse{int(reuse)}", verbose=0))
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"trials failed: {results.errors}")
    stamps = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name)) as f:
            stamps.append(json.load(f))
    return stamps


def _rows(stamps: list[dict[str, float]]) -> list[tuple[float, float]]:
    """(in-trial start, gap since the previous trial) of trials 2.."""
    return [(s["first"] - s["built"], s["first"] - prev["last"])
            for prev, s in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    out = {}
    with tempfile.TemporaryDirectory() as root:
        for reuse in (False, True):
            out["warm" if reuse else "cold"] = sweep(reuse, args.trials, root)
    ray.shutdown()
    print(f"\n{args.trials} sequential trials of 2 workers per sweep, trials 2.. "
          "(seconds: median, min, max)\n")
    print("| trials | in-trial start (build -> 1st step) | gap (last step of the previous "
          "trial -> 1st step) |")
    print("|---|---|---|")
    for mode, stamps in out.items():
        rows = _rows(stamps)
        cells = []
        for i in range(2):
            values = [r[i] for r in rows]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-"
                         f"{max(values):.2f})")
        label = "cold (reuse_actors=False)" if mode == "cold" else \
            "warm (reuse_actors=True)"
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
