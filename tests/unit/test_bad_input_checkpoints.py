"""Corrupted, truncated and foreign checkpoints and manifests (issue 19 item 5).

Every bad file is refused with a ``MisconfigurationException`` naming it and the fix, on each
way in: ``load_from_checkpoint``, ``Trainer.fit(ckpt_path=...)`` in process, ``Trainer(resume=
path)`` on Ray workers (refused on the driver: no worker starts), and ``validate(ckpt_path=)``.
A bad manifest is never read: "latest" falls back to the previous committed checkpoint and a
warning says why. A module whose ``__init__`` needs arguments it did not save is told which
ones and how to pass them.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.checkpoint.layout import checkpoint_name, part_uri
from ray_lit.checkpoint.manager import CheckpointManager
from ray_lit.core.saving import CheckpointMismatchError
from ray_lit.storage.checkpoint_io import CheckpointLoadError, load_checkpoint, save_checkpoint


def _loader() -> DataLoader:
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class Small(pl.LightningModule):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(2, width)
        self.head = nn.Linear(width, 1)
        self.steps = 0

    def forward(self, x):
        return self.head(self.layer(x))

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Other(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 3)


class Evil:
    """Unpickling this would run a shell command (it must never happen)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _trainer(tmp_path, **options) -> pl.Trainer:
    options = {"max_epochs": 1, "logger": False, "enable_progress_bar": False,
               "enable_model_summary": False, "enable_checkpointing": False,
               "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path), **options}
    return pl.Trainer(**options)


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory) -> str:
    """A full checkpoint of ``Small`` (model, optimizer, loops), written by a Trainer."""
    root = tmp_path_factory.mktemp("full")
    trainer = _trainer(root)
    trainer.fit(Small(), _loader())
    path = str(root / "small.ckpt")
    trainer.save_checkpoint(path)
    return path


# kind -> (how to write the bad file from the full checkpoint, what the message says)
def _random_bytes(path, full):
    path.write_bytes(random.Random(0).randbytes(4096))


def _truncated(path, full):
    data = pathlib.Path(full).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path, full):
    path.write_bytes(b"")


def _bare_state_dict(path, full):
    torch.save(Small().state_dict(), str(path))


def _another_model(path, full):
    checkpoint = load_checkpoint(full)
    checkpoint["state_dict"] = Other().state_dict()
    save_checkpoint(checkpoint, str(path))


def _evil_torch(path, full):
    torch.save({"state_dict": {}, "x": Evil(str(path) + ".ran")}, str(path))


def _evil_pickle(path, full):
    path.write_bytes(pickle.dumps({"state_dict": Evil(str(path) + ".ran")}, protocol=2))


def _not_a_dict(path, full):
    torch.save([1, 2, 3], str(path))


BAD_FILES = {
    "random_bytes": (_random_bytes, CheckpointLoadError, "truncated or corrupt"),
    "truncated": (_truncated, CheckpointLoadError, "truncated or corrupt"),
    "empty": (_empty, CheckpointLoadError, "truncated or corrupt"),
    "bare_state_dict": (_bare_state_dict, pl.MisconfigurationException, "bare state_dict"),
    "another_model": (_another_model, CheckpointMismatchError, "does not fit Small"),
    "evil_torch": (_evil_torch, CheckpointLoadError, "refuses to run code"),
    "evil_pickle": (_evil_pickle, CheckpointLoadError, "refuses to run code"),
    "not_a_dict": (_not_a_dict, pl.MisconfigurationException, "not a model checkpoint"),
}


@pytest.fixture(params=sorted(BAD_FILES))
def bad_file(request, tmp_path, full_checkpoint):
    write, error, words = BAD_FILES[request.param]
    path = tmp_path / f"{request.param}.ckpt"
    write(path, full_checkpoint)
    yield str(path), error, words
    assert not os.path.exists(str(path) + ".ran")  # no code from the file ever ran


def test_load_from_checkpoint_refuses_it(bad_file) -> None:
    path, error, words = bad_file
    with pytest.raises(error, match=words) as info:
        Small.load_from_checkpoint(path)
    assert path in str(info.value)


def test_fit_in_process_refuses_it_before_a_step(bad_file, tmp_path) -> None:
    path, error, words = bad_file
    model = Small()
    with pytest.raises(error, match=words):
        _trainer(tmp_path).fit(model, _loader(), ckpt_path=path)
    assert model.steps == 0


def test_resume_on_ray_workers_refuses_it_before_any_worker_starts(bad_file, tmp_path,
                                                                    monkeypatch) -> None:
    path, error, words = bad_file

    def no_workers(*args, **kwargs):
        raise AssertionError("the bad checkpoint reached the worker launch")

    monkeypatch.setattr("ray_lit.driver.launch.launch_fit", no_workers)
    with pytest.raises(error, match=words):
        _trainer(tmp_path, num_workers=2, resume=path,
                 storage_path=str(tmp_path / "runs")).fit(Small(), _loader())


def test_validate_refuses_it(bad_file, tmp_path) -> None:
    path, error, words = bad_file
    with pytest.raises(error, match=words):
        _trainer(tmp_path).validate(Small(), _loader(), ckpt_path=path, verbose=False)


def test_the_good_checkpoint_still_loads_and_resumes(full_checkpoint, tmp_path) -> None:
    loaded = Small.load_from_checkpoint(full_checkpoint)
    assert loaded.layer.out_features == 4
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(Small(), _loader(), ckpt_path=full_checkpoint)
    assert trainer.global_step == 4  # 2 steps restored, 2 more


class Renames(Small):
    """Loads checkpoints of an older version whose first layer was called ``old_layer``."""

    def on_load_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k.replace("old_layer.", "layer."): v
                                    for k, v in checkpoint["state_dict"].items()}


def test_keys_a_module_renames_on_load_are_not_refused(full_checkpoint, tmp_path) -> None:
    checkpoint = load_checkpoint(full_checkpoint)
    checkpoint["state_dict"] = {k.replace("layer.", "old_layer.") if k.startswith("layer.")
                                else k: v for k, v in checkpoint["state_dict"].items()}
    path = str(tmp_path / "old_names.ckpt")
    save_checkpoint(checkpoint, path)
    with pytest.raises(CheckpointMismatchError, match="old_layer.weight"):
        _trainer(tmp_path).fit(Small(), _loader(), ckpt_path=path)
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(Renames(), _loader(), ckpt_path=path)
    assert trainer.global_step == 4


def test_strict_false_loads_what_fits(full_checkpoint, tmp_path) -> None:
    checkpoint = load_checkpoint(full_checkpoint)
    del checkpoint["state_dict"]["head.bias"]
    path = str(tmp_path / "partial.ckpt")
    save_checkpoint(checkpoint, path)
    with pytest.raises(CheckpointMismatchError, match="head.bias"):
        Small.load_from_checkpoint(path)
    loaded = Small.load_from_checkpoint(path, strict=False)
    assert torch.equal(loaded.layer.weight, checkpoint["state_dict"]["layer.weight"])


def test_a_weights_only_checkpoint_cannot_resume_on_workers(full_checkpoint, tmp_path,
                                                            monkeypatch) -> None:
    checkpoint = load_checkpoint(full_checkpoint)
    weights_only = {k: v for k, v in checkpoint.items()
                    if k not in ("optimizer_states", "lr_schedulers")}
    path = str(tmp_path / "weights.ckpt")
    save_checkpoint(weights_only, path)
    monkeypatch.setattr("ray_lit.driver.launch.launch_fit", lambda *a, **k: 1 / 0)
    with pytest.raises(pl.MisconfigurationException, match="only the model"):
        _trainer(tmp_path, num_workers=2, storage_path=str(tmp_path / "r")).fit(
            Small(), _loader(), ckpt_path=path)


# --- a run directory where a checkpoint file is expected -----------------------------------
def _committed_run(root, full_checkpoint, steps=(2, 4), fence="f") -> CheckpointManager:
    """A run directory with committed fault-tolerance checkpoints of 2 ranks each."""
    manager = CheckpointManager(str(root))
    checkpoint = load_checkpoint(full_checkpoint)
    for step in steps:
        name = checkpoint_name(step, 0)
        for rank in (0, 1):
            save_checkpoint(dict(checkpoint, global_step=step),
                            part_uri(str(root), name, rank, fence))
        manager.confirm(name, 1, 2, {"global_step": step, "epoch": 0}, fence)
        assert manager.confirm(name, 0, 2, {"global_step": step, "epoch": 0}, fence)
    return manager


def test_a_run_directory_says_how_to_continue_the_run(full_checkpoint, tmp_path,
                                                      monkeypatch) -> None:
    run = tmp_path / "runs" / "exp1"
    _committed_run(run, full_checkpoint)
    with pytest.raises(CheckpointLoadError, match="run directory") as info:
        Small.load_from_checkpoint(str(run))
    assert f"storage_path={str(tmp_path / 'runs')!r}" in str(info.value)
    assert "run_name='exp1'" in str(info.value)
    monkeypatch.setattr("ray_lit.driver.launch.launch_fit", lambda *a, **k: 1 / 0)
    with pytest.raises(CheckpointLoadError, match="run_name='exp1'"):
        _trainer(tmp_path, num_workers=2, resume=str(run),
                 storage_path=str(tmp_path / "other")).fit(Small(), _loader())


def test_one_fault_tolerance_checkpoint_directory_names_its_rank_0_part(full_checkpoint,
                                                                         tmp_path) -> None:
    run = tmp_path / "run"
    _committed_run(run, full_checkpoint, steps=(2,))
    directory = run / "checkpoints" / checkpoint_name(2, 0)
    with pytest.raises(CheckpointLoadError, match="rank_0-f.pt") as info:
        Small.load_from_checkpoint(str(directory))
    part = str(info.value).split("Pass its rank 0 part, ")[1].split(", or")[0]
    assert Small.load_from_checkpoint(part).layer.out_features == 4  # the hint works


# --- manifests ----------------------------------------------------------------------------
def _manifest(run, step: int):
    return run / "checkpoints" / checkpoint_name(step, 0) / "manifest.json"


def _truncate(run, step):
    path = _manifest(run, step)
    path.write_text(path.read_text()[:20])


def _garbage_step(run, step):
    path = _manifest(run, step)
    manifest = json.loads(path.read_text())
    manifest["global_step"] = "many"
    path.write_text(json.dumps(manifest))


def _missing_part(run, step):
    os.remove(run / "checkpoints" / checkpoint_name(step, 0) / "rank_1-f.pt")


def _another_runs_fence(run, step):
    # a manifest naming parts another run's attempt wrote (copied in, or a stale listing)
    path = _manifest(run, step)
    manifest = json.loads(path.read_text())
    manifest["parts"] = ["rank_0-zz9a0.pt", "rank_1-zz9a0.pt"]
    path.write_text(json.dumps(manifest))


def _mixed_fences(run, step):
    directory = run / "checkpoints" / checkpoint_name(step, 0)
    os.replace(directory / "rank_1-f.pt", directory / "rank_1-g.pt")
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["parts"] = ["rank_0-f.pt", "rank_1-g.pt"]
    path.write_text(json.dumps(manifest))


def _too_few_parts(run, step):
    path = _manifest(run, step)
    manifest = json.loads(path.read_text())
    manifest["parts"] = ["rank_0-f.pt"]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [_truncate, _garbage_step, _missing_part,
                                    _another_runs_fence, _mixed_fences, _too_few_parts],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_bad_manifest_falls_back_to_the_previous_commit_with_a_warning(
        damage, full_checkpoint, tmp_path, caplog) -> None:
    run = tmp_path / "run"
    _committed_run(run, full_checkpoint, steps=(2, 4))
    damage(run, 4)
    manager = CheckpointManager(str(run))  # a new driver resuming the run (resume="auto")
    with caplog.at_level(logging.WARNING, logger="ray_lit"):
        latest = manager.latest()
        manager.latest()
    assert latest is not None and latest.global_step == 2
    assert load_checkpoint(latest.part_uri(1))["global_step"] == 2  # the fallback loads
    warnings = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
    assert len(warnings) == 1  # once, not at every listing
    assert checkpoint_name(4, 0) in warnings[0]
    assert "previous committed checkpoint" in warnings[0]


def test_the_only_checkpoint_bad_means_a_fresh_start(full_checkpoint, tmp_path, caplog) -> None:
    run = tmp_path / "run"
    _committed_run(run, full_checkpoint, steps=(2,))
    _truncate(run, 2)
    with caplog.at_level(logging.WARNING, logger="ray_lit"):
        assert CheckpointManager(str(run)).latest() is None
    assert "is not used" in caplog.text


# --- __init__ arguments the checkpoint did not save ----------------------------------------
class NeedsArgs(pl.LightningModule):
    def __init__(self, width, depth, act="relu") -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.act = act


class SavesSome(pl.LightningModule):
    def __init__(self, width, depth) -> None:
        super().__init__()
        self.save_hyperparameters("width")
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def test_missing_init_arguments_are_named_with_both_fixes(tmp_path) -> None:
    path = str(tmp_path / "needs.ckpt")
    save_checkpoint({"state_dict": NeedsArgs(3, 2).state_dict()}, path)
    with pytest.raises(pl.MisconfigurationException) as info:
        NeedsArgs.load_from_checkpoint(path)
    message = str(info.value)
    assert "'width', 'depth'" in message and "'act'" not in message
    assert "save_hyperparameters()" in message
    assert "load_from_checkpoint(path, width=..., depth=...)" in message
    loaded = NeedsArgs.load_from_checkpoint(path, width=3, depth=2)
    assert len(loaded.layers) == 2


def test_only_the_unsaved_arguments_are_named(tmp_path) -> None:
    model = SavesSome(3, 2)
    path = str(tmp_path / "some.ckpt")
    save_checkpoint({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                     "hparams_name": "kwargs"}, path)
    with pytest.raises(pl.MisconfigurationException, match=r"needs 'depth',") as info:
        SavesSome.load_from_checkpoint(path)
    assert "'width'" not in str(info.value).split("needs")[1].split("which")[0]
    assert len(SavesSome.load_from_checkpoint(path, depth=2).layers) == 2


def test_a_restart_continues_from_the_commit_before_a_bad_manifest(full_checkpoint, tmp_path,
                                                                   caplog) -> None:
    """A resumed run whose newest manifest is damaged: the driver's next attempt restores the
    previous commit (the controller, on fake workers)."""
    from ray_lit.testing import FakeWorkerGroups, ScriptedAttempt, controller_for

    run = tmp_path / "run"
    _committed_run(run, full_checkpoint, steps=(2, 4))
    _truncate(run, 4)
    groups = FakeWorkerGroups([ScriptedAttempt(steps=5, die=(1, 3)), ScriptedAttempt()])
    trainer = pl.Trainer(num_workers=2, max_failures=1, logger=False, enable_progress_bar=False)
    controller = controller_for(trainer, groups, manager=CheckpointManager(str(run)))
    with caplog.at_level(logging.WARNING, logger="ray_lit"):
        controller.run()
    restore = groups.groups[1].job.restore
    assert restore.rank0_uri.endswith(f"{checkpoint_name(2, 0)}/rank_0-f.pt")
    assert controller.restored_from == [("storage", 2)]
    assert "is not used" in caplog.text
    assert _manifest(run, 4).exists()  # the damaged one is kept for inspection, never read
