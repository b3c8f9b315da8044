"""The driver's cost against world size on real Ray (local, this machine), 1 to 16 tiny workers.

Each worker reserves ``{"CPU": 1}`` of a local Ray started with ``num_cpus`` raised to the
largest size (16 logical CPUs on a 2-core machine: several workers share a core, which is fine
for the control plane measured here and makes the training steps themselves slow). For each
world size N:

1. a cold ``fit`` (fresh Trainer, a new group) of a Linear(8, 1) for ``--steps`` optimizer steps,
   each sleeping ``--step-ms`` (the compute of a real step, without taking the shared cores),
   logging one metric per step (``log_every_n_steps=1``) to a driver-side Logger, with a
   fault-tolerance checkpoint every ``--every`` steps. Measured: launch (the ``fit`` call) to
   the first training step (the slowest rank); the driver's CPU per training step (process CPU
   time of this process between the first and the last ``log_metrics`` call, over the steps in
   between: polls, event replay, commits, Ray's own threads in the driver; the measuring itself
   subtracted); the polls (rounds of the supervision loop) per step and the driver CPU per
   worker per poll and per second of training (all of it, and without the commits and the CPU
   the idle driver process burns anyway, measured first); the ranks that answered per round
   (a round polls only those, ``driver.news``; before it every round polled every rank);
   bytes per step through the metric stream (rank 0's events, pickled as Ray pickles them)
   and of all the status messages; the checkpoint commit time on the driver (manifest write
   and prune) and the time from the first rank's part confirmation to the commit; each
   worker's process CPU time at its first step (imports, Ray's own threads, the loop);
2. the warm pool (``driver.pool``, skipped with ``--no-warm``): the first Trainer goes without
   ``teardown()`` (its finalizer parks the group), and a new Trainer fits ``--warm-steps`` steps
   on the parked workers. Measured: launch to the first step of the slowest rank, split into
   the pool's take (the liveness check), the new process group, the ``run`` calls and the
   rest (payload, DDP wrap, the first step), and each worker's CPU from its last run's end to
   its first step;
3. ``fit`` again on the second Trainer (one epoch more, on its kept group, in another run
   directory) whose last rank calls ``os._exit(1)`` ``--kill-step`` steps into it
   (``max_failures=1``): the recovery time from the kill to the next training step of every
   rank of the new attempt (module stamps), the controller's own ``recovery_times`` (from the
   failure noticed to the new group's first steps) and the steps redone (from the last
   checkpoint).

Prints one table and linear fits (a + b * N), and saves ``benchmarks/scale_curve_ray.png``
(launch cold and warm, also against 2 workers; the workers' CPU; the driver's CPU in all and
per worker; commits). ``--no-recovery`` skips step 3 (the driver's polling cost only);
``--json`` is written after every size, so a run cut short keeps what it measured. The script
measures whichever ray_lit its parent directory holds: copy it into an older checkout to
measure that one.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/scale_curve_ray.py [--sizes 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
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
from ray_lit.loggers import Logger  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class Tiny(pl.LightningModule):
    """Each rank appends ``[name, wall time, global step]`` lines to ``<dir>/rank<r>.jsonl``:
    its first training step of every attempt and, on the rank told to, the moment it kills its
    own process (once per run: a marker file)."""

    def __init__(self, directory: str, step_s: float, kill_step: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)
        self.directory = directory
        self.step_s = step_s  # the compute a real step would do, as a sleep (no CPU)
        self.kill_step = kill_step
        self.stamped = False  # per attempt: each attempt unpickles a fresh copy

    def _stamp(self, name: str) -> None:
        # the process CPU time (all threads: imports, Ray's own, the loop) prices a start-up
        with open(os.path.join(self.directory, f"rank{self.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps([name, time.time(), self.global_step, time.process_time(),
                                os.getpid()]) + "\n")

    def on_train_end(self) -> None:
        self._stamp("train_end")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not self.stamped:
            self.stamped = True
            self._stamp("first_step")
        marker = os.path.join(self.directory, "killed")
        if self.kill_step is not None and self.global_step == self.kill_step and \
                self.global_rank == self.trainer.world_size - 1 and not os.path.exists(marker):
            open(marker, "w").close()
            self._stamp("kill")
            os._exit(1)
        time.sleep(self.step_s)
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class DriverClock(Logger):
    """Driver-side logger: at every ``log_metrics`` call notes the step, the process CPU time
    and the meter's own counters (so the window between two calls can be priced)."""

    def __init__(self, meter: Meter) -> None:
        super().__init__()
        self.meter = meter
        self.marks: list[tuple[int, float, float, int, float, float]] = []

    @property
    def name(self) -> str:
        return "driver_clock"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "train_loss" in metrics and step is not None:
            meter = self.meter
            self.marks.append((step, time.process_time(), meter.cpu, meter.polls,
                               meter.commit_cpu, time.monotonic()))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class Meter:
    """Driver-side wrappers: every status poll (count, bytes) and every checkpoint commit."""

    def __init__(self) -> None:
        self.cpu = 0.0  # CPU time spent measuring (subtracted from the driver's)
        self.polls = 0
        self.answers = 0  # rank statuses the rounds brought back
        self.event_bytes = 0
        self.status_bytes = 0
        self.commits: list[float] = []
        self.commit_cpu = 0.0  # the driver's CPU time in commits
        self.commit_latency: list[float] = []
        self._first_confirm: dict[str, float] = {}
        self.phases: list[tuple[str, float, float]] = []  # timed start-up calls (warm launch)
        self._install()

    def reset(self) -> None:
        self.polls = self.answers = self.event_bytes = self.status_bytes = 0
        self.commits, self.commit_latency, self._first_confirm = [], [], {}
        self.commit_cpu = 0.0

    def _install(self) -> None:
        from ray_lit.checkpoint.manager import CheckpointManager
        from ray_lit.driver.worker_group import WorkerGroup
        from ray_lit.messages import WorkerStatus

        meter = self

        def count(out: Any) -> None:
            begin = time.process_time()
            meter.polls += 1
            for status in out:
                if isinstance(status, WorkerStatus):
                    meter.answers += 1
                    meter.status_bytes += len(pickle.dumps(status, protocol=5))
                    if status.events:
                        meter.event_bytes += len(pickle.dumps(status.events, protocol=5))
            meter.cpu += time.process_time() - begin

        if hasattr(WorkerGroup, "news"):  # a round polls only the ranks with news
            news = WorkerGroup.news

            def counted_news(group: Any, **kwargs: Any) -> Any:
                out = news(group, **kwargs)
                count(out.values())
                return out

            WorkerGroup.news = counted_news
        else:  # before it: every round polled every rank
            statuses = WorkerGroup.statuses

            def counted(group: Any, *args: Any, **kwargs: Any) -> Any:
                out = statuses(group, *args, **kwargs)
                if kwargs.get("wait_s"):  # the supervision loop's round (not a full poll)
                    count(out)
                return out

            WorkerGroup.statuses = counted
        confirm, commit = CheckpointManager.confirm, CheckpointManager._commit

        def timed_confirm(manager: Any, name: str, *args: Any, **kwargs: Any) -> bool:
            meter._first_confirm.setdefault(name, time.perf_counter())
            return confirm(manager, name, *args, **kwargs)

        def timed_commit(manager: Any, name: str, entry: Any) -> bool:
            begin, cpu = time.perf_counter(), time.process_time()
            try:
                return commit(manager, name, entry)
            finally:
                end = time.perf_counter()
                meter.commit_cpu += time.process_time() - cpu
                meter.commits.append(end - begin)
                meter.commit_latency.append(end - meter._first_confirm.get(name, begin))

        CheckpointManager.confirm = timed_confirm
        CheckpointManager._commit = timed_commit
        from ray_lit.driver.pool import POOL

        time_calls(self.phases, POOL, "take", "take")
        time_calls(self.phases, WorkerGroup, "create", "create", is_classmethod=True)
        time_calls(self.phases, WorkerGroup, "_join_process_group", "join")
        time_calls(self.phases, WorkerGroup, "run", "run")


def _loader(world: int, steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(world * steps * 4, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _stamps(directory: str) -> list[tuple[str, float, int, int]]:
    out = []
    for name in os.listdir(directory):
        if name.startswith("rank") and name.endswith(".jsonl"):
            rank = int(name[4:-6])
            with open(os.path.join(directory, name)) as f:
                out += [(kind, ts, step, rank) for kind, ts, step, *_ in map(json.loads, f)]
    return out


def _worker_cpu(directory: str, kind: str) -> dict[int, tuple[float, int]]:
    """Each rank's process CPU seconds at its first stamp named ``kind``, with its pid."""
    out: dict[int, tuple[float, int]] = {}
    for name in os.listdir(directory):
        if name.startswith("rank") and name.endswith(".jsonl"):
            with open(os.path.join(directory, name)) as f:
                rows = [row for row in map(json.loads, f) if row[0] == kind]
            if rows:
                out[int(name[4:-6])] = (rows[0][3], rows[0][4])
    return out


def _fresh(directory: str) -> None:
    for name in os.listdir(directory):
        os.remove(os.path.join(directory, name))


def _trainer(world: int, args: argparse.Namespace, root: str, run: str,
             logger: Any = False) -> pl.Trainer:
    return pl.Trainer(num_workers=world, max_epochs=1, max_failures=1, resume="never",
                      default_root_dir=os.path.join(root, f"w{world}"), run_name=run,
                      logger=logger, log_every_n_steps=1, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0, checkpoint_every_n_steps=args.every,
                      placement_timeout_s=args.placement_timeout)


def _launch_s(stamps: str, start: float) -> float:
    """From the ``fit`` call to the first training step of the slowest rank (attempt 0)."""
    firsts: dict[int, float] = {}
    for kind, ts, _, rank in _stamps(stamps):
        if kind == "first_step":
            firsts[rank] = min(firsts.get(rank, ts), ts)
    return max(firsts.values()) - start


def _warm_fit(world: int, args: argparse.Namespace, root: str, stamps: str,
              ended: dict[int, float], meter: Meter, out: dict[str, float]) -> pl.Trainer:
    """A new Trainer fits on the workers the last one parked in the warm pool
    (``driver.pool``): launch to the first step of the slowest rank, where the driver spent
    it, and each worker's CPU from its last run's end (``ended``: CPU seconds by pid)."""
    from ray_lit.driver.pool import POOL

    _fresh(stamps)
    taken = POOL.taken_total
    warm = _trainer(world, args, root, "warm")
    meter.phases.clear()
    start = time.time()
    warm.fit(Tiny(stamps, args.step_ms / 1e3), _loader(world, args.warm_steps))
    out["warm_launch_s"] = _launch_s(stamps, start)
    out["warm_pooled"] = POOL.taken_total - taken  # 1: the workers came from the pool
    spans: dict[str, float] = {}
    for label, begin, end in meter.phases:
        spans[label] = spans.get(label, 0.0) + end - begin
        if label == "run":
            spans["to_run"] = begin - start
    for label in ("take", "join", "create", "run", "to_run"):
        out[f"warm_{label}_s"] = spans.get(label, float("nan"))
    out["warm_first_step_after_run_s"] = out["warm_launch_s"] - spans.get("to_run", 0.0) \
        - spans.get("run", 0.0)
    firsts = _worker_cpu(stamps, "first_step").values()
    deltas = [cpu - ended[pid] for cpu, pid in firsts if pid in ended]
    out["worker_cpu_warm_s"] = statistics.median(deltas) if deltas else float("nan")
    return warm


def measure(world: int, args: argparse.Namespace, root: str, meter: Meter) -> dict[str, float]:
    """A cold run of ``world`` workers, a second Trainer on its parked workers (the warm
    pool), then one epoch more on that Trainer's group, which loses a rank."""
    stamps = os.path.join(root, f"stamps{world}")
    os.makedirs(stamps)
    clock = DriverClock(meter)
    trainer = _trainer(world, args, root, "steady", logger=clock)
    meter.reset()
    start = time.time()
    trainer.fit(Tiny(stamps, args.step_ms / 1e3), _loader(world, args.steps))
    launch = _launch_s(stamps, start)
    (s0, c0, m0, p0, k0, w0), (s1, c1, m1, p1, k1, w1) = clock.marks[0], clock.marks[-1]
    steps = max(s1 - s0, 1)
    driver_cpu = (c1 - c0) - (m1 - m0)
    polls = max(p1 - p0, 1)
    # ray_lit's own work per poll: without the commits and without what the idle driver
    # process burns anyway (Ray's threads)
    polling_cpu = driver_cpu - (k1 - k0) - args.idle_cpu_rate * (w1 - w0)
    out = {
        "launch_s": launch,
        "driver_ms_per_step": 1e3 * driver_cpu / steps,
        "polls_per_step": polls / steps,
        "polls_per_s": polls / max(w1 - w0, 1e-9),
        "driver_core_pct": 100 * driver_cpu / max(w1 - w0, 1e-9),
        "us_per_worker_per_poll": 1e6 * driver_cpu / polls / world,
        "us_per_worker_per_poll_no_commit": 1e6 * polling_cpu / polls / world,
        "us_per_worker_per_s": 1e6 * polling_cpu / max(w1 - w0, 1e-9) / world,
        "answers_per_poll": meter.answers / max(meter.polls, 1),
        "event_bytes_per_step": meter.event_bytes / max(trainer.global_step, 1),
        "status_bytes_per_step": meter.status_bytes / max(trainer.global_step, 1),
        "status_bytes_per_poll_worker": meter.status_bytes / max(meter.polls, 1) / world,
        "commit_ms": 1e3 * statistics.median(meter.commits) if meter.commits else float("nan"),
        "confirm_to_commit_ms": 1e3 * statistics.median(meter.commit_latency)
        if meter.commit_latency else float("nan"),
        "global_step": trainer.global_step,
    }
    cold_cpu = _worker_cpu(stamps, "first_step")
    out["worker_cpu_cold_s"] = statistics.median(cpu for cpu, _ in cold_cpu.values())
    if not args.no_warm:
        ended = {pid: cpu for cpu, pid in _worker_cpu(stamps, "train_end").values()}
        del trainer
        gc.collect()  # the Trainer went without teardown(): its finalizer parks its group
        trainer = _warm_fit(world, args, root, stamps, ended, meter, out)
    if args.no_recovery:
        trainer.teardown()
        return out
    # the lost worker: the same Trainer fits one epoch more (its kept group: no second launch)
    # in another run directory, so the restart resumes from that run's checkpoints; the last
    # rank exits ``--kill-step`` steps into it
    _fresh(stamps)
    trainer.config.max_epochs += 1
    trainer.config.run_name = "recovery"
    base = trainer.global_step
    trainer.fit(Tiny(stamps, args.step_ms / 1e3, kill_step=base + args.kill_step),
                _loader(world, args.steps))
    seen = _stamps(stamps)
    killed = min(ts for kind, ts, _, _ in seen if kind == "kill")
    resumed = [(ts, step) for kind, ts, step, _ in seen if kind == "first_step" and ts > killed]
    controller = trainer._controller
    out.update({
        "recovery_s": max(ts for ts, _ in resumed) - killed if resumed else float("nan"),
        "controller_recovery_s": controller.recovery_times[0] if controller.recovery_times
        else float("nan"),
        "steps_redone": base + args.kill_step - min(step for _, step in resumed)
        if resumed else float("nan"),
        "restarts": trainer.num_restarts,
        "final_step": trainer.global_step,
    })
    trainer.teardown()
    return out


COLUMNS = [
    ("launch_s", "launch->1st step s", "{:.2f}"),
    ("warm_launch_s", "warm launch->1st step s", "{:.2f}"),
    ("warm_take_s", "warm: pool take s", "{:.2f}"),
    ("warm_join_s", "warm: process group s", "{:.2f}"),
    ("warm_run_s", "warm: run call s", "{:.2f}"),
    ("warm_first_step_after_run_s", "warm: run -> 1st step s", "{:.2f}"),
    ("worker_cpu_cold_s", "worker CPU s to 1st step, cold", "{:.2f}"),
    ("worker_cpu_warm_s", "worker CPU s to 1st step, warm", "{:.2f}"),
    ("driver_ms_per_step", "driver CPU ms/step", "{:.2f}"),
    ("driver_core_pct", "driver % of a core", "{:.1f}"),
    ("polls_per_step", "polls/step", "{:.2f}"),
    ("polls_per_s", "polls/s", "{:.1f}"),
    ("us_per_worker_per_poll", "driver us/worker/poll", "{:.0f}"),
    ("us_per_worker_per_poll_no_commit", "same, less commits and idle", "{:.0f}"),
    ("us_per_worker_per_s", "driver us/worker/s, less commits and idle", "{:.0f}"),
    ("answers_per_poll", "ranks answering/poll", "{:.2f}"),
    ("event_bytes_per_step", "metric B/step", "{:.0f}"),
    ("status_bytes_per_step", "status B/step", "{:.0f}"),
    ("status_bytes_per_poll_worker", "status B/poll/worker", "{:.0f}"),
    ("commit_ms", "commit ms", "{:.2f}"),
    ("confirm_to_commit_ms", "1st part->commit ms", "{:.1f}"),
    ("recovery_s", "recovery s (kill->step)", "{:.2f}"),
    ("controller_recovery_s", "controller recovery s", "{:.2f}"),
    ("steps_redone", "steps redone", "{:.0f}"),
]


def _table(rows: dict[int, dict[str, float]]) -> str:
    head = ["workers"] + [label for _, label, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for world, r in rows.items():
        cells = [str(world)] + [fmt.format(r.get(key, float("nan"))) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slopes(rows: dict[int, dict[str, float]]) -> str:
    import numpy as np

    sizes = np.array(list(rows), dtype=float)
    lines = ["linear fits over the sizes (a + b * N; on 2 shared cores, so the launch and "
             "recovery slopes are mostly CPU contention):"]
    for key, label, _ in COLUMNS:
        values = np.array([rows[n].get(key, np.nan) for n in rows], dtype=float)
        if len(sizes) < 2 or not np.isfinite(values).all():
            continue
        b, a = np.polyfit(sizes, values, 1)
        lines.append(f"  {label:<26} a = {a:10.3f}  b = {b:10.4f} per worker")
    return "\n".join(lines)


def _plot(rows: dict[int, dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(rows)
    base = rows.get(2) or rows[sizes[0]]  # launch is judged against 2 workers (issue 17)
    for n, r in rows.items():
        for key in ("launch_s", "warm_launch_s"):
            r[f"{key}_vs_2"] = r.get(key, float("nan")) / base.get(key, float("nan"))
        # the whole driver, not per worker: its slope is the cost of one more worker
        r["driver_ms_per_s"] = r.get("us_per_worker_per_s", float("nan")) * n / 1e3
    panels = [
        (["launch_s", "warm_launch_s", "recovery_s"], "seconds",
         "launch -> first step (cold; warm pool); recovery"),
        (["launch_s_vs_2", "warm_launch_s_vs_2"], "x launch at 2 workers",
         "launch against 2 workers (target: <= 2x at 16)"),
        (["worker_cpu_cold_s", "worker_cpu_warm_s"], "CPU seconds",
         "one worker's CPU to its first step"),
        (["driver_core_pct"], "% of one core", "driver CPU while training"),
        (["driver_ms_per_s"], "ms CPU per s of training",
         "driver CPU, less commits and idle (slope: per worker)"),
        (["commit_ms", "confirm_to_commit_ms"], "ms", "checkpoint commit; first part -> commit"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (keys, ylabel, title) in zip(axes.flat, panels):
        for key in keys:
            ax.plot(sizes, [rows[n].get(key, float("nan")) for n in sizes], marker="o",
                    label=key)
        if ylabel.startswith("x launch"):
            ax.axhline(2.0, color="grey", linestyle="--", label="target 2x")
        if ylabel == "seconds":
            ax.set_yscale("log")  # cold starts take minutes, warm ones a fraction of a second
        ax.set_xticks(sizes, [str(n) for n in sizes])  # a linear axis: linear growth is a line
        ax.set_xlabel("workers (tiny, on 2 cores)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("ray_lit on real Ray, one machine (2 cores, 16 logical CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per epoch")
    parser.add_argument("--step-ms", type=float, default=20.0,
                        help="a sleep in every training step (the compute of a real step)")
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--kill-step", type=int, default=75)
    parser.add_argument("--plot", default=os.path.join(HERE, "scale_curve_ray.png"))
    parser.add_argument("--json", default=None, help="also write every measurement here")
    parser.add_argument("--placement-timeout", type=float, default=600.0,
                        help="seconds the workers may take to start (16 on 2 loaded cores)")
    parser.add_argument("--no-recovery", action="store_true",
                        help="skip the lost-worker fit (measure the steady state only)")
    parser.add_argument("--no-warm", action="store_true",
                        help="skip the second Trainer on the warm pool")
    parser.add_argument("--warm-steps", type=int, default=20,
                        help="optimizer steps of the warm pool's fit")
    parser.add_argument("--replot", default=None, help="only print and plot this --json file")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            rows = {int(k): v for k, v in json.load(f).items()}
        print(_table(rows), _slopes(rows), sep="\n\n")
        if args.plot:
            _plot(rows, args.plot)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # collectives on loopback only
    import ray

    ray.init(address="local", num_cpus=max(sizes), include_dashboard=False, log_to_driver=False)
    meter = Meter()
    # what this driver process burns with Ray connected and nothing running (Ray's threads)
    time.sleep(2.0)
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(3.0)
    args.idle_cpu_rate = (time.process_time() - cpu) / (time.monotonic() - wall)
    print(f"  idle driver: {1e3 * args.idle_cpu_rate:.2f} ms CPU per second", flush=True)
    rows: dict[int, dict[str, float]] = {}
    began = time.time()
    with tempfile.TemporaryDirectory() as root:
        for world in sizes:
            rows[world] = measure(world, args, root, meter)
            print(f"  {world} worker(s) done at {time.time() - began:.0f} s", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    ray.shutdown()
    print(f"\nreal Ray, {os.cpu_count()} cores, num_cpus={max(sizes)} (several workers per "
          f"core); {args.steps} steps of {args.step_ms:.0f} ms (a sleep) per run, a checkpoint "
          f"every {args.every}, rank N-1 killed at step {args.kill_step}\n")
    print(_table(rows))
    print()
    print(_slopes(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        _plot(rows, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
