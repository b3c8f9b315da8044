"""Hyperparameters (spec §4.4, trap 7.18): ``save_hyperparameters``, ``self.hparams = ...``,
``load_from_checkpoint``."""

from __future__ import annotations

import copy
import pickle
from argparse import Namespace

import cloudpickle
import pytest
import torch
from torch import nn

import ray_lit as pl
from ray_lit.core.hparams import AttributeDict, clean_hparams_for_fit
from ray_lit.errors import MisconfigurationException
from ray_lit.storage.checkpoint_io import load_checkpoint, save_checkpoint

# --- AttributeDict -------------------------------------------------------------------------


def test_attribute_dict_access_repr_and_pickle():
    hp = AttributeDict(lr=0.1)
    hp.layers = 2
    assert hp["layers"] == 2 and hp.lr == 0.1
    assert getattr(hp, "missing", "default") == "default"
    with pytest.raises(AttributeError, match="missing"):
        _ = hp.missing
    del hp.layers
    assert "layers" not in hp
    assert "'lr':" in repr(hp) and "0.1" in repr(hp)
    assert repr(AttributeDict()) == "AttributeDict()"
    for clone in (pickle.loads(pickle.dumps(hp)), cloudpickle.loads(cloudpickle.dumps(hp)),
                  copy.deepcopy(hp)):
        assert type(clone) is AttributeDict and clone == hp and clone.lr == 0.1


# --- save_hyperparameters --------------------------------------------------------------------


class AllArgs(pl.LightningModule):
    def __init__(self, lr: float = 0.1, layers: int = 2, *args, **kwargs) -> None:
        super().__init__()
        lr = lr * 10  # reassigned before the call: the new value is saved
        self.save_hyperparameters()
        self.layer = nn.Linear(2, layers)


class Base(pl.LightningModule):
    def __init__(self, lr: float = 0.1, **kwargs) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(2, 2)


class Child(Base):
    def __init__(self, hidden: int = 4, lr: float = 0.5, activation: str = "relu") -> None:
        super().__init__(lr=lr)
        self.hidden = hidden


class GrandChild(Child):
    def __init__(self, depth: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)


class Some(pl.LightningModule):
    def __init__(self, a: int = 1, b: int = 2, c: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters("a", "c")
        self.layer = nn.Linear(2, 2)


class FromDict(pl.LightningModule):
    def __init__(self, conf: dict, other: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters(conf)
        self.layer = nn.Linear(2, conf["width"])


class FromNamespace(pl.LightningModule):
    def __init__(self, hparams: Namespace) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.layer = nn.Linear(2, hparams.width)


class Assigned(pl.LightningModule):
    """The 0.9 idiom ``self.hparams = hparams``."""

    def __init__(self, hparams) -> None:
        super().__init__()
        self.hparams = hparams
        self.layer = nn.Linear(2, self.hparams.width)


class NoArgs(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)


class Defaults(pl.LightningModule):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.layer = nn.Linear(2, width)


def test_all_init_args_read_at_call_time():
    m = AllArgs(0.2, 5, "ignored-positional", extra="kw")
    assert m.hparams == {"lr": 2.0, "layers": 5, "extra": "kw"}
    assert isinstance(m.hparams, AttributeDict)
    assert m._hparams_name == "kwargs"
    assert m.hparams_initial == m.hparams
    assert m._log_hyperparams is True


def test_subclass_chain_args_captured_from_base_init():
    m = Child(hidden=8, lr=0.3)
    assert m.hparams == {"hidden": 8, "lr": 0.3, "activation": "relu"}
    g = GrandChild(depth=5, hidden=2)
    assert g.hparams == {"depth": 5, "hidden": 2, "lr": 0.5, "activation": "relu"}


class Twice(pl.LightningModule):
    def __init__(self, a: int = 1, b: int = 2, c: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters("a")
        self.save_hyperparameters(ignore=["a", "c"], logger=False)  # successive calls update


def test_named_args_ignore_and_logger_flag():
    m = Some(a=10, b=20, c=30)
    assert m.hparams == {"a": 10, "c": 30}
    t = Twice(a=10, b=20, c=30)
    assert t.hparams == {"a": 10, "b": 20}
    assert t._log_hyperparams is False


def test_outside_init_there_is_nothing_to_collect():
    m = Some()
    m.save_hyperparameters()
    assert m.hparams == {"a": 1, "c": 3} and m._hparams_name == "kwargs"


def test_unknown_name_and_primitive_are_rejected():
    class Bad(pl.LightningModule):
        def __init__(self, a: int = 1, what=None) -> None:
            super().__init__()
            if what == "name":
                self.save_hyperparameters("nope")
            else:
                self.save_hyperparameters(a)

    with pytest.raises(ValueError, match="nope"):
        Bad(what="name")
    with pytest.raises(ValueError, match="primitive"):
        Bad(a=5)


def test_single_dict_and_namespace():
    m = FromDict({"width": 3, "lr": 0.1})
    assert m.hparams == {"width": 3, "lr": 0.1} and m._hparams_name == "conf"
    n = FromNamespace(Namespace(width=4))
    assert n.hparams.width == 4 and n._hparams_name == "hparams"
    assert n.__dict__["_hparams_type"] == "Namespace"


def test_hparams_assignment_finds_the_init_argument():
    m = Assigned({"width": 2, "fn": len})
    assert m.hparams.width == 2 and m._hparams_name == "hparams"
    n = Assigned(Namespace(width=3))
    assert n.hparams == {"width": 3} and n.__dict__["_hparams_type"] == "Namespace"
    with pytest.raises(ValueError):
        Assigned(5)


def test_clean_hparams_for_fit_drops_callables():
    m = Assigned({"width": 2, "fn": len, "cls": dict, "lam": lambda x: x})
    clean_hparams_for_fit(m.hparams)
    assert m.hparams == {"width": 2}
    ns = Namespace(a=1, f=print)
    clean_hparams_for_fit(ns)
    assert vars(ns) == {"a": 1}


# --- load_from_checkpoint ------------------------------------------------------------------


def _save(model: pl.LightningModule, path) -> str:
    checkpoint = {"state_dict": model.state_dict()}
    if model.hparams:
        checkpoint["hyper_parameters"] = dict(model.hparams)
        checkpoint["hparams_name"] = model._hparams_name
        if model.__dict__.get("_hparams_type"):
            checkpoint["hparams_type"] = model.__dict__["_hparams_type"]
    save_checkpoint(checkpoint, str(path))
    return str(path)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                   b.state_dict().values()))


def test_load_kwargs_style_with_override(tmp_path):
    m = Child(hidden=8, lr=0.3)
    path = _save(m, tmp_path / "c.ckpt")
    loaded = Child.load_from_checkpoint(path)
    assert isinstance(loaded, Child) and loaded.hidden == 8 and loaded.hparams.lr == 0.3
    assert _same_weights(m, loaded) and loaded.training
    override = Child.load_from_checkpoint(path, lr=0.9, unknown_kwarg=1)
    assert override.hparams.lr == 0.9 and "unknown_kwarg" not in override.hparams


def test_load_passes_dict_as_the_named_argument(tmp_path):
    m = FromDict({"width": 3, "lr": 0.1}, other=7)
    loaded = FromDict.load_from_checkpoint(_save(m, tmp_path / "d.ckpt"), lr=0.5)
    assert loaded.hparams == {"width": 3, "lr": 0.5}
    assert _same_weights(m, loaded)


def test_load_passes_namespace_back_as_namespace(tmp_path):
    received = []

    class Recording(FromNamespace):
        def __init__(self, hparams: Namespace) -> None:
            received.append(hparams)
            super().__init__(hparams)

    m = Recording(Namespace(width=4, lr=0.1))
    path = _save(m, tmp_path / "n.ckpt")
    loaded = Recording.load_from_checkpoint(path)
    assert isinstance(received[-1], Namespace) and received[-1].width == 4
    assert _same_weights(m, loaded)


def test_load_legacy_assignment_without_name_goes_first_positional(tmp_path):
    m = Assigned({"width": 2})
    path = tmp_path / "legacy.ckpt"
    save_checkpoint({"state_dict": m.state_dict(), "hparams": {"width": 2}}, str(path))
    loaded = Assigned.load_from_checkpoint(str(path))
    assert loaded.hparams.width == 2 and _same_weights(m, loaded)


def test_load_without_hparams_uses_defaults_and_filtered_kwargs(tmp_path):
    m = Defaults(width=3)
    path = _save(m, tmp_path / "def.ckpt")
    loaded = Defaults.load_from_checkpoint(path, not_an_arg=1)
    assert _same_weights(m, loaded)
    with pytest.raises(RuntimeError, match="size mismatch"):
        Defaults.load_from_checkpoint(path, width=5)  # the override reaches __init__


def test_load_module_with_no_init_args(tmp_path):
    m = NoArgs()
    loaded = NoArgs.load_from_checkpoint(_save(m, tmp_path / "no.ckpt"), lr=1.0)
    assert _same_weights(m, loaded)


def test_load_strict_false_tolerates_missing_keys(tmp_path):
    m = NoArgs()
    path = tmp_path / "partial.ckpt"
    save_checkpoint({"state_dict": {"layer.weight": m.layer.weight.detach()}}, str(path))
    with pytest.raises(RuntimeError, match="layer.bias"):
        NoArgs.load_from_checkpoint(str(path))
    loaded = NoArgs.load_from_checkpoint(str(path), strict=False)
    assert torch.equal(loaded.layer.weight, m.layer.weight)


def test_load_hparams_file_replaces_stored_values(tmp_path):
    m = Child(hidden=8, lr=0.3)
    path = _save(m, tmp_path / "c.ckpt")
    (tmp_path / "hparams.yaml").write_text("hidden: 8\nlr: 0.01\nactivation: tanh\n")
    loaded = Child.load_from_checkpoint(path, hparams_file=str(tmp_path / "hparams.yaml"))
    assert loaded.hparams == {"hidden": 8, "lr": 0.01, "activation": "tanh"}
    (tmp_path / "h.json").write_text("{}")
    with pytest.raises(MisconfigurationException, match="yaml"):
        Child.load_from_checkpoint(path, hparams_file=str(tmp_path / "h.json"))


def test_on_load_checkpoint_runs_before_weights(tmp_path):
    seen = []

    class Hooked(NoArgs):
        def on_load_checkpoint(self, checkpoint):
            seen.append((checkpoint["extra"], self.layer.weight.detach().clone()))

    m = Hooked()
    path = tmp_path / "h.ckpt"
    save_checkpoint({"state_dict": m.state_dict(), "extra": 42}, str(path))
    loaded = Hooked.load_from_checkpoint(str(path))
    assert seen[0][0] == 42
    assert not torch.equal(seen[0][1], m.layer.weight)  # fresh init, weights not loaded yet
    assert torch.equal(loaded.layer.weight, m.layer.weight)


def test_loaded_checkpoint_hparams_are_plain_and_loadable(tmp_path):
    m = Child(hidden=8)
    path = _save(m, tmp_path / "c.ckpt")
    assert load_checkpoint(path)["hparams_name"] == "kwargs"
