"""Shared fixtures and hooks for the in-process programming-model tests.

The test doubles themselves live in the plain module ``doubles.py`` (``from doubles import X``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from doubles import RecordingLogger

import ray_lit as pl


@pytest.fixture(scope="session", autouse=True)
def _warm_torch_optim() -> None:
    """The first optimizer construction imports torch._dynamo (seconds): pay it once, here,
    so no single test carries it."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


@pytest.fixture
def logger() -> RecordingLogger:
    return RecordingLogger()


@pytest.fixture
def make_trainer(tmp_path) -> Callable[..., pl.Trainer]:
    """``make_trainer(**options)``: a quiet in-process Trainer rooted in ``tmp_path``."""

    def make(**options: Any) -> pl.Trainer:
        defaults = dict(
            max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=str(tmp_path), logger=False,
        )
        defaults.update(options)
        return pl.Trainer(**defaults)

    return make


@pytest.fixture
def fit(make_trainer) -> Callable[..., tuple[pl.Trainer, RecordingLogger]]:
    """``fit(model, **options)``: fits ``model`` with ``make_trainer(**options)``, logging every
    step (unless ``log_every_n_steps`` says otherwise) to a fresh ``RecordingLogger``; returns
    ``(trainer, logger)``."""

    def run(model: pl.LightningModule, **options: Any) -> tuple[pl.Trainer, RecordingLogger]:
        logger = RecordingLogger()
        options.setdefault("log_every_n_steps", 1)
        trainer = make_trainer(logger=logger, **options)
        trainer.fit(model)
        return trainer, logger

    return run
