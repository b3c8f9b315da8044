"""A hyperparameter that is an object (a datamodule given to ``__init__``, as bolts 0.2.2's
``ImageGPT``, ``MocoV2`` and ``CPCV2`` do) neither breaks the checkpoint nor comes back silently
changed: the checkpoint stays weights-only loadable, and ``load_from_checkpoint`` asks for that
argument by name (0.9 dropped every hyperparameter of such a module, with a warning)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ray_lit as pl
from ray_lit.core.hparams import hparams_for_checkpoint
from ray_lit.storage.checkpoint_io import CHECKPOINT_ALLOWLIST, load_checkpoint, save_checkpoint


class Data:
    """A stand-in for a datamodule: an instance only unpickling code could rebuild."""

    name = "generated"


class Allowed:
    pass


class KeepsItsData(pl.LightningModule):
    def __init__(self, data=None, width: int = 3, optimizer=torch.optim.SGD) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(width, 1)


def _saved(tmp_path, model) -> str:
    """A checkpoint with the hyperparameters as every ray_lit checkpoint writes them."""
    path = str(tmp_path / "m.ckpt")
    save_checkpoint({"state_dict": model.state_dict(),
                     "hyper_parameters": hparams_for_checkpoint(model),
                     "hparams_name": "kwargs"}, path)
    return path


def test_an_object_hyperparameter_is_asked_for_on_reload_not_pickled(tmp_path):
    model = KeepsItsData(Data(), width=4)
    path = _saved(tmp_path, model)
    hparams = load_checkpoint(path)["hyper_parameters"]  # weights-only: no Data rebuilt
    assert hparams["width"] == 4 and set(hparams["data"]) == {"__unsaved__"}
    with pytest.raises(pl.MisconfigurationException, match=r"'data'.*data=\.\.\."):
        KeepsItsData.load_from_checkpoint(path)
    given = Data()
    reloaded = KeepsItsData.load_from_checkpoint(path, data=given)
    assert reloaded.hparams.data is given and reloaded.hparams.optimizer is torch.optim.SGD
    assert torch.equal(reloaded.layer.weight, model.layer.weight)


def test_plain_and_allowlisted_values_are_saved_as_they_are(tmp_path):
    CHECKPOINT_ALLOWLIST.append(Allowed)
    try:
        model = KeepsItsData({"sizes": [1, 2], "t": torch.ones(2), "none": None}, width=2)
        path = _saved(tmp_path, model)
        reloaded = KeepsItsData.load_from_checkpoint(path)
        assert reloaded.hparams.data["sizes"] == [1, 2]
        assert torch.equal(reloaded.hparams.data["t"], torch.ones(2))
        allowed = KeepsItsData(Allowed(), width=2)
        path = _saved(tmp_path, allowed)
        assert isinstance(KeepsItsData.load_from_checkpoint(path).hparams.data, Allowed)
    finally:
        CHECKPOINT_ALLOWLIST.remove(Allowed)
