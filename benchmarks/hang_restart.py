"""Hang onset -> diagnosis -> restart -> first step (issue 19's target: the timeout + 10 s).

2 workers, ``worker_hang_timeout_s=10``: rank 1 sleeps in its training step at step 6 of the
first attempt; the driver's "hang diagnosed" and "kept N worker(s)" lines are timed as they are
printed (the second one when the next attempt's group has formed), and each rank of the next
attempt stamps its first step.

    python benchmarks/hang_restart.py
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl

OUT = pathlib.Path(tempfile.mkdtemp())


class HangsOnce(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        marker = OUT / "hung"
        if self.global_rank == 1 and self.global_step == 6 and not marker.exists():
            marker.write_text(str(time.time()))
            time.sleep(600)
        stamp = OUT / f"resumed{self.global_rank}"
        if marker.exists() and not stamp.exists() and not getattr(self, "_seen", False):
            self._seen = True  # this attempt's first step on this rank
            if float(marker.read_text()) + 1 < time.time():
                stamp.write_text(str(time.time()))
        x, y = batch
        time.sleep(0.05)
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Stamped:
    """stdout that notes when the driver's lines of interest are printed."""

    def __init__(self, out) -> None:
        self.out, self.seen = out, {}

    def write(self, text: str) -> int:
        for key in ("hang diagnosed", "kept "):
            if key in text:
                self.seen.setdefault(key, time.time())
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def main() -> None:
    x = torch.randn(256, 4)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    stamped = Stamped(sys.stdout)
    sys.stdout = stamped
    trainer = ray_lit.Trainer(num_workers=2, max_epochs=1, max_failures=1,
                              worker_hang_timeout_s=10, storage_path=str(OUT / "runs"),
                              run_name="hang", logger=False, enable_progress_bar=False,
                              enable_checkpointing=False, checkpoint_every_n_steps=4)
    trainer.fit(HangsOnce(), loader)
    sys.stdout = stamped.out
    onset = float((OUT / "hung").read_text())
    firsts = [float(p.read_text()) for p in OUT.glob("resumed*")]
    kept = stamped.seen.get("kept ")
    print(f"onset->diagnosis {stamped.seen['hang diagnosed'] - onset:.1f} s; "
          f"onset->next group formed {(kept - onset) if kept else float('nan'):.1f} s "
          f"(ranks kept: {kept is not None}); onset->first step {min(firsts) - onset:.1f} s; "
          f"restarts {trainer.num_restarts}")


if __name__ == "__main__":
    main()
