"""A bigger chaos run (issue 19, item 4): many faults of several kinds in ONE run of 4 workers.

Faults, drawn at random: a worker that ``os._exit``s, a worker SIGKILLed, a worker that hangs
(found by ``worker_hang_timeout_s``, its stacks collected), and storage outages (the run's S3
endpoint, a moto server on 127.0.0.1 behind a proxy process, goes away for a few seconds and
comes back; training goes on and the writes are retried). The world size stays fixed, so the
final weights must equal an uninterrupted run's bit for bit; a watcher loads every committed
checkpoint as it appears (through moto directly): none may be unreadable.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/chaos_mix.py --faults 50

``CHAOS_TRACE=/tmp/trace`` makes every rank append ``step loss data-sum weight-sum`` lines to
``/tmp/trace.<chaos run>.<rank>``, to find the first step where a run leaves the reference.

Not in this harness: node removal (``chaos.py`` has no multi-node mode; see
``tests/ray/test_placement_multinode.py`` and ``recovery.py --node-loss``) and a SIGKILLed
driver with a rerun (``tests/ray/test_driver_preemption.py``). Prints one table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid

import cloudpickle
import ray
import torch
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ray"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import watch_commits  # noqa: E402  (every commit loaded as it appears)
from s3_fault_proxy import start_proxy, stop_proxy  # noqa: E402
from storage_outage import _free_port  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

KINDS = ("exit", "sigkill", "hang")


class MixNet(pl.LightningModule):
    """Dropout + Adam + shuffled data; at each planned (rank, step) the rank fails one way."""

    def __init__(self, plan_dir: str = "", plan: list | None = None) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(64, 1))
        self.plan_dir = plan_dir
        self.plan = plan or []

    def training_step(self, batch, batch_idx):
        for i, (rank, step, kind) in enumerate(self.plan):
            marker = os.path.join(self.plan_dir, f"fault-{i}")
            if self.global_rank == rank and self.global_step == step and \
                    not os.path.exists(marker):
                with open(marker, "w") as f:
                    json.dump({"time": time.time(), "step": step, "rank": rank, "kind": kind}, f)
                if kind == "exit":
                    os._exit(1)
                if kind == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)  # "hang": no progress until the driver gives up on it
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if os.environ.get("CHAOS_TRACE"):
            with open(os.environ["CHAOS_TRACE"] + f".{self.plan_dir != ''}.{self.global_rank}",
                      "a") as f:
                f.write(f"{self.global_step} {float(loss):.8f} {float(x.sum()):.6f} "
                        f"{float(self.net[0].weight.sum()):.8f}\n")
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def data(samples: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 16, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].sum(1, keepdim=True)), batch_size=16,
                      shuffle=True)


def fit(storage: str, name: str, model: MixNet, args: argparse.Namespace) -> ray_lit.Trainer:
    pl.seed_everything(7)
    return ray_lit.fit(model, data(args.samples), num_workers=args.workers, max_epochs=args.epochs,
                       storage_path=storage, run_name=name, checkpoint_every_n_steps=args.every,
                       max_failures=-1, worker_hang_timeout_s=args.hang_timeout_s,
                       storage_retry_timeout_s=300, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, enable_checkpointing=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--faults", type=int, default=50)
    parser.add_argument("--outages", type=int, default=5, help="storage outages among faults")
    parser.add_argument("--outage-s", type=float, default=4.0)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--every", type=int, default=4, help="checkpoint_every_n_steps")
    parser.add_argument("--hang-timeout-s", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help="process fault kinds drawn")
    parser.add_argument("--local", action="store_true", help="local storage (no outages)")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    workers = args.workers
    kinds = args.kinds.split(",")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto_port, port = _free_port(), _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    bucket = f"ray-lit-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    proxy = {"proc": start_proxy(port, moto_port)}
    ray.init(address="local", num_cpus=workers + 2, include_dashboard=False,
             log_to_driver=False)
    steps_total = args.epochs * (args.samples // 16 // workers)
    rng = random.Random(args.seed)
    process_faults = args.faults - args.outages
    steps = sorted(rng.sample(range(1, steps_total - 1), process_faults))
    plan = [(rng.randrange(workers), step, rng.choice(kinds)) for step in steps]
    storage = f"s3://{bucket}/runs"
    if args.local:
        storage, args.outages = tempfile.mkdtemp(prefix="chaos_mix_"), 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.monotonic()
            reference = MixNet()
            fit(storage, "reference", reference, args)
            reference_s = time.monotonic() - start

            model = MixNet(plan_dir=tmp, plan=plan)
            report: dict = {"loaded": 0, "pruned_before_read": 0, "unreadable": []}
            stop = threading.Event()
            # through the proxy: during an outage its reads are retried like the run's own
            watcher = threading.Thread(target=watch_commits,
                                       args=(f"{storage}/chaos", stop, report), daemon=True)
            outages: list[tuple[float, float]] = []

            def storage_outages() -> None:
                # spread over the run: the process faults make it last minutes
                for _ in range(args.outages):
                    if stop.wait(rng.uniform(15, 40)):
                        return
                    down = time.time()
                    stop_proxy(proxy["proc"])  # only the pid this script started
                    time.sleep(args.outage_s)
                    proxy["proc"] = start_proxy(port, moto_port)
                    outages.append((down, time.time()))

            chaos = threading.Thread(target=storage_outages, daemon=True)
            watcher.start()
            chaos.start()
            start = time.monotonic()
            trainer = fit(storage, "chaos", model, args)
            chaos_s = time.monotonic() - start
            stop.set()
            chaos.join()
            watcher.join()
            fired = []
            for name in os.listdir(tmp):
                if name.startswith("fault-"):
                    with open(os.path.join(tmp, name)) as f:
                        fired.append(json.load(f))
            fired.sort(key=lambda k: k["time"])
            controller = trainer._controller
            origins = controller.restored_from
            recovery = controller.recovery_times
            by_kind: dict[str, list[float]] = {}
            redone: dict[str, list[int]] = {}
            for fault, seconds, (_, step) in zip(fired, recovery, origins):
                by_kind.setdefault(fault["kind"], []).append(seconds)
                redone.setdefault(fault["kind"], []).append(fault["step"] - step)
            identical = all(torch.equal(v, model.state_dict()[k])
                            for k, v in reference.state_dict().items())
            max_diff = max(float((v - model.state_dict()[k]).abs().max())
                           for k, v in reference.state_dict().items())
    finally:
        ray.shutdown()
        stop_proxy(proxy["proc"])
        server.stop()
    survived = len(fired) + len(outages)
    print(f"plan (rank, step, kind): {plan}; restored from {origins}")
    print(f"\n{workers} workers, fixed size, {steps_total} steps, checkpoint every "
          f"{args.every} steps, hang timeout {args.hang_timeout_s:g} s, storage on moto S3 "
          "behind a proxy\n")
    print("| fault kind | faults | recovery median s | recovery max s | steps redone "
          "median | max |")
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        times, steps_back = by_kind.get(kind, []), redone.get(kind, [])
        if times:
            print(f"| {kind} | {len(times)} | {statistics.median(times):.1f} | "
                  f"{max(times):.1f} | {statistics.median(steps_back):g} | {max(steps_back)} |")
    print(f"| storage outage ({args.outage_s:g} s) | {len(outages)} | no restart | | | |")
    print(f"\nfaults survived: {survived} of {args.faults} planned ({len(fired)} process "
          f"faults fired of {len(plan)}, {len(outages)} outages); restarts "
          f"{trainer.num_restarts}")
    print(f"committed checkpoints loaded while training: {report['loaded']}, unreadable: "
          f"{len(report['unreadable'])}, pruned before read: {report['pruned_before_read']}")
    print(f"final weights identical to the uninterrupted run: {identical} (max |difference| "
          f"{max_diff:.2e})")
    print(f"wall time (s): uninterrupted {reference_s:.1f}, chaos {chaos_s:.1f}")
    if report["unreadable"] or len(fired) != len(plan):
        sys.exit(1)


if __name__ == "__main__":
    main()
