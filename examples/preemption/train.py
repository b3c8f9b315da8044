"""Preemption: a run killed mid-training continues from its latest committed checkpoint.

What a spot-instance preemption or a crashed driver looks like, in one script:

1. a *driver* process (this file with ``--driver``) starts ``ray_lit.fit`` on 2 Ray workers with a
   fixed ``storage_path`` / ``run_name`` and ``checkpoint_every_n_steps=8``;
2. as soon as the first checkpoint is committed (its
   ``storage_path/run_name/checkpoints/*/manifest.json`` exists) the driver's whole process group
   is SIGKILLed: no clean-up, no final checkpoint, its Ray workers die with it;
3. the *same driver command* is run again. ``resume="auto"`` (the default) finds the latest
   committed checkpoint of ``run_name`` and continues from it: model, optimizer, scheduler,
   sampler position inside the epoch and RNG states. The second run prints the step it restored
   and must finish at the expected ``global_step``.

``--check-exact`` also trains the same run without interruption and checks that both end with
identical weights (exact resume at the same world size). Nothing is downloaded.
Run: ``python train.py`` (about 45 s on 2 CPU cores, most of it starting Ray twice).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")
STORAGE = os.path.join(RUNS, "storage")
MAX_EPOCHS, BATCHES_PER_EPOCH, NUM_WORKERS, EVERY_N_STEPS = 3, 24, 2, 8


# --- the training run (what a user's script looks like) -------------------------------------------
def train(run_name: str, result_file: str) -> None:
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import ray_lit
    import ray_lit as pl

    class Regressor(pl.LightningModule):
        def __init__(self, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            time.sleep(0.03)  # stands in for real work, so the kill lands mid-run
            loss = F.mse_loss(self.net(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)]

    class StartStep(pl.Callback):
        """Runs in the workers; rank 0's state comes back to the driver after fit."""

        start_step = None

        def on_train_start(self, trainer, pl_module):
            self.start_step = trainer.global_step

    pl.seed_everything(1234)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES_PER_EPOCH * NUM_WORKERS * 16, 8, generator=g)
    y = (x[:, :1] * x[:, 1:2]).sin() + 0.1 * torch.randn(len(x), 1, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    probe = StartStep()
    model = Regressor()
    trainer = ray_lit.fit(model, loader, num_workers=NUM_WORKERS, max_epochs=MAX_EPOCHS,
                          storage_path=STORAGE, run_name=run_name,
                          checkpoint_every_n_steps=EVERY_N_STEPS, callbacks=[probe],
                          default_root_dir=os.path.join(RUNS, run_name), logger=False,
                          enable_progress_bar=False)
    print(f"[driver] run {run_name!r}: started at global_step {probe.start_step}, finished at "
          f"global_step {trainer.global_step}", flush=True)
    torch.save({"start_step": probe.start_step, "global_step": trainer.global_step,
                "state_dict": model.state_dict()}, result_file)


# --- the demonstration: start, kill, start again -------------------------------------------------
def driver_command(run_name: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--driver", "--run-name", run_name]


def committed_manifests(run_name: str) -> list[str]:
    return sorted(glob.glob(os.path.join(STORAGE, run_name, "checkpoints", "*",
                                         "manifest.json")))


def read_manifest(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run_killed_after_first_commit(run_name: str, timeout_s: float = 120.0) -> None:
    """Start the driver in its own session; SIGKILL its process group at the first commit."""
    proc = subprocess.Popen(driver_command(run_name), start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not committed_manifests(run_name):
            if proc.poll() is not None:
                raise SystemExit(f"the driver exited (rc={proc.returncode}) before the first "
                                 "checkpoint was committed")
            if time.monotonic() > deadline:
                raise SystemExit(f"no checkpoint committed within {timeout_s:.0f} s")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver's own process group only
        proc.wait()
    manifest = read_manifest(committed_manifests(run_name)[-1])
    print(f"[demo] killed the driver (rc={proc.returncode}) after checkpoint "
          f"{manifest['name']} was committed (global_step {manifest['global_step']})",
          flush=True)


def run_to_completion(run_name: str, timeout_s: float = 300.0) -> dict:
    result_file = os.path.join(RUNS, f"{run_name}.result.pt")
    subprocess.run(driver_command(run_name) + ["--result", result_file], check=True,
                   timeout=timeout_s)
    import torch

    return torch.load(result_file, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--driver", action="store_true", help="run one training driver")
    parser.add_argument("--run-name", default="preempted")
    parser.add_argument("--result", default=None)
    parser.add_argument("--check-exact", action="store_true",
                        help="also train without interruption and compare the weights")
    args = parser.parse_args()
    if args.driver:
        train(args.run_name, args.result or os.path.join(RUNS, f"{args.run_name}.result.pt"))
        return

    shutil.rmtree(RUNS, ignore_errors=True)
    os.makedirs(RUNS)
    run_killed_after_first_commit("preempted")
    last_commit = read_manifest(committed_manifests("preempted")[-1])["global_step"]
    print("[demo] running the same driver command again", flush=True)
    resumed = run_to_completion("preempted")
    expected = MAX_EPOCHS * BATCHES_PER_EPOCH
    print(f"[demo] restored step {resumed['start_step']}, final global_step "
          f"{resumed['global_step']} (expected {expected})")
    assert resumed["start_step"] == last_commit > 0, (resumed["start_step"], last_commit)
    assert resumed["global_step"] == expected, resumed["global_step"]

    if args.check_exact:
        import torch

        whole = run_to_completion("uninterrupted")
        assert whole["start_step"] == 0 and whole["global_step"] == expected
        for key, value in whole["state_dict"].items():
            torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0)
        print("[demo] the resumed run ended with the same weights as an uninterrupted one")


if __name__ == "__main__":
    main()
