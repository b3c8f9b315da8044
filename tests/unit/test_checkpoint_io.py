"""``ray_lit.storage.checkpoint_io``: atomic torch.save, weights-only load, and clear refusals."""

from __future__ import annotations

import argparse
import collections
import pathlib
import pickle

import pytest
import torch

from ray_lit.core.hparams import AttributeDict
from ray_lit.core.seed import rng_state
from ray_lit.errors import MisconfigurationException
from ray_lit.storage.checkpoint_io import (
    CHECKPOINT_ALLOWLIST,
    CheckpointLoadError,
    load_checkpoint,
    save_checkpoint,
)


class _Marker:
    """Unpickling this creates a file: the proof that a load ran code from the checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Config:
    def __init__(self, lr: float) -> None:
        self.lr = lr


def _optimizer_states() -> dict:
    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    step = torch.optim.lr_scheduler.StepLR(adam, step_size=2, gamma=0.5)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(adam, patience=1)
    for _ in range(3):
        model(torch.randn(4, 3)).pow(2).sum().backward()
        adam.step()
        adam.zero_grad()
        step.step()
        plateau.step(1.0)
    return {"optimizer_states": [adam.state_dict()],
            "lr_schedulers": [step.state_dict(), plateau.state_dict()]}


def test_round_trip_of_what_the_loop_writes(tmp_path):
    checkpoint = {
        "epoch": 2, "global_step": 7, "pytorch-lightning_version": "2.4.0",
        "state_dict": collections.OrderedDict(w=torch.ones(2, 2)),
        "loops": {"progress": {"epoch": 2, "batches_done": 3}, "rng": rng_state()},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {
            "best_model_score": torch.tensor(0.5), "best_k_models": {"a.ckpt": 0.5},
            "dirpath": pathlib.Path(tmp_path)}},
        "hyper_parameters": {"lr": 0.1, "layers": [1, 2], "name": "x", "none": None},
        "checkpoint_callback_best_model_score": None,
        "device": torch.device("cpu"), "dtype": torch.float32,
        **_optimizer_states(),
    }
    path = tmp_path / "sub" / "dir" / "a.ckpt"
    save_checkpoint(checkpoint, str(path))
    loaded = load_checkpoint(str(path))
    assert loaded["epoch"] == 2 and loaded["global_step"] == 7
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2, 2))
    assert loaded["hyper_parameters"] == checkpoint["hyper_parameters"]
    assert loaded["loops"]["rng"]["python"] == checkpoint["loops"]["rng"]["python"]
    assert torch.equal(loaded["loops"]["rng"]["torch"], checkpoint["loops"]["rng"]["torch"])
    cb = loaded["callbacks"]["ModelCheckpoint{'monitor': 'val_loss'}"]
    assert cb["dirpath"] == pathlib.Path(tmp_path)
    assert [p.name for p in path.parent.iterdir()] == ["a.ckpt"]  # no temp files


def test_optimizer_and_scheduler_states_load_back(tmp_path):
    states = _optimizer_states()
    save_checkpoint(states, str(tmp_path / "o.ckpt"))
    loaded = load_checkpoint(str(tmp_path / "o.ckpt"))

    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    adam.load_state_dict(loaded["optimizer_states"][0])
    step = torch.optim.lr_scheduler.StepLR(adam, step_size=2)
    step.load_state_dict(loaded["lr_schedulers"][0])
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(adam)
    plateau.load_state_dict(loaded["lr_schedulers"][1])
    assert step.last_epoch == 3 and step.gamma == 0.5
    assert plateau.patience == 1 and plateau.best == 1.0
    exp_avg = adam.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, states["optimizer_states"][0]["state"][0]["exp_avg"])


@pytest.mark.parametrize("hparams", [
    AttributeDict(lr=0.1, layers=2),
    argparse.Namespace(lr=0.1, layers=2),
    collections.OrderedDict(lr=0.1),
])
def test_allowlisted_hparams_containers(tmp_path, hparams):
    save_checkpoint({"hyper_parameters": hparams}, str(tmp_path / "h.ckpt"))
    loaded = load_checkpoint(str(tmp_path / "h.ckpt"))["hyper_parameters"]
    assert type(loaded) is type(hparams) and loaded == hparams
    if isinstance(hparams, AttributeDict):
        assert loaded.lr == 0.1


def test_allowlist_is_scoped_to_the_load(tmp_path):
    save_checkpoint({"h": argparse.Namespace(a=1)}, str(tmp_path / "n.ckpt"))
    load_checkpoint(str(tmp_path / "n.ckpt"))
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


def test_user_safe_globals_survive_a_load(tmp_path):
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        save_checkpoint({"h": 1}, str(tmp_path / "n.ckpt"))
        load_checkpoint(str(tmp_path / "n.ckpt"))
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()


def test_extending_the_allowlist(tmp_path, monkeypatch):
    path = str(tmp_path / "c.ckpt")
    save_checkpoint({"config": _Config(0.5)}, path)
    with pytest.raises(CheckpointLoadError, match="_Config"):
        load_checkpoint(path)
    monkeypatch.setattr("ray_lit.storage.checkpoint_io.CHECKPOINT_ALLOWLIST",
                        [*CHECKPOINT_ALLOWLIST, _Config])
    assert load_checkpoint(path)["config"].lr == 0.5


def test_map_location(tmp_path):
    save_checkpoint({"w": torch.ones(1)}, str(tmp_path / "m.ckpt"))
    loaded = load_checkpoint(str(tmp_path / "m.ckpt"), map_location=torch.device("cpu"))
    assert loaded["w"].device.type == "cpu"


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(path)


@pytest.mark.parametrize("cut", [0, 10, 0.5, -20])
def test_truncated_file_is_reported(tmp_path, cut):
    path = tmp_path / "t.ckpt"
    save_checkpoint({"w": torch.arange(1000.0)}, str(path))
    data = path.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    path.write_bytes(data[:end])
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt") as info:
        load_checkpoint(str(path))
    assert str(path) in str(info.value)
    assert isinstance(info.value, MisconfigurationException)


def test_garbage_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "g.ckpt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt"):
        load_checkpoint(str(path))


def test_code_in_a_torch_checkpoint_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    save_checkpoint({"state_dict": {}, "payload": _Marker(str(marker))}, str(path))
    with pytest.raises(CheckpointLoadError, match="refuses to run code"):
        load_checkpoint(str(path))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_in_a_plain_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"payload": _Marker(str(marker))}))
    with pytest.raises(CheckpointLoadError, match="refuses to run code"):
        load_checkpoint(str(path))
    assert not marker.exists()
