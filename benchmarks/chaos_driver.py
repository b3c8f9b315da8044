"""The training driver of ``chaos_mix.py``: one ``ray_lit.fit`` in its own process, so that the
chaos run can SIGKILL the driver by pid and start it again on the same run directory.

    python benchmarks/chaos_driver.py CONFIG.json

``CONFIG.json`` (written by ``chaos_mix.py``) names the Ray cluster's address, the storage
path and run name, the fault plan and the Trainer options that differ between phases
(``num_workers``: ``4`` or ``[2, 4]``, dropout). A rerun with the same config resumes from the
run's latest committed checkpoint (``resume="auto"``). When ``fit`` returns, the driver writes
the final weights and the controller's counters to ``config["out"]`` (``torch.save``, renamed
into place, so a killed driver never leaves a half file).

The fault plan is carried out by the ranks themselves (``ChaosNet.training_step``): at a
planned (rank, step) a rank writes ``fault-<i>.json`` into the plan directory and then
``os._exit``s, SIGKILLs itself, hangs, or (for the faults only the chaos script can inject:
node removal, the driver's SIGKILL, a storage outage) waits for the chaos script to act on the
request. Every rank appends one line to ``attempts.jsonl`` at the first step of each attempt:
the chaos script measures recovery and steps redone from those lines, the same way for all six
fault kinds.

``CHAOS_TRACE=/tmp/trace`` makes every rank append ``step loss data-sum weight-sum`` lines to
``/tmp/trace.<has a plan>.<rank>``, to find the first step where a run leaves the reference.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import cloudpickle
import ray
import torch
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# the kinds a rank waits in (the chaos script kills it, or its driver, or its node) or goes on
# after (a storage outage does not stop training)
BLOCKING = ("node", "driver")


class ChaosNet(pl.LightningModule):
    """A small MLP with Adam on shuffled data; each rank carries out the faults planned for it.

    ``plan``: ``(rank, step, kind)`` sorted by step. A fault fires on the rank ``rank %
    world_size`` (an elastic group may be smaller than the plan's ranks) at the first step
    ``>= step`` it reaches, once, and only after every earlier fault fired: the markers in
    ``plan_dir`` persist across attempts and drivers.
    """

    def __init__(self, plan_dir: str = "", plan: list | None = None,
                 dropout: float = 0.2) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(64, 1))
        self.plan_dir = plan_dir
        self.plan = [tuple(p) for p in plan or []]
        self._attempt_start: float | None = None

    def on_train_start(self) -> None:
        self._attempt_start = time.time()

    def training_step(self, batch, batch_idx):
        if self.plan_dir:
            if self._attempt_start is not None:  # this attempt's first step on this rank
                self._note_attempt()
            self._maybe_fault()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if os.environ.get("CHAOS_TRACE"):  # where a run first leaves the reference, step by step
            with open(f"{os.environ['CHAOS_TRACE']}.{bool(self.plan)}.{self.global_rank}",
                      "a") as f:
                f.write(f"{self.global_step} {float(loss):.8f} {float(x.sum()):.6f} "
                        f"{float(self.net[0].weight.sum()):.8f}\n")
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def _note_attempt(self) -> None:
        line = json.dumps({"time": time.time(), "attempt_start": self._attempt_start,
                           "step": self.global_step, "rank": self.global_rank,
                           "world_size": self.trainer.world_size, "pid": os.getpid()})
        with open(os.path.join(self.plan_dir, "attempts.jsonl"), "a") as f:
            f.write(line + "\n")  # one short O_APPEND write: lines of ranks never interleave
        self._attempt_start = None

    def _maybe_fault(self) -> None:
        for i, (rank, step, kind) in enumerate(self.plan):
            marker = os.path.join(self.plan_dir, f"fault-{i:03d}.json")
            if os.path.exists(marker):
                continue
            # only the first fault not yet fired may fire: they fire in plan order
            if self.global_step < step or self.global_rank != rank % self.trainer.world_size:
                return
            record = {"index": i, "time": time.time(), "step": self.global_step,
                      "planned_step": step, "rank": self.global_rank, "kind": kind,
                      "world_size": self.trainer.world_size, "pid": os.getpid()}
            if kind == "node":  # the node the chaos script must remove
                record["node_id"] = ray.get_runtime_context().get_node_id()
            with open(marker + ".tmp", "w") as f:
                json.dump(record, f)
            os.replace(marker + ".tmp", marker)  # the chaos script never reads half a request
            if kind == "exit":
                os._exit(1)
            if kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang" or kind in BLOCKING:
                time.sleep(3600)  # hang: until the driver gives up on this rank; else killed
            return  # "outage": training goes on while the endpoint is away


class Stamped:
    """A text stream that starts every line with the wall-clock time (to read a driver's log
    against the chaos script's fault times)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                now = time.time()
                self.stream.write(time.strftime("%H:%M:%S", time.localtime(now)) +
                                  f".{int(now % 1 * 1000):03d} ")
            self.stream.write(piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def data(samples: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 16, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].sum(1, keepdim=True)), batch_size=16,
                      shuffle=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    sys.stdout, sys.stderr = Stamped(sys.stdout), Stamped(sys.stderr)
    ray.init(address=cfg["address"], log_to_driver=False)
    workers = cfg["num_workers"]
    model = ChaosNet(plan_dir=cfg["plan_dir"], plan=cfg["plan"], dropout=cfg["dropout"])
    pl.seed_everything(7)
    trainer = ray_lit.fit(
        model, data(cfg["samples"]), num_workers=tuple(workers) if isinstance(workers, list)
        else workers, max_epochs=cfg["epochs"], storage_path=cfg["storage"],
        run_name=cfg["run_name"], checkpoint_every_n_steps=cfg["every"], max_failures=-1,
        worker_hang_timeout_s=cfg["hang_timeout_s"], storage_retry_timeout_s=300,
        placement_timeout_s=cfg["placement_timeout_s"], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    controller = trainer._controller
    result = {"state_dict": model.state_dict(), "global_step": trainer.global_step,
              "world_size_history": list(trainer.world_size_history),
              "num_restarts": trainer.num_restarts,
              "recovery_times": list(controller.recovery_times),
              "restored_from": list(controller.restored_from)}
    torch.save(result, cfg["out"] + ".tmp")
    os.replace(cfg["out"] + ".tmp", cfg["out"])
    ray.shutdown()


if __name__ == "__main__":
    main()
