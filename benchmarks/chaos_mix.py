"""A bigger chaos run (issue 19, item 4): many faults of all six kinds in ONE invocation.

Two phases train the same small model (``chaos_driver.ChaosNet``) on a local multi-node
``ray.cluster_utils.Cluster`` (a head without CPUs, worker nodes of 2 CPUs), with the run
directory on an S3 endpoint (moto on 127.0.0.1 behind a proxy process):

- **fixed**: ``num_workers=4``, dropout on. The final weights must equal the uninterrupted
  run's bit for bit (``torch.equal``).
- **elastic**: ``num_workers=(2, 4)``, dropout off. A node removal shrinks the group to 2 (the
  replacement node comes ``--regrow-s`` later and the group grows back at a checkpoint
  boundary); another world size may sum the gradients in another order, so the final weights
  are compared loosely (``torch.allclose`` at ``--elastic-atol``) and the output says so.

In each phase, faults are drawn at random (the six kinds dealt in rounds, each round shuffled,
so each kind appears about equally often) at random (rank, step) pairs:

- ``exit``: a rank ``os._exit(1)``s; ``sigkill``: a rank SIGKILLs itself;
- ``hang``: a rank sleeps in ``training_step`` until ``worker_hang_timeout_s`` finds it;
- ``node``: the node hosting a rank is removed (raylet and workers killed); in the fixed phase a
  replacement node is added at once, in the elastic one ``--regrow-s`` later;
- ``driver``: the training driver, a subprocess (``chaos_driver.py``), is SIGKILLed by pid and
  started again on the same run directory (it resumes from the latest committed checkpoint);
- ``outage``: the S3 endpoint goes away for ``--outage-s`` seconds (training goes on, writes
  are retried).

A rank carries out its own process faults and asks this script for the others (a request file
in the plan directory; the rank waits for its node or driver to be killed). Recovery of a fault
is measured the same way for every kind: from the moment it was injected to the first training
step of the next attempt (every rank logs the first step of each attempt); steps redone are the
fault's step minus that step. A watcher thread loads every committed checkpoint of both phases
as it appears: none may be unreadable.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/chaos_mix.py --faults 50
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/chaos_mix.py --quick   # 8 faults

Prints one table per phase and the checks; ``--json PATH`` writes every fault's record. Exits 1
when a planned fault did not fire, a phase did not finish, a committed checkpoint was unreadable
or the fixed phase's weights differ.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos_cluster import ChaosCluster, S3Endpoint  # noqa: E402

KINDS = ("exit", "sigkill", "hang", "node", "driver", "outage")
PROCESS_KINDS = ("exit", "sigkill", "hang", "node", "driver")  # each ends in a new attempt
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chaos_driver.py")
BATCH = 16


# --- the plan ---------------------------------------------------------------------------------
def make_plan(rng: random.Random, faults: int, steps_total: int, workers: int,
              need_node: bool, kinds: tuple[str, ...] = KINDS) -> list[tuple[int, int, str]]:
    """``faults`` (rank, step, kind), sorted by step: kinds dealt in rounds of the six, each
    round shuffled (so counts differ by one at most), at random distinct steps away from the
    run's two ends.
    ``need_node``: at least one node removal (the elastic phase must shrink and grow)."""
    deck: list[str] = []
    for _ in range(math.ceil(faults / len(kinds))):  # each round: every kind once, shuffled
        deck += rng.sample(kinds, len(kinds))
    drawn = deck[:faults]
    if need_node and "node" in kinds and "node" not in drawn and drawn:
        drawn[rng.randrange(len(drawn))] = "node"
    steps = sorted(rng.sample(range(2, steps_total - 2), faults))
    return [(rng.randrange(workers), step, kind) for step, kind in zip(steps, drawn)]


# --- the commit watcher -----------------------------------------------------------------------
@dataclass
class CommitReport:
    loaded: int = 0
    pruned_before_read: int = 0
    unreadable: list[str] = field(default_factory=list)
    seen_at: list[tuple[float, str]] = field(default_factory=list)  # (time seen, checkpoint)


def watch_commits(run_uris: list[str], stop: threading.Event, endpoint: S3Endpoint,
                  report: CommitReport) -> None:
    """Load every part of every committed checkpoint of ``run_uris`` as soon as it appears.

    Reads go through the proxy. A read that fails while the endpoint is down (or just came
    back) is tried again at the next poll; any other failure of a committed checkpoint is a
    real one. A checkpoint pruned by retention before it was read is counted apart.
    """
    from ray_lit.checkpoint.manager import CheckpointManager
    from ray_lit.storage.checkpoint_io import load_checkpoint

    managers = [CheckpointManager(uri, retry_timeout_s=5) for uri in run_uris]
    seen: set[str] = set()
    last_down = 0.0
    while not stop.is_set():
        if not endpoint.is_up:
            last_down = time.time()
        for manager in managers:
            try:
                committed = manager.committed()
            except Exception:  # listing during an outage: next poll
                continue
            for ckpt in committed:
                key = f"{manager.run_uri}/{ckpt.name}"
                if key in seen:
                    continue
                try:
                    for rank in range(ckpt.world_size):
                        load_checkpoint(ckpt.part_uri(rank))
                    report.loaded += 1
                    report.seen_at.append((time.time(), key))
                except FileNotFoundError:
                    report.pruned_before_read += 1  # retention removed it meanwhile
                except Exception as err:
                    if not endpoint.is_up or time.time() - last_down < 10:
                        continue  # the outage, not the checkpoint: read it again
                    report.unreadable.append(f"{key}: {err}")
                seen.add(key)
        time.sleep(0.1)


# --- one phase --------------------------------------------------------------------------------
@dataclass
class Phase:
    """One chaos phase's configuration and what happened in it."""

    name: str
    num_workers: Any  # 4 or [2, 4]
    dropout: float
    plan: list[tuple[int, int, str]]
    events: list[dict] = field(default_factory=list)  # one per fault fired, as injected
    growths: list[float] = field(default_factory=list)  # times a replacement node came
    outages: list[tuple[float, float]] = field(default_factory=list)  # (down, up) times
    attempts: list[dict] = field(default_factory=list)  # every rank's first step of an attempt
    growth_s: list[float] = field(default_factory=list)  # replacement node -> bigger group
    driver_starts: int = 0
    wall_s: float = 0.0
    result: dict | None = None
    error: str | None = None

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)


def driver_config(args: argparse.Namespace, work: str, cluster: ChaosCluster, storage: str,
                  run_name: str, phase: Phase, plan_dir: str) -> str:
    """Write the config ``chaos_driver.py`` reads; returns its path."""
    cfg = {"address": cluster.address, "storage": storage, "run_name": run_name,
           "plan_dir": plan_dir, "plan": phase.plan if plan_dir else [],
           "num_workers": phase.num_workers, "dropout": phase.dropout,
           "samples": args.samples, "epochs": args.epochs, "every": args.every,
           "hang_timeout_s": args.hang_timeout_s, "placement_timeout_s": 120,
           "out": os.path.join(work, f"{run_name}.pt")}
    path = os.path.join(work, f"{run_name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def start_driver(cfg_path: str, log_path: str) -> subprocess.Popen:
    """A training driver in its own session: its SIGKILL reaches it and nothing else."""
    with open(log_path, "a") as log:
        log.write(f"\n=== driver started {time.strftime('%H:%M:%S')} ===\n")
        log.flush()
        return subprocess.Popen([sys.executable, DRIVER, cfg_path], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver this script started (its own process group, by its pid)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def run_reference(args: argparse.Namespace, work: str, cluster: ChaosCluster, storage: str,
                  phase: Phase) -> tuple[dict, float]:
    """The uninterrupted run of ``phase``'s configuration; its result and wall time."""
    cfg = driver_config(args, work, cluster, storage, f"reference-{phase.name}", phase, "")
    start = time.monotonic()
    proc = start_driver(cfg, os.path.join(work, "drivers.log"))
    if proc.wait() != 0:
        raise RuntimeError(f"the reference run of {phase.name} failed: see {work}/drivers.log")
    with open(cfg) as f:
        out = json.load(f)["out"]
    return torch.load(out, weights_only=False), time.monotonic() - start


def run_phase(args: argparse.Namespace, work: str, cluster: ChaosCluster, endpoint: S3Endpoint,
              storage: str, phase: Phase, timeout_s: float) -> None:
    """Run ``phase`` with its faults; injects what the ranks ask for, restarts killed drivers.

    Fills ``phase.events`` (each fault's record plus ``injected``, the time it took effect),
    ``growths``, ``outages``, ``driver_starts`` and ``result`` (or ``error``).
    """
    plan_dir = os.path.join(work, f"plan-{phase.name}")
    os.makedirs(plan_dir)
    cfg = driver_config(args, work, cluster, storage, phase.name, phase, plan_dir)
    log_path = os.path.join(work, "drivers.log")
    handled: set[str] = set()
    add_at = up_at = None
    down_at = 0.0
    rerun_pending = False  # a killed driver's rerun waits for the storage endpoint
    start = time.monotonic()
    driver = start_driver(cfg, log_path)
    phase.driver_starts = 1
    try:
        while True:
            rc = None if rerun_pending else driver.poll()
            if rc is not None:
                if rc != 0:
                    phase.error = f"the driver exited with {rc} on its own: see {log_path}"
                break
            if time.monotonic() - start > timeout_s:
                phase.error = f"not finished after {timeout_s:.0f} s"
                break
            for marker in sorted(glob.glob(os.path.join(plan_dir, "fault-*.json"))):
                if marker in handled:
                    continue
                handled.add(marker)
                with open(marker) as f:
                    event = json.load(f)
                kind = event["kind"]
                event["injected"] = event["time"]  # the rank's own faults: when it acted
                if kind == "driver":
                    event["injected"] = time.time()
                    kill_driver(driver)
                    if endpoint.is_up:
                        driver = start_driver(cfg, log_path)
                        phase.driver_starts += 1
                    else:
                        # a rerun's launch probes the storage once, without retries: it would
                        # fail now, so the rerun waits for the endpoint (as a job retry would)
                        event["rerun_waited_for_storage"] = True
                        rerun_pending = True
                elif kind == "node":
                    if add_at is not None:  # the last removal's replacement first: never
                        cluster.add()       # fewer nodes than the elastic minimum needs
                        phase.growths.append(time.time())
                        add_at = None
                    event["injected"] = time.time()
                    event["removed"] = cluster.remove(event["node_id"])
                    if phase.elastic:
                        add_at = time.monotonic() + args.regrow_s
                    else:
                        cluster.add()
                elif kind == "outage":
                    event["injected"] = time.time()
                    if up_at is None:
                        down_at = time.time()
                        endpoint.down()
                        up_at = time.monotonic() + args.outage_s
                phase.events.append(event)
            if up_at is not None and time.monotonic() >= up_at:
                endpoint.up()
                phase.outages.append((down_at, time.time()))
                up_at = None
                if rerun_pending:
                    driver = start_driver(cfg, log_path)
                    phase.driver_starts += 1
                    rerun_pending = False
            if add_at is not None and time.monotonic() >= add_at:
                cluster.add()
                phase.growths.append(time.time())
                add_at = None
            time.sleep(0.05)
    finally:
        if driver.poll() is None:
            kill_driver(driver)
        if up_at is not None:
            endpoint.up()
            phase.outages.append((down_at, time.time()))
        if add_at is not None:
            cluster.add()
    phase.wall_s = time.monotonic() - start
    with open(cfg) as f:
        out = json.load(f)["out"]
    if phase.error is None:
        phase.result = torch.load(out, weights_only=False)
    phase.attempts = read_attempts(plan_dir)


def read_attempts(plan_dir: str) -> list[dict]:
    """Every rank's first step of every attempt (``attempts.jsonl``)."""
    path = os.path.join(plan_dir, "attempts.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- what the phase measured ------------------------------------------------------------------
def measure(phase: Phase, commits: CommitReport) -> None:
    """Recovery and steps redone for each fault, from its injection to the next attempt."""
    attempts = sorted(phase.attempts, key=lambda r: r["time"])
    process_times = sorted(e["injected"] for e in phase.events if e["kind"] in PROCESS_KINDS)
    for event in phase.events:
        t = event["injected"]
        later = [r for r in attempts if r["attempt_start"] > t]
        if event["kind"] == "outage":
            # a restart while the endpoint was away that no process fault explains
            end = t + phase_outage_s(phase, t) + 10
            caused = [r for r in later if r["attempt_start"] < end and
                      not any(t < p < r["attempt_start"] for p in process_times)]
            event["restart"] = bool(caused)
            event["redone"] = event["step"] - caused[0]["step"] if caused else 0
            back = t + phase_outage_s(phase, t)
            after = [s for s, key in commits.seen_at if s > back and f"/{phase.name}/" in key]
            event["recovery_s"] = min(after) - back if after else None
            continue
        if not later:
            event["recovery_s"] = event["redone"] = None
            continue
        first = later[0]
        event["recovery_s"] = first["time"] - t
        event["redone"] = event["step"] - first["step"]
        event["next_world_size"] = first["world_size"]
    for t in phase.growths:
        bigger = [r for r in attempts if r["attempt_start"] > t and
                  r["world_size"] == max(phase.num_workers)]
        if bigger:
            phase.growth_s.append(bigger[0]["time"] - t)


def attempt_starts(attempts: list[dict], spread_s: float = 5.0) -> list[float]:
    """When each attempt began: the ranks of one attempt log within ``spread_s`` of the first."""
    starts: list[float] = []
    for start in sorted(r["attempt_start"] for r in attempts):
        if not starts or start - starts[-1] > spread_s:
            starts.append(start)
    return starts


def unplanned_restarts(phase: Phase) -> int:
    """Attempts that neither a process fault nor a growth explains (a hang diagnosed on a rank
    that was only slow, a restart caused by an outage)."""
    explained = 1 + sum(e["kind"] in PROCESS_KINDS for e in phase.events) + len(phase.growth_s)
    return max(0, len(attempt_starts(phase.attempts)) - explained)


def phase_outage_s(phase: Phase, t: float) -> float:
    for down, up in phase.outages:
        if down - 1 <= t <= up:
            return up - down
    return 0.0


def compare(reference: dict, result: dict) -> tuple[bool, float]:
    """(every tensor equal, max |difference|) of two results' weights."""
    ref, got = reference["state_dict"], result["state_dict"]
    equal = all(torch.equal(v, got[k]) for k, v in ref.items())
    diff = max(float((v - got[k]).abs().max()) for k, v in ref.items())
    return equal, diff


def print_table(phase: Phase) -> None:
    """One row per fault kind: count, recovery median/max, steps redone median/max."""
    print(f"\n### {phase.name}: num_workers={phase.num_workers}, dropout {phase.dropout:g}, "
          f"{len(phase.events)} faults fired of {len(phase.plan)} planned, "
          f"{phase.driver_starts} driver starts, {phase.wall_s:.0f} s\n")
    print("| fault kind | faults | recovery median s | recovery max s | steps redone median "
          "| max |")
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        events = [e for e in phase.events if e["kind"] == kind]
        if not events:
            continue
        times = [e["recovery_s"] for e in events if e.get("recovery_s") is not None]
        redone = [e["redone"] for e in events if e.get("redone") is not None]
        label = kind if kind != "outage" else "outage (to the next commit)"
        med = f"{statistics.median(times):.1f}" if times else "-"
        top = f"{max(times):.1f}" if times else "-"
        rmed = f"{statistics.median(redone):g}" if redone else "-"
        rmax = f"{max(redone)}" if redone else "-"
        print(f"| {label} | {len(events)} | {med} | {top} | {rmed} | {rmax} |")
    if phase.growth_s:
        print(f"\ngrowth back to {max(phase.num_workers)} workers after the replacement node "
              f"came: {len(phase.growth_s)} times, median {statistics.median(phase.growth_s):.1f}"
              f" s, max {max(phase.growth_s):.1f} s")
    waited = sum(bool(e.get("rerun_waited_for_storage")) for e in phase.events)
    print(f"\nattempts: {len(attempt_starts(phase.attempts))}; restarts no planned fault or "
          f"growth explains: {unplanned_restarts(phase)}; driver reruns held back until the "
          f"storage endpoint was back: {waited}")
    if phase.result is not None:
        sizes = phase.result["world_size_history"]
        print(f"world sizes of the last driver: {sizes}")


# --- main -------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=None,
                        help="faults over both phases (50; --quick: 8)")
    parser.add_argument("--elastic-share", type=float, default=0.4,
                        help="share of the faults in the elastic phase")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--every", type=int, default=4, help="checkpoint_every_n_steps")
    parser.add_argument("--hang-timeout-s", type=float, default=10.0)
    parser.add_argument("--outage-s", type=float, default=4.0)
    parser.add_argument("--regrow-s", type=float, default=10.0,
                        help="elastic: the replacement node comes this long after a removal")
    parser.add_argument("--elastic-atol", type=float, default=1e-2)
    parser.add_argument("--phase-timeout-s", type=float, default=2400)
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="bound on the whole invocation: a phase still running then is "
                             "stopped and reported as not finished")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", default="fixed,elastic")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="the fault kinds drawn (all six by default)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 8 faults, 1536 samples, 2 s outages")
    parser.add_argument("--json", default=None, help="write every fault's record here")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.outage_s, args.regrow_s, args.elastic_share = 1536, 2.0, 6.0, 0.5
    if args.faults is None:
        args.faults = 8 if args.quick else 50
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    workers = 4
    steps_total = args.epochs * (args.samples // BATCH // workers)
    rng = random.Random(args.seed)
    kinds = tuple(args.kinds.split(","))
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"--kinds: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")
    names = args.phases.split(",")
    elastic_n = round(args.faults * args.elastic_share) if "elastic" in names else 0
    counts = {"fixed": args.faults - elastic_n, "elastic": elastic_n}
    if "fixed" not in names:
        counts["elastic"] = args.faults
    phases = [Phase(name, [2, workers] if name == "elastic" else workers,
                    0.0 if name == "elastic" else 0.2,
                    make_plan(rng, counts[name], steps_total, workers, name == "elastic",
                              kinds))
              for name in names]
    endpoint = S3Endpoint()  # first: the raylets inherit its AWS variables
    cluster = ChaosCluster(nodes=2, cpus_per_node=2)
    storage = f"s3://{endpoint.bucket}/runs"
    commits = CommitReport()
    stop = threading.Event()
    watcher = threading.Thread(target=watch_commits, daemon=True, args=(
        [f"{storage}/{p.name}" for p in phases], stop, endpoint, commits))
    references: dict[str, tuple[dict, float]] = {}
    deadline = time.monotonic() + (args.deadline_s or float("inf"))
    work = tempfile.mkdtemp(prefix="chaos_mix_")
    print(f"work directory (driver logs, plans): {work}", flush=True)
    try:
        for phase in phases:
            references[phase.name] = run_reference(args, work, cluster, storage, phase)
            print(f"reference {phase.name}: {references[phase.name][1]:.0f} s", flush=True)
        watcher.start()
        for phase in phases:
            print(f"phase {phase.name}: plan (rank, step, kind) {phase.plan}", flush=True)
            left = deadline - time.monotonic()
            run_phase(args, work, cluster, endpoint, storage, phase,
                      min(args.phase_timeout_s, max(left, 60.0)))
            if phase.error is not None:
                with open(os.path.join(work, "drivers.log")) as f:
                    print("".join(f.readlines()[-30:]), flush=True)
            print(f"phase {phase.name}: {phase.wall_s:.0f} s, error {phase.error}", flush=True)
        time.sleep(2)  # the last commits reach the watcher
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(60)
        cluster.shutdown()
        endpoint.shutdown()
    for phase in phases:
        measure(phase, commits)
    if args.json:  # first: the records outlive a mistake in the printing below
        with open(args.json, "w") as f:
            json.dump({p.name: {"plan": p.plan, "events": p.events, "outages": p.outages,
                                "growths": p.growths, "growth_s": p.growth_s,
                                "attempts": p.attempts, "driver_starts": p.driver_starts,
                                "wall_s": p.wall_s, "error": p.error} for p in phases}, f,
                      indent=1)
    failed = False
    print(f"\n{workers} workers (elastic: 2 to 4) on a {1 + 2}-node ray.cluster_utils.Cluster "
          f"(head without CPUs, 2 worker nodes of 2 CPUs), {steps_total} steps a phase, "
          f"checkpoint every {args.every} steps, hang timeout {args.hang_timeout_s:g} s, "
          f"outages {args.outage_s:g} s, run directories on moto S3 behind a proxy")
    for phase in phases:
        print_table(phase)
        fired = len(phase.events)
        missed = [e for e in phase.events if e["kind"] == "node" and not e.get("removed")]
        print(f"faults survived: {fired if phase.result else 0} of {len(phase.plan)} planned"
              f"{'' if not missed else f' ({len(missed)} node removals found no node)'}")
        if phase.result is None:
            print(f"NOT FINISHED: {phase.error}")
            failed = True
            continue
        reference, ref_s = references[phase.name]
        equal, diff = compare(reference, phase.result)
        same_steps = reference["global_step"] == phase.result["global_step"]
        if phase.elastic:
            close = all(torch.allclose(v, phase.result["state_dict"][k], rtol=0,
                                       atol=args.elastic_atol)
                        for k, v in reference["state_dict"].items())
            sizes = sorted({r["world_size"] for r in phase.attempts})
            print(f"final weights vs the uninterrupted elastic run (compared loosely, world sizes "
                  f"{sizes} seen): allclose(atol={args.elastic_atol:g}) {close}, bit-identical "
                  f"{equal}, max |difference| {diff:.2e}; global steps equal {same_steps}")
        else:
            print(f"final weights bit-identical to the uninterrupted run: {equal} (max "
                  f"|difference| {diff:.2e}); global steps equal {same_steps}")
            failed |= not equal
        failed |= fired != len(phase.plan) or not same_steps
        print(f"wall time (s): uninterrupted {ref_s:.0f}, chaos {phase.wall_s:.0f}")
    survived = sum(len(p.events) for p in phases if p.result is not None)
    kinds_seen = Counter(e["kind"] for p in phases for e in p.events)
    print(f"\nfaults survived, both phases: {survived} of {sum(len(p.plan) for p in phases)} "
          f"planned ({', '.join(f'{k} {kinds_seen[k]}' for k in KINDS)})")
    print(f"committed checkpoints loaded while training: {commits.loaded}, unreadable: "
          f"{len(commits.unreadable)}, pruned before read: {commits.pruned_before_read}")
    for line in commits.unreadable:
        print(f"  unreadable: {line}")
    failed |= bool(commits.unreadable)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
