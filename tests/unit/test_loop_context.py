"""The loops, the checkpoint code and the worker's job take a ``LoopContext`` (issue 18, slice 5).

What a stage runs with is one typed object; the Trainer is the facade the user's hooks receive.
These tests pin that: the loop code reads no private name of the Trainer, the context's
back-reference does not keep a dropped Trainer alive, and a pickled context rebinds.
"""

from __future__ import annotations

import ast
import gc
import pathlib
import pickle
import weakref

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
from ray_lit.loop.context import LoopContext

PACKAGE = pathlib.Path(ray_lit.__file__).parent
# the code that runs a stage: every loop module (less the Trainer's own base class and the
# context itself), the checkpoint writer and the worker's job
STAGE_CODE = sorted(p for p in (PACKAGE / "loop").glob("*.py")
                    if p.name not in ("context.py", "trainer_state.py"))
STAGE_CODE += [PACKAGE / "checkpoint" / "writer.py", PACKAGE / "worker" / "job.py"]


def _private_trainer_names(path: pathlib.Path) -> list[str]:
    """``trainer._x`` / ``self.trainer._x`` reads and writes in ``path`` (``_ctx`` excepted:
    the job takes the context from the Trainer it builds)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__") or node.attr == "_ctx":
            continue
        owner = node.value
        named_trainer = (isinstance(owner, ast.Name) and owner.id == "trainer") or (
            isinstance(owner, ast.Attribute) and owner.attr == "trainer")
        if named_trainer:
            found.append(f"{path.name}:{node.lineno} trainer.{node.attr}")
    return found


@pytest.mark.parametrize("path", STAGE_CODE, ids=lambda p: p.name)
def test_stage_code_reads_the_context_not_the_trainers_private_names(path) -> None:
    assert _private_trainer_names(path) == []


def test_the_scan_sees_a_private_name(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f(trainer, self):\n    trainer._hooks.x()\n    self.trainer._sink = 1\n")
    assert sorted(_private_trainer_names(probe)) == ["probe.py:2 trainer._hooks",
                                                     "probe.py:3 trainer._sink"]


class _Tiny(ray_lit.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)


def _fit(tmp_path) -> ray_lit.Trainer:
    trainer = ray_lit.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(_Tiny())
    return trainer


def test_a_fitted_trainers_context_holds_the_run_and_names_the_trainer(tmp_path) -> None:
    trainer = _fit(tmp_path)
    ctx = trainer._ctx
    assert isinstance(ctx, LoopContext) and ctx.trainer is trainer
    assert ctx.progress.global_step == 2 == trainer.global_step
    assert ctx.config is trainer.config and ctx.host is not None
    assert ctx.beats == 2  # two batches started
    # the Trainer's private names are views of the context's fields, both ways
    assert trainer._progress is ctx.progress
    trainer._val_check_batch = 3
    assert ctx.val_check_batch == 3


def test_a_dropped_trainer_is_freed(tmp_path) -> None:
    """Nothing but the Trainer's own cycles (its module, its context, its hook dispatcher)
    holds a fitted Trainer or its module: once dropped they are collected (their parameters
    with them), which also releases a kept worker group (``weakref.finalize`` in
    ``driver/launch.py``)."""
    trainer = _fit(tmp_path)
    ref, module_ref = weakref.ref(trainer), weakref.ref(trainer.lightning_module)
    del trainer
    for _ in range(3):  # a finalizer may free more on the next pass
        gc.collect()
    # (a cache of hook signatures keyed on bound methods held both, run after run)
    holders = [type(r).__qualname__ for r in gc.get_referrers(ref())] if ref() else []
    assert ref() is None and module_ref() is None, holders


def test_a_new_trainer_gets_its_own_context(tmp_path) -> None:
    first = _fit(tmp_path)
    second = ray_lit.Trainer(logger=False, enable_progress_bar=False)
    assert second._ctx.trainer is second and second._ctx is not first._ctx
    assert second._ctx.progress.global_step == 0 and second._ctx.beats == 0
    copy = pickle.loads(pickle.dumps(first._ctx))  # the Trainer travels with its context
    assert copy.trainer._ctx is copy and copy.progress.global_step == 2
