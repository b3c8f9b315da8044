"""Storage outage (issue 19, item 3): the S3 endpoint of a 2-worker run goes away for ~30 s
mid-run and comes back. Measures steps lost, corrupt committed checkpoints, how long training
stalled, and the time from the endpoint's return to the next commit.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/storage_outage.py --outage-s 30

The run's storage is a moto S3 server on 127.0.0.1 reached through a proxy process
(``tests/ray/s3_fault_proxy.py``); the outage is that proxy SIGKILLed (refused connections,
uploads cut mid-body) and started again. A reference run without an outage gives the wall time
and the final weights to compare with. Prints a table.
"""

from __future__ import annotations

import argparse
import os
import socket
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
from ray_lit.checkpoint.manager import CheckpointManager
from ray_lit.storage.checkpoint_io import load_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ray"))
from s3_fault_proxy import start_proxy, stop_proxy  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class OutageNet(pl.LightningModule):
    """A small MLP; rank 0 appends each step it runs to ``step_log`` (steps redone show up)."""

    def __init__(self, step_log: str = "", step_sleep: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 1))
        self.step_log = step_log
        self.step_sleep = step_sleep

    def training_step(self, batch, batch_idx):
        if self.step_log and self.global_rank == 0:
            with open(self.step_log, "a") as f:
                f.write(f"{self.global_step} {time.time()}\n")
        time.sleep(self.step_sleep)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def data(samples: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 16, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].sum(1, keepdim=True)), batch_size=8,
                      shuffle=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit(storage: str, name: str, model: OutageNet, args: argparse.Namespace) -> ray_lit.Trainer:
    pl.seed_everything(7)
    return ray_lit.fit(model, data(args.samples), num_workers=2, max_epochs=1,
                       storage_path=storage, run_name=name,
                       checkpoint_every_n_steps=args.every, keep_checkpoints=1000,
                       storage_retry_timeout_s=args.retry_timeout_s, max_failures=3,
                       logger=False, enable_progress_bar=False, enable_model_summary=False,
                       enable_checkpointing=False)


def watch_manifests(client, bucket: str, prefix: str, stop: threading.Event,
                    seen: dict) -> None:
    """First time each manifest is seen, read from moto directly (not through the proxy)."""
    while not stop.is_set():
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                if item["Key"].endswith("manifest.json"):
                    seen.setdefault(item["Key"], time.time())
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--outage-at-s", type=float, default=10.0,
                        help="seconds into the run when the endpoint goes away")
    parser.add_argument("--samples", type=int, default=12800, help="800 steps on 2 workers")
    parser.add_argument("--every", type=int, default=20, help="checkpoint_every_n_steps")
    parser.add_argument("--retry-timeout-s", type=float, default=300.0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    moto_port, port = _free_port(), _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}",
                          region_name="us-east-1")
    bucket = f"ray-lit-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    proxy = {"proc": start_proxy(port, moto_port)}
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.monotonic()
            reference = OutageNet()
            fit(f"s3://{bucket}/runs", "reference", reference, args)
            reference_s = time.monotonic() - start

            step_log = os.path.join(tmp, "steps.txt")
            model = OutageNet(step_log=step_log)
            seen: dict[str, float] = {}
            stop = threading.Event()
            watcher = threading.Thread(target=watch_manifests, daemon=True, args=(
                client, bucket, "runs/outage/", stop, seen))
            watcher.start()
            window: dict[str, float] = {}

            def outage() -> None:
                time.sleep(args.outage_at_s)
                window["down"] = time.time()
                stop_proxy(proxy["proc"])  # only the pid this script started
                time.sleep(args.outage_s)
                proxy["proc"] = start_proxy(port, moto_port)
                window["up"] = time.time()

            chaos = threading.Thread(target=outage, daemon=True)
            chaos.start()
            start = time.monotonic()
            trainer = fit(f"s3://{bucket}/runs", "outage", model, args)
            outage_run_s = time.monotonic() - start
            chaos.join()
            stop.set()
            watcher.join()

            with open(step_log) as f:
                steps = [(int(s), float(t)) for s, t in (line.split() for line in f)]
            run_uri = f"s3://{bucket}/runs/outage"
            committed = CheckpointManager(run_uri).committed()
            corrupt = 0
            for checkpoint in committed:
                for rank in range(checkpoint.world_size):
                    try:
                        load_checkpoint(checkpoint.part_uri(rank))
                    except Exception:  # an unreadable committed checkpoint
                        corrupt += 1
            down, up = window["down"], window["up"]
            during = [t for s, t in steps if down <= t <= up]
            gaps = [b[1] - a[1] for a, b in zip(steps, steps[1:])]
            after = sorted(t for t in seen.values() if t > up)
            during_commits = [t for t in seen.values() if down < t < up]
            same = all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                         model.state_dict().values()))
            rows = [
                ("outage (endpoint down)", f"{up - down:.1f} s"),
                ("steps run while storage was down", f"{len(during)}"),
                ("longest pause between two steps", f"{max(gaps):.2f} s"),
                ("steps lost (run - final global_step)", f"{len(steps) - trainer.global_step}"),
                ("restarts", f"{trainer.num_restarts}"),
                ("checkpoints committed during the outage", f"{len(during_commits)}"),
                ("committed checkpoints", f"{len(committed)}"),
                ("corrupt committed checkpoint parts", f"{corrupt}"),
                ("endpoint back -> next commit", f"{after[0] - up:.1f} s" if after else "none"),
                ("final checkpoint committed",
                 f"{committed[-1].global_step == trainer.global_step}"),
                ("final weights == run without outage", f"{same}"),
                ("wall time: no outage / outage",
                 f"{reference_s:.1f} s / {outage_run_s:.1f} s"),
            ]
            width = max(len(k) for k, _ in rows)
            print(f"\n| {'storage outage, 2 CPU workers, S3 (moto)':<{width}} | value |")
            print(f"|{'-' * (width + 2)}|-------|")
            for key, value in rows:
                print(f"| {key:<{width}} | {value} |")
    finally:
        ray.shutdown()
        stop_proxy(proxy["proc"])
        server.stop()


if __name__ == "__main__":
    main()
