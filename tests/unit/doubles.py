"""Shared test doubles for the in-process programming-model tests (a plain module: test files
do ``from doubles import X``; importing ``conftest`` by name is fragile, there are two).

``DeterministicModel`` mirrors the idea of the upstream 0.9 fixture (written from scratch): a
bias-free 2x2 linear layer with fixed weights, fed constant rows of ones, so that every output
row is ``[15, 42]`` and the loss of a batch of 3 (``output.sum()``) is exactly ``171``. The
optimizer has ``lr=0`` so the weights (and therefore every number) never change.

``RecordingLogger`` stores every ``log_metrics(metrics, step)`` call the trainer makes;
``AggregatingLogger`` does too but keeps the base class's same-step aggregation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ray_lit as pl
from ray_lit.loggers import Logger

BATCH_LOSS = 171.0  # 3 rows x (15 + 42)


class ConstantDataset(Dataset):
    """``n`` samples ``(x, y)`` with ``x = [1, 1]``; ``y`` is the sample index (float)."""

    def __init__(self, n: int = 12) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(2), torch.tensor(float(idx))


def constant_loader(n: int = 12, batch_size: int = 3, shuffle: bool = False) -> DataLoader:
    return DataLoader(ConstantDataset(n), batch_size=batch_size, shuffle=shuffle)


class DeterministicModel(pl.LightningModule):
    """Every output row is ``[15, 42]``; a batch of ``b`` rows has loss ``57 * b``.

    12 samples, batch size 3 -> 4 batches per epoch, loss 171 per batch. Subclasses override the
    step hooks; ``step(batch)`` returns the loss with its graph.
    """

    def __init__(self, n_train: int = 12, n_val: int = 12, batch_size: int = 3,
                 val_batch_size: int | None = None) -> None:
        super().__init__()
        self.l1 = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.l1.weight.copy_(torch.tensor([[7.0, 8.0], [20.0, 22.0]]))
        self.n_train = n_train
        self.n_val = n_val
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l1(x)

    def step(self, batch: Any) -> torch.Tensor:
        x, _ = batch
        return self(x).sum()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.step(batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return constant_loader(self.n_train, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return constant_loader(self.n_val, self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return constant_loader(self.n_val, self.val_batch_size)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(dict_of_floats, step)``."""

    def __init__(self, name: str = "lightning_logs", version: Any = 0) -> None:
        super().__init__()
        self._name = name
        self._version = version
        self.calls: list[tuple[dict[str, float], int | None]] = []
        self.hparams: list[Any] = []
        self.finalized: list[str] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> Any:
        return self._version

    @property
    def save_dir(self) -> str | None:
        return None

    @property
    def experiment(self) -> Any:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append(({k: float(v) for k, v in metrics.items()}, step))

    # the trainer's dicts are what we pin: no same-step aggregation in between
    def agg_and_log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.log_metrics(metrics, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.append(params)

    def save(self) -> None:
        pass

    def finalize(self, status: str) -> None:
        self.finalized.append(status)

    # --- helpers for assertions ---------------------------------------------------------------
    def dicts(self) -> list[dict[str, float]]:
        return [m for m, _ in self.calls]

    def with_key(self, key: str) -> list[tuple[dict[str, float], int | None]]:
        return [(m, s) for m, s in self.calls if key in m]


class AggregatingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(metrics, step)``, values as given.

    Unlike ``RecordingLogger`` it keeps the base class's ``agg_and_log_metrics``, ``save`` and
    ``finalize`` (same-step aggregation and its flushes), as a logger written for 0.9 does; the
    keyword arguments (e.g. ``agg_key_funcs``) go to ``Logger``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[dict[str, Any], int | None]] = []

    @property
    def name(self) -> str:
        return "aggregating"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class HookRecorder(pl.Callback):
    """Records every callback hook name (both generations) with its arguments."""

    HOOKS = [
        "on_init_start", "on_init_end", "setup", "teardown", "on_fit_start", "on_fit_end",
        "on_pretrain_routine_start", "on_pretrain_routine_end", "on_sanity_check_start",
        "on_sanity_check_end", "on_train_start", "on_train_end", "on_epoch_start",
        "on_epoch_end", "on_train_epoch_start", "on_train_epoch_end", "on_batch_start",
        "on_batch_end", "on_train_batch_start", "on_train_batch_end", "on_before_backward",
        "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
        "on_validation_start", "on_validation_end", "on_validation_epoch_start",
        "on_validation_epoch_end", "on_validation_batch_start", "on_validation_batch_end",
        "on_test_start", "on_test_end", "on_test_epoch_start", "on_test_epoch_end",
        "on_test_batch_start", "on_test_batch_end", "on_save_checkpoint",
    ]

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        for name in self.HOOKS:
            setattr(self, name, self._make(name))

    def _make(self, name: str) -> Callable:
        def hook(*args: Any, **kwargs: Any) -> None:
            # drop trainer / pl_module: keep the event-specific arguments
            rest = args[1:] if name in ("on_init_start", "on_init_end") else args[2:]
            self.calls.append((name, tuple(rest) + tuple(kwargs.values())))
        return hook

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


def assert_subsequence(seq: list[str], expected: list[str]) -> None:
    """``expected`` appears in ``seq`` in this order (other items may sit in between)."""
    it = iter(enumerate(seq))
    positions = []
    for name in expected:
        for pos, item in it:
            if item == name:
                positions.append(pos)
                break
        else:
            raise AssertionError(f"{name!r} missing (in order) after positions {positions}: "
                                 f"expected order {expected}\nactual {seq}")


def floats(metrics: dict[str, Any]) -> dict[str, float]:
    """``metrics`` with every value (tensor or number) as a plain ``float``, for ``==``."""
    return {k: float(v) for k, v in metrics.items()}
