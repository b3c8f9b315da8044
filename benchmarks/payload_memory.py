"""Peak memory of a worker when the data set is built on the driver and ships with the module.

Users often build a ``TensorDataset`` on the driver and hand its ``DataLoader`` to
``ray_lit.fit``: the tensors then travel inside the pickled payload. This script trains a
linear model for a few steps on 2 workers with such a data set of ``--mib`` MiB and prints each
worker's peak RSS (``VmHWM``), its RSS during training and the part of it that is the object
store's shared memory, next to the same run with a data set that each worker builds itself
(nothing in the payload)::

    python benchmarks/payload_memory.py            # 98 MiB of data (32,768 x 784 float32)
    python benchmarks/payload_memory.py --mib 400
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import cloudpickle
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray, on loopback

import ray_lit  # noqa: E402

FEATURES = 784


def _memory() -> dict[str, float]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS", "RssShmem")}


class LazyData(Dataset):
    """The same tensors, generated in the worker on first use (the payload carries no data)."""

    def __init__(self, rows: int) -> None:
        self.rows, self.x, self.y = rows, None, None

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int):
        if self.x is None:
            self.x, self.y = torch.randn(self.rows, FEATURES), torch.randint(0, 10, (self.rows,))
        return self.x[i], self.y[i]


class Probe(ray_lit.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.net = torch.nn.Linear(FEATURES, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 3:
            path = os.path.join(self.out_dir, f"rank{self.global_rank}.json")
            with open(path, "w") as f:
                json.dump(_memory(), f)
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _run(dataset: Dataset, workers: int) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as out:
        ray_lit.fit(Probe(out), DataLoader(dataset, batch_size=64), num_workers=workers,
                    max_epochs=1, limit_train_batches=5, enable_progress_bar=False, logger=False,
                    enable_checkpointing=False, enable_model_summary=False,
                    default_root_dir=out)
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(workers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=98.0, help="size of the data set")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    import ray

    rows = int(args.mib * 2**20 / (FEATURES * 4))
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False,
             log_to_driver=False)
    eager = TensorDataset(torch.randn(rows, FEATURES), torch.randint(0, 10, (rows,)))
    print(f"{rows} x {FEATURES} float32 = {rows * FEATURES * 4 / 2**20:.0f} MiB, "
          f"{args.workers} workers")
    print("| data set | peak RSS MiB/worker | RSS in training | of which object store |")
    print("|---|---|---|---|")
    for label, dataset in (("built by each worker", LazyData(rows)),
                           ("built on the driver, in the payload", eager)):
        ranks = _run(dataset, args.workers)
        cells = [" / ".join(f"{r[key]:.0f}" for r in ranks)
                 for key in ("VmHWM", "VmRSS", "RssShmem")]
        print(f"| {label} | {' | '.join(cells)} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
