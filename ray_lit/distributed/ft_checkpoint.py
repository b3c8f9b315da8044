"""Worker side of fault-tolerance checkpoints: when to take one, and the asynchronous write.

Every rank takes a checkpoint at the same step boundary (the conditions depend only on counters
every rank shares, so no collective is needed to agree): every ``every_n_steps`` optimizer
steps, at each epoch end, when the driver asks for one before a planned stop (preemption), and
at the end of fit. The state is copied to host memory at that boundary (the only stall), then a
background thread serialises and writes this rank's part while training goes on; at most one
write is in flight. The driver commits the checkpoint once every rank confirmed its part.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ray_lit.checkpoint.manager import checkpoint_name, part_name


class PreemptedExit(Exception):
    """Raised in the loop after the checkpoint the driver asked for is written."""


def to_host(obj: Any) -> Any:
    """A deep copy with every tensor cloned to CPU (training may change the originals)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, to_host(v)) for k, v in obj.items()) if type(obj) is not dict \
            else {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_host(v) for v in obj)
    return obj


class CheckpointWriter:
    """Shipped to every worker with the job; ``attach`` binds it to the worker and its rank."""

    def __init__(self, run_uri: str, every_n_steps: int | None, asynchronous: bool = True
                 ) -> None:
        self.run_uri = run_uri.rstrip("/")
        self.every_n_steps = every_n_steps
        self.asynchronous = asynchronous
        self._worker: Any = None
        self._rank = 0
        self._world_size = 1
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last_step_taken = -1
        self._last_name: str | None = None
        self.stall_s: list[float] = []

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_worker"] = state["_thread"] = None
        return state

    def attach(self, worker: Any, ranks: Any) -> None:
        self._worker = worker
        self._rank = ranks.world_rank
        self._world_size = ranks.world_size

    # --- when -----------------------------------------------------------------------------------
    def after_train_step(self, trainer: Any, is_last: bool) -> None:
        step = trainer.global_step
        stop_at = getattr(self._worker, "stop_at_step", None)
        if stop_at is not None and step >= stop_at:
            self.take(trainer, tag="preempt")
            self.wait()
            raise PreemptedExit(f"checkpoint at step {step} written; stopping as asked")
        if is_last or not self.every_n_steps or step == self._last_step_taken:
            return
        if step > 0 and step % self.every_n_steps == 0:
            self.take(trainer)

    def after_epoch(self, trainer: Any) -> None:
        self.take(trainer)

    def finish(self, trainer: Any) -> None:
        if trainer.global_step != self._last_step_taken:
            self.take(trainer)
        self.wait()

    # --- what -----------------------------------------------------------------------------------
    def take(self, trainer: Any, tag: str = "") -> None:
        """Copy this rank's state to host memory now; write it in the background."""
        import time

        from ray_lit.core.seed import rng_state
        from ray_lit.loop.checkpoint_state import dump_checkpoint

        self.wait()  # at most one write in flight
        start = time.perf_counter()
        progress = trainer._progress
        if self._rank == 0:
            state = dump_checkpoint(trainer)
        else:
            state = {"loops": {"progress": progress.state_dict(), "rng": rng_state(),
                               "sampler": trainer._host.sampler_state(progress.batches_done),
                               "world_size": self._world_size}}
            if progress.batches_done >= trainer.num_training_batches:
                state["loops"]["progress"]["epoch_finished"] = True
        state = to_host(state)
        self.stall_s.append(time.perf_counter() - start)
        name = checkpoint_name(progress.global_step, progress.epoch, tag)
        meta = {"global_step": progress.global_step, "epoch": progress.epoch}
        self._last_step_taken = progress.global_step
        self._last_name = name
        uri = f"{self.run_uri}/checkpoints/{name}/{part_name(self._rank)}"
        if self.asynchronous:
            self._thread = threading.Thread(target=self._write, args=(state, uri, name, meta),
                                            daemon=True, name="ray_lit-ckpt-writer")
            self._thread.start()
        else:
            self._write(state, uri, name, meta)
        if self._error is not None:
            raise self._error

    def _write(self, state: dict[str, Any], uri: str, name: str, meta: dict[str, Any]) -> None:
        from ray_lit.checkpoint.io import save_checkpoint

        try:
            save_checkpoint(state, uri)
        except BaseException as err:  # surfaced on the loop thread at the next take/wait
            self._error = err
            return
        if self._worker is not None:
            self._worker.outbox.append(("checkpoint", name, self._rank, self._world_size, meta))

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
