"""Recovery time: a worker dies (``os._exit`` inside ``training_step`` at a given optimizer step,
once) -> the new worker group runs its first training step.

Runs ``ray_lit.fit`` on the MLP workload on a fresh local Ray cluster with
``checkpoint_every_n_steps`` set. The module itself writes the timestamps:

* ``killed.json`` - written by the dying rank just before ``os._exit(1)``: wall time and step;
* ``resumed_rank<r>.json`` - written by each rank of the new group at its first training step:
  wall time and the global step it resumed from.

Recovery = first new-group training step - kill; steps redone = kill step - resumed step. The
controller's own measurement (``trainer._controller.recovery_times``, failure noticed -> new
group observed stepping) and the driver-side log times (failure noticed, restore started) are
printed next to it, which splits the time into detection and restart.

    python benchmarks/recovery.py                      # kill rank 1 at step 250, ckpt every 100
    python benchmarks/recovery.py --kill-step 130 --every 50 --rank 0 --json rec.json
    python benchmarks/recovery.py --fresh-workers      # without keeping the surviving workers
    python benchmarks/recovery.py --node-loss          # elastic (1, 2): a node removed
    python benchmarks/recovery.py --grow               # elastic (1, 2): a node added
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"]
                                   if os.environ.get("PYTHONPATH") else "")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import ray_lit  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    build_net,
    current_rank,
    process_start_ts,
    time_calls,
    train_loader,
    workload,
)


class KillOnce(ray_lit.LightningModule):
    """The MLP; rank ``kill_rank`` exits hard at global step ``kill_step`` the first time."""

    def __init__(self, out_dir: str, kill_step: int, kill_rank: int,
                 node_loss: bool = False) -> None:
        super().__init__()
        self.net = build_net("mlp")
        self.out_dir, self.kill_step, self.kill_rank = out_dir, kill_step, kill_rank
        self.node_loss = node_loss  # rank 0 signals the step; the driver removes a node
        self._first_ts: float | None = None
        self._fit_start_ts: float | None = None
        self._reported = False

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        now = time.time()
        if self._first_ts is None:
            self._first_ts = now
        marker = os.path.join(self.out_dir, "killed.json")
        step = self.trainer.global_step
        rank = current_rank()
        if os.path.exists(marker):
            if not self._reported:
                with open(marker) as f:
                    killed = json.load(f)
                if self._first_ts > killed["ts"]:  # this process belongs to a new group
                    with open(os.path.join(self.out_dir, f"resumed_rank{rank}.json"), "w") as f:
                        json.dump({"ts": now, "global_step": step, "rank": rank,
                                   "pid": os.getpid(), "process_start_ts": process_start_ts(),
                                   "fit_start_ts": self._fit_start_ts}, f)
                    self._reported = True
        elif self.node_loss:
            at_step = os.path.join(self.out_dir, "at_step.json")
            if rank == 0 and step >= self.kill_step and not os.path.exists(at_step):
                with open(at_step, "w") as f:
                    json.dump({"global_step": step}, f)
        elif rank == self.kill_rank and step >= self.kill_step:
            with open(marker + ".tmp", "w") as f:
                json.dump({"ts": time.time(), "global_step": step, "rank": rank,
                           "pid": os.getpid()}, f)
            os.replace(marker + ".tmp", marker)
            os._exit(1)
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def on_fit_start(self):
        self._fit_start_ts = time.time()


class _Times(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.created, record.getMessage()))


class _Tee:
    """stdout that remembers when each ``ray_lit:`` line was printed."""

    def __init__(self, stream: Any, records: list[tuple[float, str]]) -> None:
        self.stream, self.records = stream, records

    def write(self, text: str) -> int:
        if "ray_lit:" in text:
            self.records.append((time.time(), text.strip()))
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _instrument(phases: list[tuple[str, float, float]]) -> None:
    """Time the driver-side steps of an attempt (wrappers in this process only)."""
    from ray_lit.driver.controller import Controller
    from ray_lit.driver.worker_group import WorkerGroup

    time_calls(phases, Controller, "_root_cause", "root_cause (decide which rank failed)")
    time_calls(phases, WorkerGroup, "shutdown", "old group shutdown")
    time_calls(phases, WorkerGroup, "salvage",
               "old group salvage (survivors leave the process group)")
    time_calls(phases, WorkerGroup, "create", "new group create (actors + process group)",
               is_classmethod=True)
    time_calls(phases, WorkerGroup, "run", "new group run (ship payload, start loop)")


def _remove_node_at_step(cluster: Any, node: Any, out_dir: str) -> None:
    """Driver thread of ``--node-loss``: when rank 0 reports the step, remove the node that
    hosts rank 1 (its raylet and workers are killed, as when a spot VM vanishes)."""
    at_step = os.path.join(out_dir, "at_step.json")
    while not os.path.exists(at_step):
        time.sleep(0.02)
    time.sleep(0.05)
    with open(at_step) as f:
        step = json.load(f)["global_step"]
    ts = time.time()
    cluster.remove_node(node, allow_graceful=False)
    marker = os.path.join(out_dir, "killed.json")
    with open(marker + ".tmp", "w") as f:
        json.dump({"ts": ts, "global_step": step, "rank": 1, "pid": None,
                   "removal_s": time.time() - ts}, f)
    os.replace(marker + ".tmp", marker)


def _add_node_at_step(cluster: Any, out_dir: str) -> None:
    """Main thread of ``--grow`` (``Cluster.add_node`` wants it): when rank 0 reports the step,
    add a node with room for one more worker."""
    at_step = os.path.join(out_dir, "at_step.json")
    while not os.path.exists(at_step):
        time.sleep(0.02)
    with open(at_step) as f:
        step = json.load(f)["global_step"]
    ts = time.time()
    cluster.add_node(num_cpus=1)
    marker = os.path.join(out_dir, "killed.json")
    with open(marker + ".tmp", "w") as f:
        json.dump({"ts": ts, "global_step": step, "rank": None, "pid": None,
                   "removal_s": time.time() - ts}, f)
    os.replace(marker + ".tmp", marker)


def measure(kill_step: int, every: int, kill_rank: int, max_epochs: int,
            out_dir: str, warm: bool = False, fresh: bool = False,
            node_loss: bool = False, grow: bool = False) -> dict[str, Any]:
    import threading

    import cloudpickle
    import ray

    from ray_lit.driver.controller import Controller

    Controller.keep_survivors = not fresh
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runtime_env = {"worker_process_setup_hook": "benchmarks.workloads.warm_imports"} \
        if warm else None
    cluster = remover = None
    if grow:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=runtime_env)
    elif node_loss:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=runtime_env)
        remover = threading.Thread(target=_remove_node_at_step, args=(cluster, node, out_dir),
                                   daemon=True)
        remover.start()
    else:
        ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count(),
                 log_to_driver=False, runtime_env=runtime_env)
    times = _Times()
    logger = logging.getLogger("ray_lit")
    logger.addHandler(times)
    logger.setLevel(logging.INFO)
    sys.stdout = _Tee(sys.stdout, times.records)
    phases: list[tuple[str, float, float]] = []
    _instrument(phases)
    w = workload("mlp")
    module = KillOnce(out_dir, kill_step, kill_rank, node_loss or grow)
    start = time.time()
    options = dict(num_workers=(1, w.num_workers) if node_loss or grow else w.num_workers,
                   max_epochs=max_epochs, checkpoint_every_n_steps=every,
                   storage_path=os.path.join(out_dir, "runs"), run_name="recovery",
                   enable_progress_bar=False, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, max_failures=1)
    if grow:  # fit in a thread: the node is added from the main thread
        box: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: box.update(trainer=ray_lit.fit(
            module, train_loader(w), **options)), daemon=True)
        runner.start()
        _add_node_at_step(cluster, out_dir)
        runner.join()
        trainer = box["trainer"]
    else:
        trainer = ray_lit.fit(module, train_loader(w), **options)
    done = time.time()
    with open(os.path.join(out_dir, "killed.json")) as f:
        killed = json.load(f)
    resumed = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("resumed_rank"):
            with open(os.path.join(out_dir, name)) as f:
                resumed.append(json.load(f))
    first = min(resumed, key=lambda r: r["ts"])
    sys.stdout = sys.stdout.stream
    noticed = next((t for t, m in times.records if ("failed" in m and "attempt" in m)
                    or "resize" in m), None)
    restoring = [t for t, m in times.records if "restoring from" in m]
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    t0 = killed["ts"]
    after = [(label, a - t0, b - t0) for label, a, b in phases if b >= t0]
    what = ("node added" if grow else "node removed (raylet and its workers killed)"
            if node_loss else "kill (os._exit in training_step)")
    timeline = [(what, 0.0, killed.get("removal_s", 0.0))]
    if noticed is not None:
        timeline.append(("driver logs the resize" if grow else "driver logs the failure",
                         noticed - t0, noticed - t0))
    timeline += after
    timeline += [(f"rank {r['rank']} new process started", r["process_start_ts"] - t0,
                  r["process_start_ts"] - t0) for r in resumed]
    timeline += [(f"rank {r['rank']} on_fit_start", r["fit_start_ts"] - t0,
                  r["fit_start_ts"] - t0) for r in resumed if r.get("fit_start_ts")]
    timeline += [(f"rank {r['rank']} first training step", r["ts"] - t0, r["ts"] - t0)
                 for r in resumed]
    timeline.sort(key=lambda e: e[1])
    return {
        "kill_step": killed["global_step"], "kill_rank": killed["rank"],
        "checkpoint_every_n_steps": every,
        "recovery_s": first["ts"] - killed["ts"],
        "recovery_all_ranks_s": max(r["ts"] for r in resumed) - killed["ts"],
        "resumed_step": first["global_step"],
        "steps_redone": killed["global_step"] - first["global_step"],
        "failure_noticed_after_s": None if noticed is None else noticed - killed["ts"],
        "restore_started_after_s": None if not restoring else restoring[-1] - killed["ts"],
        "controller_recovery_times_s": getattr(trainer._controller, "recovery_times", None),
        "num_restarts": trainer.num_restarts, "final_global_step": trainer.global_step,
        "fit_wall_s": done - start, "world_size_history": trainer.world_size_history,
        "survivors_kept": not fresh,
        "timeline_s": [{"what": label, "start": round(a, 3), "end": round(b, 3)}
                       for label, a, b in timeline],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-step", type=int, default=250)
    parser.add_argument("--every", type=int, default=100, help="checkpoint_every_n_steps")
    parser.add_argument("--rank", type=int, default=1, help="the rank that dies")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="kill at step 30, ckpt every 20")
    parser.add_argument("--warm-workers", action="store_true",
                        help="experiment: a Ray worker_process_setup_hook imports torch, "
                             "torch._dynamo and ray_lit in Ray's idle workers ahead of time")
    parser.add_argument("--fresh-workers", action="store_true",
                        help="tear the whole group down on a failure (the behaviour before "
                             "survivors were kept), for comparison")
    parser.add_argument("--node-loss", action="store_true",
                        help="elastic (1, 2) on a two-node ray.cluster_utils.Cluster; the "
                             "node of rank 1 is removed at --kill-step")
    parser.add_argument("--grow", action="store_true",
                        help="elastic (1, 2) on a one-CPU ray.cluster_utils.Cluster; a node is "
                             "added at --kill-step: node added -> first step of the 2-worker "
                             "group")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.kill_step, args.every, args.epochs = 30, 20, 1
    out_dir = args.out or tempfile.mkdtemp(prefix="ray_lit_recovery_")
    os.makedirs(out_dir, exist_ok=True)
    import shutil

    for name in os.listdir(out_dir):
        if name.endswith(".json"):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, "runs"), ignore_errors=True)  # no resume of a past run
    result = measure(args.kill_step, args.every, args.rank, args.epochs, out_dir,
                     args.warm_workers, args.fresh_workers, args.node_loss, args.grow)
    print(json.dumps({k: v for k, v in result.items() if k != "timeline_s"}, indent=1))
    print("timeline (s after the kill):")
    for e in result["timeline_s"]:
        span = f"{e['start']:7.2f}" + (f" -> {e['end']:7.2f}" if e["end"] != e["start"] else "")
        print(f"  {span:20s} {e['what']}")
    redone = (f"{result['steps_redone']} steps redone (killed at {result['kill_step']}, "
              f"resumed at {result['resumed_step']}, checkpoint every {args.every})")
    if args.node_loss or args.grow:  # the node changes a little after --kill-step
        redone = f"resumed at step {result['resumed_step']}"
    print(f"{'growth' if args.grow else 'recovery'}: {result['recovery_s']:.2f} s from the "
          f"event to the new group's first "
          f"training step (target < 10 s); {redone}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
