"""ray_lit side by side with raw torch DDP, Lightning's DDP and Ray Train + Lightning.

Every (workload, framework) pair runs once, in a fresh Python process launched by this script,
so "launch to done" counts interpreter start, imports, cluster start (Ray), worker start-up,
process-group formation, training and the framework's teardown up to ``fit`` returning. Ranks
write their own epoch times, first-step time and peak RSS (``VmHWM``); this script prints one
table per workload.

    python benchmarks/run.py                 # both workloads, every framework installed
    python benchmarks/run.py --quick         # tiny smoke version (seconds, not minutes)
    python benchmarks/run.py --workloads mlp --frameworks raw_ddp,ray_lit
    python benchmarks/run.py --json results.json

Frameworks: ``raw_ddp`` (baseline), ``raw_ddp_in_ray`` (the same loop, each rank in a plain Ray
actor: the floor of any trainer built on Ray actors, e.g. the memory of the Ray core worker),
``ray_lit`` (progress bar, logger, checkpointing and model
summary off), ``ray_lit_defaults`` (the same with the Trainer's defaults: what they cost),
``lightning`` (Lightning's own DDP, if ``lightning`` is installed), ``ray_train`` (Ray Train's
``TorchTrainer`` + ``ray.train.lightning``, if ``lightning`` is installed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.workloads import Workload, time_calls, workload  # noqa: E402

ALL_FRAMEWORKS = ["raw_ddp", "raw_ddp_in_ray", "ray_lit", "ray_lit_defaults", "lightning",
                  "ray_train"]
QUIET_OPTIONS = {"enable_progress_bar": False, "logger": False, "enable_checkpointing": False,
                 "enable_model_summary": False}


def _lightning_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("lightning") is not None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["GLOO_SOCKET_IFNAME"] = "lo"  # collectives on loopback only
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    return env


def _init_local_ray() -> None:
    """A fresh single-node Ray on loopback for this process (never an existing cluster)."""
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count(),
             log_to_driver=False)


# --- children: one framework, one workload, one process ---------------------------------------
def child_raw_ddp(w: Workload, out: str) -> dict[str, Any]:
    from benchmarks.raw_ddp import run

    return run(w, out)


def child_raw_ddp_in_ray(w: Workload, out: str) -> dict[str, Any]:
    from benchmarks.raw_ddp import run_in_ray_actors

    _init_local_ray()
    return run_in_ray_actors(w, out)


def _time_driver_phases(phases: list[tuple[str, float, float]]) -> None:
    """Wrap ray_lit's driver-side start-up steps with timers (in this process only)."""
    from ray_lit.driver import launch as launcher
    from ray_lit.driver.worker_group import WorkerGroup

    wrap = functools.partial(time_calls, phases)
    wrap(launcher, "_ship", "ship (pickle + ray.put)")
    wrap(launcher, "_group_options", "group options (feasibility check)")
    wrap(WorkerGroup, "create", "worker group create (placement, actors, process group)",
         is_classmethod=True)
    wrap(WorkerGroup, "_join_process_group", "  of which: process group")
    wrap(WorkerGroup, "run", "run (workers fetch payload, start loop)")
    wrap(WorkerGroup, "shutdown", "shutdown")


def child_ray_lit(w: Workload, out: str, defaults: bool = False) -> dict[str, Any]:
    import cloudpickle

    import benchmarks.workloads as wl

    cloudpickle.register_pickle_by_value(wl)
    start = time.time()
    import ray_lit
    import ray_lit.trainer  # noqa: F401  (the lazy import would otherwise land in fit)

    imported = time.time()
    _init_local_ray()
    ray_init_s = time.time() - start
    phases: list[tuple[str, float, float]] = [("import ray_lit", start, imported),
                                              ("ray.init (local cluster)", imported,
                                               time.time())]
    _time_driver_phases(phases)
    module = wl.make_module_class(ray_lit.LightningModule)(w.name, w.lr, out)
    options: dict[str, Any] = {} if defaults else dict(QUIET_OPTIONS)
    fit_start = time.time()
    trainer = ray_lit.fit(module, wl.train_loader(w), num_workers=w.num_workers,
                          max_epochs=w.max_epochs, default_root_dir=os.path.join(out, "runs"),
                          **options)
    done = time.time()
    controller = getattr(trainer, "_controller", None)
    return {"fit_start_ts": fit_start, "done_ts": done, "import_and_ray_init_s": ray_init_s,
            "phases": phases,
            "global_step": trainer.global_step,
            "recovery_times": getattr(controller, "recovery_times", None)}


def _lightning_trainer_kwargs(w: Workload) -> dict[str, Any]:
    return {"max_epochs": w.max_epochs, **QUIET_OPTIONS}


def child_lightning(w: Workload, out: str) -> dict[str, Any] | None:
    import lightning as L

    import benchmarks.workloads as wl

    start = time.time()
    module = wl.make_module_class(L.LightningModule)(w.name, w.lr, out)
    trainer = L.Trainer(accelerator="cpu", devices=w.num_workers, strategy="ddp",
                        default_root_dir=os.path.join(out, "runs"),
                        **_lightning_trainer_kwargs(w))
    trainer.fit(module, wl.train_loader(w))
    if trainer.global_rank != 0:
        return None  # a rank process Lightning launched: only rank 0 reports
    return {"fit_start_ts": start, "done_ts": time.time(), "global_step": trainer.global_step}


def _ray_train_loop(config: dict[str, Any]) -> None:
    import lightning as L
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    import benchmarks.workloads as wl

    w = Workload(**config["workload"])
    module = wl.make_module_class(L.LightningModule)(w.name, w.lr, config["out"])
    trainer = L.Trainer(accelerator="cpu", devices="auto", strategy=RayDDPStrategy(),
                        plugins=[RayLightningEnvironment()],
                        default_root_dir=os.path.join(config["out"], "runs"),
                        **_lightning_trainer_kwargs(w))
    trainer = prepare_trainer(trainer)
    trainer.fit(module, wl.train_loader(w))


def child_ray_train(w: Workload, out: str) -> dict[str, Any]:
    _init_local_ray()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.time()
    trainer = TorchTrainer(
        _ray_train_loop, train_loop_config={"workload": w.to_dict(), "out": out},
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=False),
        run_config=RunConfig(storage_path=os.path.join(out, "ray_train"), name="bench"))
    trainer.fit()
    return {"fit_start_ts": start, "done_ts": time.time()}


def child_main(args: argparse.Namespace) -> None:
    w = Workload(**json.loads(args.workload_json))
    out = args.out
    fn = {"raw_ddp": child_raw_ddp, "raw_ddp_in_ray": child_raw_ddp_in_ray,
          "ray_lit": child_ray_lit,
          "ray_lit_defaults": lambda w, o: child_ray_lit(w, o, defaults=True),
          "lightning": child_lightning, "ray_train": child_ray_train}[args.child]
    info = fn(w, out)
    if info is not None:
        with open(os.path.join(out, "driver.json"), "w") as f:
            json.dump(info, f)
    if "ray" in sys.modules:  # stop the local cluster now, not while the next run starts
        import ray

        if ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # what is left of the teardown is not part of the measurement


# --- parent ---------------------------------------------------------------------------------------
def _loadavg() -> float:
    return os.getloadavg()[0]


def _busy_fraction(window_s: float = 2.0) -> float:
    """Share of all CPUs busy over ``window_s`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(window_s)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_until_quiet(max_wait_s: float, busy_below: float = 0.1) -> float:
    """Wait (up to ``max_wait_s``) until the machine is idle; returns the last busy share."""
    deadline = time.time() + max_wait_s
    busy = _busy_fraction(1.0)
    while busy >= busy_below and time.time() < deadline:
        busy = _busy_fraction(2.0)
    return busy


def measure(framework: str, w: Workload, out_root: str, timeout_s: float,
            quiet_wait_s: float = 0.0) -> dict[str, Any]:
    out = os.path.join(out_root, f"{w.name}_{framework}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    busy_before = wait_until_quiet(quiet_wait_s) if quiet_wait_s else None
    load_before = _loadavg()
    launch = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, "--out", out,
           "--workload-json", json.dumps(w.to_dict())]
    with open(os.path.join(out, "stdout.log"), "w") as log:
        try:
            proc = subprocess.run(cmd, env=_child_env(), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, cwd=out)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    exited = time.time()
    row: dict[str, Any] = {"framework": framework, "workload": w.name, "rc": rc,
                           "launch_ts": launch, "busy_before": busy_before,
                           "load_before": load_before, "exit_s": exited - launch}
    driver_path = os.path.join(out, "driver.json")
    deadline = time.time() + 10  # Lightning's other ranks may still be writing
    while time.time() < deadline and sum(
            n.startswith("rank") for n in os.listdir(out)) < w.num_workers:
        time.sleep(0.1)
    ranks = []
    for name in sorted(os.listdir(out)):
        if name.startswith("rank") and name.endswith(".json"):
            with open(os.path.join(out, name)) as f:
                ranks.append(json.load(f))
    if rc != 0 or not os.path.exists(driver_path) or len(ranks) < w.num_workers:
        row["error"] = f"rc={rc}; see {out}/stdout.log"
        return row
    with open(driver_path) as f:
        driver = json.load(f)
    ranks.sort(key=lambda r: r["rank"])
    epochs = ranks[0]["epoch_times"]
    row.update({
        "launch_to_done_s": driver["done_ts"] - launch,
        "launch_to_first_step_s": min(r["first_step_ts"] for r in ranks) - launch,
        "epoch_times_s": epochs,
        "steady_epoch_s": statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0],
        "first_epoch_s": epochs[0],
        "best_epoch_s": min(epochs[1:]) if len(epochs) > 1 else epochs[0],
        "steady_thread_cpu_s": _steady(ranks[0]["epoch_thread_cpu"]),
        "steady_process_cpu_s": _steady(ranks[0]["epoch_process_cpu"]),
        "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
        "torch_threads": [r["torch_threads"] for r in ranks],
        "driver": driver,
        "ranks": ranks,
    })
    return row


def _steady(epochs: list[float]) -> float:
    return statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0]


def _fmt_ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def table(rows: list[dict[str, Any]], w: Workload) -> str:
    base = next((r for r in rows if r["framework"] == "raw_ddp" and "error" not in r), None)
    steps = w.steps_per_epoch()
    head = (f"workload {w.name}: {w.num_samples} samples, batch {w.batch_size}/worker, "
            f"{w.num_workers} workers, {w.max_epochs} epochs, {steps} steps/epoch/worker")
    lines = [head, "",
             "| framework | launch->done s (x raw) | steady epoch s (x raw) | "
             "best epoch s (x raw) | first epoch s | "
             "overhead ms/step vs raw | launch->1st step s | peak RSS MiB/worker (x raw) | "
             "steady epoch CPU s: loop thread / rank process (x raw) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['framework']} | failed: {r['error']} | | | | | | | |")
            continue
        rss = max(r["peak_rss_mb"])
        if base:
            over = (r["steady_epoch_s"] - base["steady_epoch_s"]) / steps * 1000
            over_s = f"{over:+.2f}"
            brss = max(base["peak_rss_mb"])
        else:
            over_s, brss = "-", None
        lines.append(
            f"| {r['framework']} | {r['launch_to_done_s']:.1f} "
            f"({_fmt_ratio(r['launch_to_done_s'], base and base['launch_to_done_s'])}) | "
            f"{r['steady_epoch_s']:.3f} "
            f"({_fmt_ratio(r['steady_epoch_s'], base and base['steady_epoch_s'])}) | "
            f"{r['best_epoch_s']:.3f} "
            f"({_fmt_ratio(r['best_epoch_s'], base and base['best_epoch_s'])}) | "
            f"{r['first_epoch_s']:.3f} | {over_s} | {r['launch_to_first_step_s']:.1f} | "
            f"{' / '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} "
            f"({_fmt_ratio(rss, brss)}) | {r['steady_thread_cpu_s']:.3f} / "
            f"{r['steady_process_cpu_s']:.3f} "
            f"({_fmt_ratio(r['steady_thread_cpu_s'], base and base['steady_thread_cpu_s'])} / "
            f"{_fmt_ratio(r['steady_process_cpu_s'], base and base['steady_process_cpu_s'])}) |")
    loads = ", ".join(f"{r['framework']} {r['load_before']:.2f}" for r in rows)
    lines += ["", f"1-min load average before each run: {loads}"]
    spreads = [f"{r['framework']}: launch->done {r['spread']['launch_to_done_s'][0]:.1f}-"
               f"{r['spread']['launch_to_done_s'][1]:.1f} s, steady epoch "
               f"{r['spread']['steady_epoch_s'][0]:.3f}-{r['spread']['steady_epoch_s'][1]:.3f} s"
               for r in rows if "spread" in r]
    if spreads:
        lines += ["", "medians of the repeats; min-max: " + "; ".join(spreads)]
    return "\n".join(lines)


def startup(row: dict[str, Any], launch_key: str = "launch_ts") -> str:
    """ray_lit's start-up, step by step, in seconds after the launch."""
    driver = row.get("driver", {})
    launch = row.get(launch_key)
    if not driver.get("phases") or launch is None:
        return ""
    events = [(a - launch, b - launch, label) for label, a, b in driver["phases"]]
    events += [(r["process_start_ts"] - launch, None, f"rank {r['rank']} process started")
               for r in row.get("ranks", [])]
    events += [(r["first_step_ts"] - launch, None, f"rank {r['rank']} first training step")
               for r in row.get("ranks", [])]
    events.append((driver["fit_start_ts"] - launch, None, "ray_lit.fit called"))
    events.append((driver["done_ts"] - launch, None, "ray_lit.fit returned"))
    lines = [f"{row['framework']} start-up (s after launch; run {row.get('repeat', 0) + 1}):"]
    for a, b, label in sorted(events, key=lambda e: e[0]):
        span = f"{a:6.2f}" + (f" -> {b:6.2f} ({b - a:5.2f})" if b is not None else "")
        lines.append(f"  {span:30s} {label}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke version")
    parser.add_argument("--workloads", default="mlp,conv")
    parser.add_argument("--frameworks", default=",".join(ALL_FRAMEWORKS))
    parser.add_argument("--out", default=None, help="where the runs write (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write every measurement here")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                        help="before each run, wait up to S seconds for the CPUs to be idle "
                             "(<10%% busy)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the workload's epochs (more steady epochs per run)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every framework N times (round robin) and report medians")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workload-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    frameworks = [f for f in args.frameworks.split(",") if f]
    if not _lightning_installed():
        skipped = [f for f in frameworks if f in ("lightning", "ray_train")]
        if skipped:
            print(f"skipping {skipped}: `pip install lightning` to compare with them")
        frameworks = [f for f in frameworks if f not in ("lightning", "ray_train")]
    out_root = args.out or tempfile.mkdtemp(prefix="ray_lit_bench_")
    all_rows = []
    for name in args.workloads.split(","):
        w = workload(name, args.quick)
        if args.epochs:
            w.max_epochs = args.epochs
        runs: dict[str, list[dict[str, Any]]] = {fw: [] for fw in frameworks}
        for rep in range(args.repeat):  # round robin: slow drifts hit every framework alike
            for fw in frameworks:
                print(f"[{name}] {fw} (run {rep + 1}/{args.repeat}) ...", flush=True)
                row = measure(fw, w, os.path.join(out_root, f"rep{rep}"), args.timeout,
                              args.quiet_wait)
                row["repeat"] = rep
                runs[fw].append(row)
                all_rows.append(row)
                if "error" in row:
                    print(f"    failed: {row['error']}", flush=True)
                else:
                    print(f"    launch->done {row['launch_to_done_s']:.1f} s, epochs "
                          f"{[round(e, 3) for e in row['epoch_times_s']]}", flush=True)
        rows = [combine(runs[fw]) for fw in frameworks]
        print()
        print(table(rows, w))
        print()
        for fw in ("ray_lit", "ray_lit_defaults"):
            for row in runs.get(fw, [])[:1]:
                if "error" not in row:
                    print(startup(row))
                    print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": all_rows, "quick": args.quick, "repeat": args.repeat}, f,
                      indent=1)


def combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each measurement over the repeats (a failed run fails the row)."""
    failed = [r for r in rows if "error" in r]
    if failed:
        return failed[0]
    if len(rows) == 1:
        return rows[0]
    out = dict(rows[0])
    out["best_epoch_s"] = min(r["best_epoch_s"] for r in rows)  # best of all repeats
    for key in ("launch_to_done_s", "launch_to_first_step_s", "steady_epoch_s",
                "first_epoch_s", "load_before", "steady_thread_cpu_s", "steady_process_cpu_s"):
        out[key] = statistics.median(r[key] for r in rows)
    out["peak_rss_mb"] = [statistics.median(r["peak_rss_mb"][i] for r in rows)
                          for i in range(len(rows[0]["peak_rss_mb"]))]
    out["spread"] = {key: (min(r[key] for r in rows), max(r[key] for r in rows))
                     for key in ("launch_to_done_s", "steady_epoch_s")}
    return out


if __name__ == "__main__":
    main()
