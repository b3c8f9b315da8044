"""``LightningModule.load_from_checkpoint``: rebuild a module from its checkpoint (spec §4.4).

The constructor is called the way the hyperparameters reached it when the module was saved
(``hparams_name``): one keyword argument each (``"kwargs"``), all of them through one named
argument (``hparams=...``), or as the first positional argument (no name recorded). Then the
weights are loaded. Nothing in the file is executed (``ray_lit.storage.checkpoint_io``).
"""

from __future__ import annotations

import inspect
import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ray_lit.core.hparams import AttributeDict, restore_callables
from ray_lit.errors import MisconfigurationException
from ray_lit.storage.checkpoint_io import load_checkpoint

# read in this order so the current key wins over the 0.7/0.8 ones
HPARAMS_KEYS = ("module_arguments", "hparams", "hyper_parameters")


def load_from_checkpoint(cls: type[nn.Module], checkpoint_path: str | os.PathLike,
                         map_location: Any = None, hparams_file: str | os.PathLike | None = None,
                         strict: bool | None = True, **kwargs: Any) -> nn.Module:
    """Construct ``cls`` from the hyperparameters in a checkpoint and load its weights.

    Args:
        cls: the ``LightningModule`` subclass.
        checkpoint_path: local path or storage URI of the checkpoint: a file, or a sharded
            checkpoint directory (``FSDPStrategy(state_dict_type="sharded")``), read whole in
            this process without a process group.
        map_location: as in ``torch.load``; default ``"cpu"``.
        hparams_file: a ``.yaml`` / ``.yml`` file whose mapping replaces the stored
            hyperparameters.
        strict: passed to ``load_state_dict``; None uses the module's ``strict_loading``
            attribute (default True).
        **kwargs: override stored hyperparameters; names that ``__init__`` does not accept are
            dropped, unless it takes ``**kwargs``.

    Returns:
        The module with the checkpoint's weights, in training mode.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint_path``.
        MisconfigurationException: the file cannot be loaded or holds no ``state_dict``, a
            directory is not a complete sharded checkpoint (``CheckpointLoadError``), or
            ``hparams_file`` is not a YAML mapping.
    """
    location = "cpu" if map_location is None else map_location
    checkpoint = load_checkpoint(checkpoint_path, map_location=location)
    if "state_dict" not in checkpoint:
        raise MisconfigurationException(
            f"Checkpoint {os.fspath(checkpoint_path)} has no 'state_dict'; it is not a model "
            "checkpoint. Pass a file written by ModelCheckpoint or trainer.save_checkpoint.")
    hparams = stored_hparams(checkpoint)
    if hparams_file is not None:
        hparams = load_hparams_from_yaml(hparams_file)
    restore_callables(hparams, kwargs)  # classes/functions saved by import path
    name = checkpoint.get("hparams_name")
    if not hparams:
        name = "kwargs"  # nothing was saved: the constructor gets its defaults and the kwargs
    hparams.update(kwargs)
    args, init_kwargs = _init_arguments(cls, hparams, name, checkpoint.get("hparams_type"),
                                        kwargs)
    model = cls(*args, **init_kwargs)
    configure = getattr(model, "configure_model", None)
    if configure is not None:
        configure()  # 2.x: the layers it builds are in the state_dict, so build them first

    state_dict = checkpoint["state_dict"]
    hook = getattr(model, "on_load_checkpoint", None)
    if hook is not None:
        hook(checkpoint)  # 2.x order: the hook runs before the weights are loaded
    if strict is None:
        strict = getattr(model, "strict_loading", True)
    model.load_state_dict(state_dict, strict=strict)
    first = next(iter(state_dict.values()), None)
    if isinstance(first, torch.Tensor):
        model.to(first.device)  # where map_location put the weights
    return model


def stored_hparams(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a checkpoint as a plain dict (legacy keys merged first)."""
    merged: dict[str, Any] = {}
    for key in HPARAMS_KEYS:
        value = checkpoint.get(key)
        if isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            merged.update(value)
    return merged


def load_hparams_from_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a ``.yaml`` / ``.yml`` file (local path or storage URI).

    Raises:
        MisconfigurationException: another extension, PyYAML missing, or not a mapping.
    """
    from ray_lit.storage.filesystem import read_file

    name = os.fspath(path)
    if not name.split("?", 1)[0].lower().endswith((".yaml", ".yml")):
        raise MisconfigurationException(
            f"hparams_file={name!r} is not a .yaml or .yml file; pass the hparams.yaml that a "
            "logger wrote (or one of your own).")
    try:
        import yaml
    except ImportError as err:
        raise MisconfigurationException(
            "hparams_file needs PyYAML: pip install pyyaml") from err
    content = yaml.safe_load(read_file(name)) or {}
    if not isinstance(content, dict):
        raise MisconfigurationException(
            f"hparams_file {name} holds a {type(content).__name__}, not a mapping of "
            "hyperparameter names to values.")
    return content


def _init_arguments(cls: type[nn.Module], hparams: dict[str, Any], name: str | None,
                    hparams_type: str | None,
                    overrides: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments for ``cls(...)`` (the 0.9 rules of spec §4.4)."""
    params = _init_parameters(cls)
    if not params:
        return [], {}  # __init__ takes nothing: pass nothing
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = {p.name for p in params
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           inspect.Parameter.KEYWORD_ONLY)}
    args: list[Any] = []
    kwargs = dict(overrides)
    if hparams_type == "DictConfig":
        from omegaconf import OmegaConf

        container: Any = OmegaConf.create(hparams)
    elif hparams_type == "Namespace":
        container = Namespace(**hparams)
    else:
        container = AttributeDict(hparams)
    if name == "kwargs":
        kwargs.update(hparams)
    elif name:
        if name in named or takes_any:
            kwargs[name] = container
    else:
        args.append(container)
    if not takes_any:
        # unknown names are dropped silently, as in Lightning (trap 7.18)
        kwargs = {k: v for k, v in kwargs.items() if k in named}
    return args, kwargs


def _init_parameters(cls: type[nn.Module]) -> list[inspect.Parameter]:
    """``cls.__init__``'s parameters after ``self``; none for the base classes' own."""
    from ray_lit.core.module import LightningModule

    init = cls.__init__
    if init is nn.Module.__init__ or init is LightningModule.__init__:
        # their (*args, **kwargs) forward to nn.Module, which accepts no hyperparameters
        return []
    return list(inspect.signature(init).parameters.values())[1:]
