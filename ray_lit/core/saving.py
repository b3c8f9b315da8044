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


class CheckpointMismatchError(MisconfigurationException, RuntimeError):
    """A checkpoint's weights do not fit the module (another model class or configuration).

    Also a ``RuntimeError``: code that caught ``load_state_dict``'s error still catches it.
    """


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
        MisconfigurationException: the file cannot be loaded or holds no ``state_dict`` (a
            bare ``torch.save(model.state_dict())`` file is named as such), a directory is not
            a complete sharded checkpoint (``CheckpointLoadError``), ``__init__`` needs
            arguments the checkpoint did not save and ``kwargs`` do not give, its weights do
            not fit ``cls`` (another model's checkpoint; ``strict=False`` loads what fits), or
            ``hparams_file`` is not a YAML mapping.
    """
    location = "cpu" if map_location is None else map_location
    checkpoint = load_checkpoint(checkpoint_path, map_location=location)
    check_model_checkpoint(checkpoint, checkpoint_path)
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
    _check_init_arguments(cls, args, init_kwargs, checkpoint_path)
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
    try:
        # layers configure_model built on the meta device take the weights as they are
        model.load_state_dict(state_dict, strict=strict, assign=any(
            isinstance(t, torch.Tensor) and t.is_meta for t in model.state_dict().values()))
    except RuntimeError as err:  # torch lists every key that differs
        raise CheckpointMismatchError(
            f"Checkpoint {os.fspath(checkpoint_path)} does not fit {cls.__name__}: "
            f"{str(err).strip()}\nIt was probably saved from another model class or "
            "configuration: load it with the class (and hyperparameters) that saved it, or "
            "pass strict=False to load only the weights whose names match.") from err
    first = next(iter(state_dict.values()), None)
    if isinstance(first, torch.Tensor):
        model.to(first.device)  # where map_location put the weights
    return model


def check_model_checkpoint(checkpoint: Any, path: str | os.PathLike) -> None:
    """Refuse a loaded file that is not a model checkpoint, saying what it is instead.

    Called on the driver (or in process) by ``load_from_checkpoint`` and by the Trainer before
    a ``ckpt_path`` / ``resume`` checkpoint reaches any worker.

    Raises:
        MisconfigurationException: not a dict with a ``state_dict`` mapping; a bare
            ``state_dict`` (every value a tensor) is named as one.
    """
    name = os.fspath(path)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        return
    if isinstance(checkpoint, Mapping) and checkpoint and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise MisconfigurationException(
            f"{name} holds a bare state_dict (torch.save(model.state_dict())), not a "
            "checkpoint: there are no hyperparameters, optimizer states or loop positions in "
            "it. Build the module yourself and call module.load_state_dict(torch.load(path)), "
            "or save full checkpoints with trainer.save_checkpoint(path) / ModelCheckpoint.")
    what = f"a dict without 'state_dict' (keys: {sorted(map(str, checkpoint))[:6]})" if \
        isinstance(checkpoint, Mapping) else f"a {type(checkpoint).__name__}"
    raise MisconfigurationException(
        f"Checkpoint {name} is {what}; it is not a model checkpoint. Pass a file written by "
        "ModelCheckpoint or trainer.save_checkpoint.")


def check_state_dict_fits(module: nn.Module, state_dict: Mapping[str, Any],
                          path: str | os.PathLike, strict: bool = True) -> None:
    """Refuse weights that do not fit ``module`` (another model's checkpoint) before any of
    them is loaded, naming the keys that differ. With ``strict=False`` only shapes must agree
    (missing and unexpected keys are allowed, as in ``load_state_dict``). A
    ``num_batches_tracked`` buffer may be missing (BatchNorm fills it in for old files).

    Called by the Trainer on the driver, before a ``ckpt_path`` / ``resume`` checkpoint
    reaches any worker (a worker's own ``load_state_dict`` would fail only after the group
    formed). ``load_from_checkpoint`` lets ``load_state_dict`` itself decide.

    Raises:
        MisconfigurationException: keys missing or unexpected (strict), or a shape differs.
    """
    own = module.state_dict()
    name = os.fspath(path)
    missing = sorted(k for k in set(own) - set(state_dict)
                     if not k.endswith("num_batches_tracked")) if strict else []
    unexpected = sorted(set(state_dict) - set(own)) if strict else []
    shapes = [f"{k}: {tuple(state_dict[k].shape)} in the checkpoint, {tuple(own[k].shape)} in "
              "the module" for k in sorted(set(own) & set(state_dict))
              if isinstance(state_dict[k], torch.Tensor) and isinstance(own[k], torch.Tensor)
              and state_dict[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if shapes:
        problems.append(f"shapes differ ({_few(shapes)})")
    raise CheckpointMismatchError(
        f"Checkpoint {name} does not fit {type(module).__name__}: "
        f"{'; '.join(problems)}. It was probably saved from another model class or "
        "configuration: load it with the class (and hyperparameters) that saved it, or pass "
        "strict=False to load only the weights whose names and shapes match.")


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


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


def _check_init_arguments(cls: type[nn.Module], args: list[Any], kwargs: dict[str, Any],
                          path: str | os.PathLike) -> None:
    """``cls.__init__`` arguments without a default that neither the checkpoint's
    hyperparameters nor the caller's ``kwargs`` give: name them and the two fixes (instead of
    the constructor's own ``TypeError``).

    Raises:
        MisconfigurationException: naming the missing arguments.
    """
    params = _init_parameters(cls)
    try:
        inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        return
    except TypeError:
        pass
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    given = {p.name for p in positional[:len(args)]} | set(kwargs)
    missing = [p.name for p in params if p.default is inspect.Parameter.empty
               and p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                  inspect.Parameter.VAR_KEYWORD)
               and p.name not in given]
    if not missing:
        return  # another mismatch: the constructor's own error says it best
    shown = ", ".join(repr(m) for m in missing)
    example = ", ".join(f"{m}=..." for m in missing)
    raise MisconfigurationException(
        f"{cls.__name__}.__init__ needs {shown}, which checkpoint {os.fspath(path)} does not "
        f"hold (the module did not save them with self.save_hyperparameters()). Pass them: "
        f"{cls.__name__}.load_from_checkpoint(path, {example}), or call "
        "self.save_hyperparameters() in __init__ so that later checkpoints keep them.")


def _init_parameters(cls: type[nn.Module]) -> list[inspect.Parameter]:
    """``cls.__init__``'s parameters after ``self``; none for the base classes' own."""
    from ray_lit.core.module import LightningModule

    init = cls.__init__
    if init is nn.Module.__init__ or init is LightningModule.__init__:
        # their (*args, **kwargs) forward to nn.Module, which accepts no hyperparameters
        return []
    return list(inspect.signature(init).parameters.values())[1:]
