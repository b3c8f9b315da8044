"""Chaos run (issue 5): kill random ranks at random steps many times in one run, then check the
final weights against an uninterrupted run and that no committed checkpoint was unreadable.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/chaos.py --kills 6
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/chaos.py --kills 6 --snapshot-every 1

Prints kills survived, steps redone, recovery times and the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time

import cloudpickle
import ray
import torch
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl
from ray_lit.storage.checkpoint_io import load_checkpoint
from ray_lit.checkpoint.manager import CheckpointManager

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ChaosNet(pl.LightningModule):
    """Dropout + Adam + shuffled data; dies (os._exit) at the planned (rank, step) pairs."""

    def __init__(self, plan_dir: str = "", plan: list | None = None,
                 step_sleep: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(64, 1))
        self.plan_dir = plan_dir
        self.plan = plan or []
        self.step_sleep = step_sleep

    def training_step(self, batch, batch_idx):
        for i, (rank, step) in enumerate(self.plan):
            marker = os.path.join(self.plan_dir, f"kill-{i}")
            if self.global_rank == rank and self.global_step == step and \
                    not os.path.exists(marker):
                with open(marker, "w") as f:
                    json.dump({"time": time.time(), "step": step, "rank": rank}, f)
                os._exit(1)
        time.sleep(self.step_sleep)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].sum(1, keepdim=True)), batch_size=16,
                      shuffle=True)


def run(storage: str, name: str, model: ChaosNet, every: int, epochs: int,
        snapshot_every: int | None = None) -> ray_lit.Trainer:
    pl.seed_everything(7)
    return ray_lit.fit(model, data(), num_workers=2, max_epochs=epochs, storage_path=storage,
                       run_name=name, checkpoint_every_n_steps=every, max_failures=-1,
                       snapshot_every_n_steps=snapshot_every,
                       logger=False, enable_progress_bar=False, enable_model_summary=False,
                       enable_checkpointing=False)


def watch_commits(run_uri: str, stop: threading.Event, report: dict) -> None:
    """Load every committed checkpoint as soon as it appears: none may be unreadable."""
    manager = CheckpointManager(run_uri)
    seen: set[str] = set()
    while not stop.is_set():
        for ckpt in manager.committed():
            if ckpt.name in seen:
                continue
            seen.add(ckpt.name)
            try:
                for rank in range(ckpt.world_size):
                    load_checkpoint(ckpt.part_uri(rank))
                report["loaded"] += 1
            except FileNotFoundError:
                report["pruned_before_read"] += 1  # retention removed it meanwhile
            except Exception as err:  # an unreadable committed checkpoint: a real failure
                report["unreadable"].append(f"{ckpt.name}: {err}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=4, help="checkpoint_every_n_steps")
    parser.add_argument("--snapshot-every", type=int, default=None,
                        help="snapshot_every_n_steps (in-memory snapshots held by peers)")
    parser.add_argument("--step-sleep", type=float, default=0.0,
                        help="seconds added to each training step (a slower model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    steps_total = args.epochs * (512 // 16 // 2)
    rng = random.Random(args.seed)
    plan = sorted({(rng.randint(0, 1), rng.randint(1, steps_total - 1))
                   for _ in range(args.kills)}, key=lambda p: p[1])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        reference = ChaosNet(step_sleep=args.step_sleep)
        run(tmp, "reference", reference, args.every, args.epochs)
        reference_s = time.monotonic() - start
        model = ChaosNet(plan_dir=tmp, plan=plan, step_sleep=args.step_sleep)
        report = {"loaded": 0, "pruned_before_read": 0, "unreadable": []}
        stop = threading.Event()
        watcher = threading.Thread(target=watch_commits, args=(f"{tmp}/chaos", stop, report),
                                   daemon=True)
        watcher.start()
        start = time.monotonic()
        trainer = run(tmp, "chaos", model, args.every, args.epochs, args.snapshot_every)
        chaos_s = time.monotonic() - start
        stop.set()
        watcher.join()
        kills = []
        for name in sorted(os.listdir(tmp)):
            if name.startswith("kill-"):
                with open(os.path.join(tmp, name)) as f:
                    kills.append(json.load(f))
        kills.sort(key=lambda k: k["time"])
        origins = trainer._controller.restored_from  # one per restart, in order
        redone = sum(k["step"] - step for k, (_, step) in zip(kills, origins))
        from_memory = sum(1 for source, _ in origins if source == "memory")
        identical = all(torch.equal(v, model.state_dict()[k])
                        for k, v in reference.state_dict().items())
        recovery = trainer._controller.recovery_times
    print(f"plan (rank, step): {plan}")
    print(f"kills survived:     {len(kills)} of {len(plan)}; restarts {trainer.num_restarts}")
    print(f"steps redone:       {redone} (checkpoint every {args.every}, snapshot every "
          f"{args.snapshot_every}); restores from peers' memory: {from_memory} of "
          f"{len(origins)}")
    if recovery:
        print(f"recovery (s):       min {min(recovery):.1f}  max {max(recovery):.1f}  "
              f"mean {sum(recovery) / len(recovery):.1f}")
    print(f"wall time (s):      uninterrupted {reference_s:.1f}, chaos {chaos_s:.1f}")
    print(f"committed checkpoints loaded while training: {report['loaded']}, "
          f"unreadable: {len(report['unreadable'])}")
    print(f"final weights identical to the uninterrupted run: {identical}")
    ray.shutdown()
    if not identical or report["unreadable"] or len(kills) != len(plan):
        sys.exit(1)


if __name__ == "__main__":
    main()
