"""Ray Data as a training source: ray_lit's ``RayDataLoader`` against Ray Train's
``TorchTrainer`` + ``get_dataset_shard`` on the same parquet data, preprocessing and workers.

A parquet data set several times larger than the driver should hold (``--gb``, default 2) is
generated once on local disk (float32 features, 1 KiB a row), read with
``ray.data.read_parquet`` and preprocessed on the cluster's CPUs (``map_batches``: standardise,
derive the label). Each framework trains a small MLP with DDP on ``--workers`` workers for one
epoch, each run in its own process so its driver's peak memory (``ru_maxrss``) is its own.
Reported: rows/s from each rank's first to its last step (steady throughput), the whole call's
wall time (including start-up), and the driver's peak RSS.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/ray_data.py [--gb 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FEATURES = 256
ROW_BYTES = FEATURES * 4
BATCH = 1024


def generate(path: str, gb: float) -> int:
    """Write ``gb`` GiB of parquet files under ``path`` (once); returns the row count."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = int(gb * 2**30 / ROW_BYTES)
    marker = os.path.join(path, f"_rows_{rows}")
    if os.path.exists(marker):
        return rows
    os.makedirs(path, exist_ok=True)
    per_file = 65536
    rng = np.random.default_rng(0)
    for index, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        x = rng.standard_normal((n, FEATURES), dtype=np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), FEATURES)
        table = pa.table({"id": pa.array(np.arange(start, start + n)), "x": column})
        pq.write_table(table, os.path.join(path, f"part-{index:05d}.parquet"))
    open(marker, "w").close()
    return rows


def preprocess(batch: dict) -> dict:
    """CPU preprocessing on the cluster: fixed-size lists -> a matrix, standardise, label."""
    import numpy as np

    x = np.stack(batch["x"]).astype(np.float32) if batch["x"].dtype == object else batch["x"]
    x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-6)
    return {"x": x, "y": x[:, :8].sum(axis=1, keepdims=True)}


def _dataset(path: str):
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray.data.read_parquet(path).map_batches(preprocess, batch_format="numpy")


def _mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 1))


def run_ray_lit(path: str, workers: int, stamps: str) -> None:
    import torch

    import ray_lit as pl
    from ray_lit.data import RayDataLoader

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()
            self.first = None

        def training_step(self, batch, batch_idx):
            now = time.time()
            if self.first is None:
                self.first = now
            self.rows = getattr(self, "rows", 0) + len(batch["x"])
            self.last = now
            return torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"])

        def on_train_end(self):
            with open(stamps, "a") as f:
                f.write(json.dumps([self.first, self.last, self.rows]) + "\n")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pl.fit(Model(), RayDataLoader(_dataset(path), batch_size=BATCH, prefetch_batches=2),
           num_workers=workers, max_epochs=1, logger=False, enable_progress_bar=False,
           enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
           storage_path=tempfile.mkdtemp(), checkpoint_every_n_steps=None)


def run_ray_train(path: str, workers: int, stamps: str) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import torch

        model = ray.train.torch.prepare_model(_mlp())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        shard = ray.train.get_dataset_shard("train")
        first, last, rows = None, None, 0
        for batch in shard.iter_torch_batches(batch_size=BATCH, prefetch_batches=2):
            now = time.time()
            first = first or now
            loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rows += len(batch["x"])
            last = now
        with open(config["stamps"], "a") as f:
            f.write(json.dumps([first, last, rows]) + "\n")

    TorchTrainer(loop, train_loop_config={"stamps": stamps},
                 scaling_config=ScalingConfig(num_workers=workers),
                 run_config=RunConfig(storage_path=tempfile.mkdtemp()),
                 datasets={"train": _dataset(path)}).fit()


def child(framework: str, path: str, workers: int, stamps: str) -> None:
    import ray

    ray.init(address="local", num_cpus=workers + 2, include_dashboard=False,
             log_to_driver=False)
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start = time.time()
    (run_ray_lit if framework == "ray_lit" else run_ray_train)(path, workers, stamps)
    wall = time.time() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "driver_peak_mib": peak_mib}))


def measure(framework: str, path: str, workers: int) -> dict:
    stamps = tempfile.mktemp(suffix=".jsonl")
    out = subprocess.run([sys.executable, __file__, "--child", framework, "--path", path,
                          "--workers", str(workers), "--stamps", stamps],
                         capture_output=True, text=True, check=True)
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    with open(stamps) as f:
        ranks = [json.loads(line) for line in f.read().splitlines()]
    first = min(r[0] for r in ranks)
    last = max(r[1] for r in ranks)
    rows = sum(r[2] for r in ranks)
    result.update(rows=rows, rows_per_s=rows / max(last - first, 1e-9))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--path", default=os.path.join(tempfile.gettempdir(), "ray_lit_bench_pq"))
    parser.add_argument("--child", choices=["ray_lit", "ray_train"])
    parser.add_argument("--stamps")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.workers, args.stamps)
        return
    path = f"{args.path}_{args.gb:g}gb"
    start = time.time()
    rows = generate(path, args.gb)
    print(f"data: {rows} rows, {args.gb:g} GiB of parquet at {path} "
          f"(ready in {time.time() - start:.0f} s); {args.workers} workers, batch {BATCH}")
    print(f"{'framework':<12} {'run':>3} {'rows/s':>10} {'wall s':>8} {'driver peak MiB':>16} "
          f"{'rows':>9}")
    for run in range(args.repeat):
        for framework in ("ray_lit", "ray_train"):
            r = measure(framework, path, args.workers)
            print(f"{framework:<12} {run:>3} {r['rows_per_s']:>10.0f} {r['wall_s']:>8.1f} "
                  f"{r['driver_peak_mib']:>16.0f} {r['rows']:>9}", flush=True)


if __name__ == "__main__":
    main()
