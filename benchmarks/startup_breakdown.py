"""Where the time goes from ``fit()`` on an initialised Ray to the first training step.

2 workers, a tiny model (Linear(4, 1)), a validation loader (so the sanity check runs), no
logger, progress bar or ModelCheckpoint. Three sources of wall-clock stamps, all on this machine:

- the driver: ray_lit's start-up functions wrapped with timers in this process (payload ship,
  feasibility check, placement group, group creation, process group, run) and the controller's
  state transitions;
- each worker: ``Worker.startup_timings()`` (imports, constructor, rendezvous, payload arrival
  and unpickling), read from the Trainer's kept group after ``fit``, and the process start time
  of each actor's pid (``/proc``);
- each rank's loop: a Callback that stamps ``setup``, ``configure_optimizers`` (the module is
  DDP-wrapped by then), ``on_fit_start``, the sanity check and the first training batch.

Every phase of the table runs from one stamp to the next (worker stamps: the slowest rank,
which is the one the collectives wait for). Columns: the first ``fit`` of this process (driver
imports included), the median of ``--repeat`` cold calls (a fresh Trainer: a new group forms)
with the min-max, the warm calls (``fit`` again on the same Trainer, one epoch more: the kept
group's actors and process group are reused) and the pooled ones (a new Trainer after the last
one went without ``teardown()``: its workers, parked in the warm pool, form a new process group;
``driver.pool``).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/startup_breakdown.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import json
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
from benchmarks.workloads import time_calls  # noqa: E402

# (key, label): the phases in the order they happen; each ends at its key's stamp and starts
# at the previous one present
PHASES = [
    ("create", "driver: checks, pickle + ray.put of the payload, feasibility"),
    ("pg_ready", "placement group ready"),
    ("import_start", "actor scheduled on a worker process, class fetched"),
    ("imported", "imports in the actor (torch, ray_lit)"),
    ("init_done", "actor __init__"),
    ("join", "node_info round trip, ranks assigned"),
    ("setup_start", "free port + setup call reaches the actors"),
    ("process_group_joined", "rendezvous (waits for the warm thread's torch._dynamo import)"),
    ("run", "driver: group formed -> run called"),
    ("run_start", "payload fetched from the object store, run reaches the actors"),
    ("payload_unpickled", "payload unpickled"),
    ("setup", "rank's trainer, host, strategy, checkpoint writer built"),
    ("configure_optimizers", "module setup + DDP wrap"),
    ("on_fit_start", "optimizers + sharded loaders"),
    ("sanity_start", "on_fit_start -> sanity check"),
    ("sanity_end", "sanity check (2 validation batches)"),
    ("first_batch", "train epoch start, first batch fetched"),
    ("first_step_done", "first training step (forward, backward + all-reduce, optimizer)"),
]


KINDS = ("first", "cold", "warm", "pooled")


class Stamps(pl.Callback):
    """Each rank appends ``(name, wall time)`` lines to ``<dir>/rank<r>.jsonl``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.first = True

    def _stamp(self, trainer: Any, name: str) -> None:
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps([name, time.time()]) + "\n")

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        self.first = True
        self._stamp(trainer, "setup")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._stamp(trainer, "on_fit_start")

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self._stamp(trainer, "sanity_start")

    def on_sanity_check_end(self, trainer: Any, pl_module: Any) -> None:
        self._stamp(trainer, "sanity_end")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        if self.first:
            self._stamp(trainer, "first_batch")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.first:
            self.first = False
            self._stamp(trainer, "first_step_done")


class Tiny(pl.LightningModule):
    def __init__(self, directory: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.directory = directory

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # called after the strategy wrapped the module (DDP)
        with open(os.path.join(self.directory, f"rank{self.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(["configure_optimizers", time.time()]) + "\n")
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    x = torch.randn(64, 4)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _trainer(root: str, stamps: str) -> pl.Trainer:
    return pl.Trainer(num_workers=2, max_epochs=1, default_root_dir=root, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, resume="never", callbacks=[Stamps(stamps)])


def _process_start(pid: int) -> float | None:
    """Seconds since boot when process ``pid`` (on this machine) started (10 ms ticks)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    except OSError:
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def _uptime() -> float:
    """Seconds since boot, now (the clock ``_process_start`` counts in)."""
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


class Probe:
    """The driver-side stamps of one call, and the workers' and ranks' stamps read after it."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float, float]] = []
        self.states: list[tuple[str, float, float]] = []
        self._install()

    def _install(self) -> None:
        from ray_lit.driver import launch, worker_group
        from ray_lit.driver.controller import Controller
        from ray_lit.driver.worker_group import WorkerGroup

        time_calls(self.phases, launch, "_ship", "ship")
        time_calls(self.phases, launch, "_group_options", "options")
        time_calls(self.phases, worker_group, "create_placement_group", "pg")
        time_calls(self.phases, WorkerGroup, "create", "create", is_classmethod=True)
        time_calls(self.phases, WorkerGroup, "_join_process_group", "join")
        time_calls(self.phases, WorkerGroup, "run", "run")
        time_calls(self.phases, WorkerGroup, "alive", "alive")
        step, states = Controller.step, self.states

        def timed_step(controller: Any, state: Any) -> Any:
            begin = time.time()
            try:
                return step(controller, state)
            finally:
                states.append((type(state).__name__, begin, time.time()))

        Controller.step = timed_step

    def call(self, trainer: pl.Trainer, model: Tiny, stamps: str) -> dict[str, Any]:
        """Run ``trainer.fit`` and return every stamp, in seconds after the call."""
        import ray

        for name in os.listdir(stamps):
            os.remove(os.path.join(stamps, name))
        self.phases.clear()
        self.states.clear()
        start, booted = time.time(), _uptime()
        trainer.fit(model, _loader(), _loader())
        events: dict[str, float] = {}
        spans = {label: (a - start, b - start) for label, a, b in self.phases}
        if "create" in spans:
            events["create"] = spans["create"][0]
        if "pg" in spans:
            events["pg_ready"] = spans["pg"][1]
        if "join" in spans:
            events["join"] = spans["join"][0]
        events["run"] = spans["run"][0]
        workers = trainer._kept.group.workers
        timings = ray.get([w.actor.startup_timings.remote() for w in workers])
        for key in ("import_start", "imported", "init_done", "setup_start", "warm_imports_done",
                    "process_group_joined", "run_start", "payload_unpickled"):
            # a reused or pooled group's actors started in an earlier call: only this call's
            # stamps count
            values = [t[key] - start for t in timings if t.get(key, 0.0) >= start]
            if values:
                events[key] = max(values)
        for rank in range(len(workers)):
            with open(os.path.join(stamps, f"rank{rank}.jsonl")) as f:
                for line in f:
                    name, ts = json.loads(line)
                    events[name] = max(events.get(name, float("-inf")), ts - start)
        # relative to the call; a process Ray started for this call has a positive one
        process_starts = [p - booted if (p := _process_start(w.pid)) is not None else None
                          for w in workers]
        extra = {
            "ship_s": spans["ship"][1] - spans["ship"][0] if "ship" in spans else None,
            "options_s": spans["options"][1] - spans["options"][0] if "options" in spans
            else None,
            "alive_s": spans["alive"][1] - spans["alive"][0] if "alive" in spans else None,
            "new_processes": sum(1 for p in process_starts if p is not None and p >= 0),
            "process_start_s": max((p for p in process_starts if p is not None), default=None),
            "warm_imports_after_start_s": max(
                (t["warm_imports_done"] - start for t in timings if "warm_imports_done" in t),
                default=None),
            "states": [(name, a - start, b - start) for name, a, b in self.states],
            "ranks": [dict({k: v - start for k, v in t.items()}, process_start=p)
                      for t, p in zip(timings, process_starts)],
        }
        return {"events": events, "extra": extra}


def _durations(events: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    previous = 0.0
    for key, _ in PHASES:
        if key in events:
            out[key] = events[key] - previous
            previous = events[key]
    out["total"] = events.get("first_step_done", float("nan"))
    out["to_first_batch"] = events.get("first_batch", float("nan"))
    return out


def _fmt(values: list[float], spread: bool) -> str:
    if not values:
        return "-"
    text = f"{statistics.median(values):6.2f}"
    if spread and len(values) > 1:
        text += f" ({min(values):.2f}-{max(values):.2f})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pause", type=float, default=5.0,
                        help="seconds between rounds (Ray starts idle worker processes)")
    parser.add_argument("--json", default=None, help="also write every measurement here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # collectives on loopback only
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    probe = Probe()
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as root:
        stamps = os.path.join(root, "stamps")
        os.makedirs(stamps)
        for i in range(args.repeat + 1):
            trainer = _trainer(root, stamps)
            model = Tiny(stamps)
            runs["first" if i == 0 else "cold"].append(probe.call(trainer, model, stamps))
            if i == 0:
                trainer.teardown()  # released, never parked: the next round starts cold
                continue
            # fit again on the same Trainer, one epoch further (as a notebook user would)
            trainer.config.max_epochs += 1
            runs["warm"].append(probe.call(trainer, model, stamps))
            # the Trainer goes without teardown(): its workers wait in the warm pool
            del trainer, model
            gc.collect()
            trainer, model = _trainer(root, stamps), Tiny(stamps)
            runs["pooled"].append(probe.call(trainer, model, stamps))
            trainer.teardown()
            time.sleep(args.pause)  # Ray's own processes settle between rounds
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    durations = {kind: [_durations(r["events"]) for r in rs] for kind, rs in runs.items()}
    print(f"\nfit() on an initialised Ray -> first training step; 2 workers, tiny model; "
          f"seconds per phase (cold, warm: median of {args.repeat}, min-max)\n")
    header = (f"| {'phase':<66} | {'first fit':>9} | {'cold':>18} | {'warm':>18} | "
              f"{'pooled':>18} |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for key, label in [*PHASES, ("to_first_batch", "**fit() -> first batch**"),
                       ("total", "**fit() -> first step done**")]:
        cells = [_fmt([d[key] for d in durations[kind] if key in d], kind != "first")
                 for kind in KINDS]
        print(f"| {label:<66} | {cells[0]:>9} | {cells[1]:>18} | {cells[2]:>18} | "
              f"{cells[3]:>18} |")
    for kind in ("cold", "warm", "pooled"):
        extras = [r["extra"] for r in runs[kind]]

        def med(key: str, extras: list[dict[str, Any]] = extras) -> str:
            values = [e[key] for e in extras if e[key] is not None]
            return f"{statistics.median(values):.3f}" if values else "-"

        states = " ".join(f"{name} {a:.2f}-{b:.2f}" for name, a, b in extras[-1]["states"][:3])
        print(f"\n{kind}: ship (pickle + ray.put) {med('ship_s')} s, feasibility check "
              f"{med('options_s')} s, kept-group liveness check {med('alive_s')} s, new worker "
              f"processes per call {med('new_processes')} (the last started at "
              f"{med('process_start_s')} s), warm imports done at "
              f"{med('warm_imports_after_start_s')} s; controller (last call): {states} ...")


if __name__ == "__main__":
    main()
