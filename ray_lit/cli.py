"""``LightningCLI``: a command line and YAML configs for a module, a datamodule and the Trainer.

Lightning 2.x's CLI, built on the same library (``jsonargparse``, the optional extra ``cli``:
``pip install "ray_lit[cli]"``, imported only when a ``LightningCLI`` is built)::

    # train.py
    from ray_lit.cli import LightningCLI
    LightningCLI(MyModel, MyDataModule)

    python train.py fit --trainer.max_epochs 3 --trainer.num_workers 2 --model.lr 0.01
    python train.py fit --config config.yaml --print_config
    python train.py test --config config.yaml --ckpt_path best.ckpt

The model and datamodule arguments come from their classes' ``__init__`` signatures
(``--model.<arg>``, ``--data.<arg>``); the Trainer's are every ray_lit Trainer option
(``--trainer.<option>``, ``--trainer.num_workers`` included). Runs on the driver: the Trainer
it builds starts the Ray workers.

Lightning's built-in callbacks may be named as Lightning's CLI names them
(``--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint
--trainer.callbacks.monitor=val_loss``, ``--trainer.callbacks+=...`` or a config's
``class_path: lightning.pytorch.callbacks.EarlyStopping``): they are parsed with Lightning's
own signatures and built as ray_lit's callback of the same name (``callbacks.lightning_twins``).
Lightning is imported only when the arguments or configs name it (or it is imported already).
"""

from __future__ import annotations

import os
import random
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from ray_lit.callbacks.base import Callback
from ray_lit.errors import MisconfigurationException

# ``LightningArgumentParser`` is served by the module ``__getattr__`` (it needs jsonargparse)
__all__ = ["LightningCLI", "SaveConfigCallback"]

# Trainer.<subcommand> arguments the CLI exposes besides the model and the data
_SUBCOMMANDS: dict[str, dict[str, tuple[Any, Any]]] = {
    "fit": {"ckpt_path": (str | None, None)},
    "validate": {"ckpt_path": (str | None, None), "verbose": (bool, True)},
    "test": {"ckpt_path": (str | None, None), "verbose": (bool, True)},
    "predict": {"ckpt_path": (str | None, None),
                "return_predictions": (bool | None, None)},
}
_PARSER_CLASS: list[type] = []


def _jsonargparse() -> Any:
    try:
        import jsonargparse
    except ImportError as err:
        raise MisconfigurationException(
            "LightningCLI needs jsonargparse: pip install 'ray_lit[cli]' (or "
            "'jsonargparse[signatures]').") from err
    return jsonargparse


_LIGHTNING_PACKAGES = {"lightning.pytorch": "lightning.pytorch",
                       "pytorch_lightning": "pytorch_lightning"}
_NAMES_LIGHTNING = re.compile(r"\b(lightning\.pytorch|pytorch_lightning)\.")


def _config_files(args: list[str]) -> list[str]:
    """The files ``--config`` / ``-c`` name in ``args``."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _lightning_callback_bases(args: Any, config_files: list[str] | None = None) -> tuple[type, ...]:
    """Lightning's ``Callback`` classes the callbacks option must also accept (driver).

    Those of the packages the arguments or config files name, and of those imported already;
    none otherwise, so a CLI that never mentions Lightning never imports it.
    """
    if args is None:
        args = sys.argv[1:]
    texts = [str(args)] if isinstance(args, dict) else [str(a) for a in args]
    listed = [] if isinstance(args, dict) else list(args)
    for path in [*(config_files or []), *_config_files(listed)]:
        if os.path.isfile(path):
            with open(path) as f:
                texts.append(f.read())
    named = {m.group(1) for text in texts for m in _NAMES_LIGHTNING.finditer(text)}
    named |= {name for name in _LIGHTNING_PACKAGES if name in sys.modules}
    import importlib

    return tuple(importlib.import_module(_LIGHTNING_PACKAGES[name]).Callback
                 for name in sorted(named))


def _trainer_types(callback_bases: tuple[type, ...] = ()) -> dict[str, Any]:
    """Types jsonargparse can parse for the Trainer options whose annotation is too loose."""
    from ray_lit.callbacks.base import Callback
    from ray_lit.loggers.base import Logger

    one = typing.Union[(Callback, *callback_bases)] if callback_bases else Callback
    return {
        "num_workers": int | tuple[int, int],
        "callbacks": list[one] | one | None,
        "logger": bool | Logger | list[Logger] | None,
        "early_stop_callback": bool,
        "accumulate_grad_batches": int | dict[int, int],
        "resources_per_worker": dict[str, float] | None,
        "strategy": Any,
    }


def _parser_class() -> type:
    """``LightningArgumentParser`` (built on first use: it subclasses jsonargparse's parser)."""
    if _PARSER_CLASS:
        return _PARSER_CLASS[0]
    jsonargparse = _jsonargparse()

    class LightningArgumentParser(jsonargparse.ArgumentParser):
        """jsonargparse's parser plus ``add_trainer_arguments`` (every ray_lit Trainer
        option as ``--<nested_key>.<option>``)."""

        def add_trainer_arguments(self, nested_key: str = "trainer",
                                  defaults: dict[str, Any] | None = None,
                                  callback_bases: tuple[type, ...] = ()) -> None:
            """``callback_bases``: Lightning ``Callback`` classes ``callbacks`` also accepts
            (``_lightning_callback_bases``)."""
            from ray_lit.config import TrainerConfig

            hints = typing.get_type_hints(TrainerConfig)
            overrides = _trainer_types(tuple(callback_bases))
            group = self.add_argument_group(f"ray_lit Trainer options ({nested_key})")
            defaults = defaults or {}
            for field in fields(TrainerConfig):
                if field.metadata.get("internal"):
                    continue
                default = (field.default if field.default is not MISSING else
                           field.default_factory() if field.default_factory is not MISSING
                           else None)
                default = defaults.get(field.name, default)
                hint = overrides.get(field.name, hints.get(field.name, Any))
                try:
                    group.add_argument(f"--{nested_key}.{field.name}", type=hint,
                                       default=default)
                except Exception:  # a type jsonargparse cannot parse: take any YAML value
                    group.add_argument(f"--{nested_key}.{field.name}", type=Any,
                                       default=default)

    LightningArgumentParser.__module__ = __name__
    _PARSER_CLASS.append(LightningArgumentParser)
    return LightningArgumentParser


def _exists(path: str) -> bool:
    """Whether a file is at ``path`` (a local path or a storage URI)."""
    if "://" not in path:
        return os.path.isfile(path)
    from ray_lit.storage.filesystem import Storage, split

    parent, name = split(path)
    return Storage(parent).exists(name)


def _keep_none() -> dict[str, bool]:
    """The keyword that keeps None values in a saved config, as Lightning saves them
    (jsonargparse 4.49 renamed ``skip_none`` to ``skip_unset``)."""
    import jsonargparse

    major, minor = (int(p) for p in jsonargparse.__version__.split(".")[:2])
    return {"skip_unset": False} if (major, minor) >= (4, 49) else {"skip_none": False}


def __getattr__(name: str) -> Any:
    if name == "LightningArgumentParser":
        return _parser_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SaveConfigCallback(Callback):
    """Writes the parsed config as YAML into ``trainer.log_dir`` when the Trainer first runs
    (its ``setup``: fit, validate, test or predict), as Lightning 2.x does.

    ``LightningCLI`` adds it to the Trainer's callbacks, with a subcommand and with
    ``run=False`` alike. Every rank calls ``setup``; global rank 0 checks for an existing file
    (its answer is broadcast, so every rank stops alike) and writes. The YAML is rendered on the
    driver, where the parser is: a worker receives the text, not the parser.

    Args:
        parser: the parser that read the config.
        config: the parsed config of the subcommand.
        config_filename: the file name under ``trainer.log_dir``.
        overwrite: replace an existing file (otherwise an existing one is an error, so a
            second run does not silently lose the first run's config).
        multifile: also write the config files that ``config`` refers to (jsonargparse).
        save_to_log_dir: write into ``trainer.log_dir``; False leaves it to ``save_config``.

    Raises:
        MisconfigurationException: at ``setup``, the file exists and ``overwrite`` is False.
    """

    def __init__(self, parser: Any, config: Any, config_filename: str = "config.yaml",
                 overwrite: bool = False, multifile: bool = False,
                 save_to_log_dir: bool = True) -> None:
        self.parser = parser
        self.config = config
        self.config_filename = config_filename
        self.overwrite = overwrite
        self.multifile = multifile
        self.save_to_log_dir = save_to_log_dir
        self.already_saved = False
        self._text: str | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        """Every rank (COLLECTIVE: broadcasts); rank 0 writes the config once per callback."""
        if self.already_saved:
            return
        if self.save_to_log_dir:
            path = os.path.join(trainer.log_dir, self.config_filename)
            exists = _exists(path) if trainer.is_global_zero else False
            if not self.overwrite and trainer.strategy.broadcast(exists):
                raise MisconfigurationException(
                    f"LightningCLI: {path} already exists; pass save_config_kwargs="
                    "{'overwrite': True}, save_config_callback=None, or another "
                    "trainer.default_root_dir.")
            if trainer.is_global_zero:
                self._write(path)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        # every rank agrees, so a later stage of this Trainer does not save again
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: Any, pl_module: Any, stage: str | None) -> None:
        """Override to save the config elsewhere too (rank 0, after the file is written)."""

    def _write(self, path: str) -> None:
        if "://" in path:  # a storage URI (default_root_dir="s3://..."): written through it
            from ray_lit.storage.filesystem import write_file

            text = self._text if self.parser is None else \
                self.parser.dump(self.config, **_keep_none())
            write_file(path, (text or "").encode())
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if self.parser is not None:
            self.parser.save(self.config, path, overwrite=True, multifile=self.multifile,
                             **_keep_none())
            return
        with open(path, "w") as f:  # a worker: the text the driver rendered
            f.write(self._text or "")

    def __getstate__(self) -> dict[str, Any]:
        # jsonargparse parsers do not pickle reliably: a copy carries the rendered YAML
        state = dict(self.__dict__)
        if self.parser is not None:
            state["_text"] = self.parser.dump(self.config, **_keep_none())
        state["parser"] = None
        return state


class LightningCLI:
    """Build a module, a datamodule and a ray_lit ``Trainer`` from the command line and YAML
    configs, and run a Trainer subcommand (driver).

    Args:
        model_class: the ``LightningModule`` class (or a base class with
            ``subclass_mode_model=True``; then ``--model.class_path`` picks one).
        datamodule_class: the ``LightningDataModule`` class (None: the model has its own
            dataloaders).
        save_config_callback: ``SaveConfigCallback`` (or a subclass), added to the Trainer's
            callbacks: it writes the config into ``trainer.log_dir`` when the Trainer first
            runs (also with ``run=False``); None writes nothing.
        save_config_kwargs: ``config_filename`` / ``overwrite`` for it.
        trainer_class: the Trainer class (``ray_lit.Trainer``).
        trainer_defaults: Trainer option defaults the command line and configs override.
        seed_everything_default: ``--seed_everything``'s default: an int seeds with it, True
            with a random seed (stored in the config), False does not seed.
        parser_kwargs: keyword arguments of the parser (per subcommand when keyed by one).
        subclass_mode_model: the model is given by ``class_path`` / ``init_args``.
        subclass_mode_data: the datamodule likewise.
        args: the arguments to parse (a list, or a dict config); None reads ``sys.argv``.
        run: parse a subcommand and run it; False parses the options alone and only builds
            ``self.model``, ``self.datamodule`` and ``self.trainer``.

    Raises:
        MisconfigurationException: jsonargparse is missing (the ``cli`` extra).
    """

    def __init__(self, model_class: type | Callable[..., Any] | None = None,
                 datamodule_class: type | Callable[..., Any] | None = None,
                 save_config_callback: type | None = SaveConfigCallback,
                 save_config_kwargs: dict[str, Any] | None = None,
                 trainer_class: type | None = None,
                 trainer_defaults: dict[str, Any] | None = None,
                 seed_everything_default: bool | int = True,
                 parser_kwargs: dict[str, Any] | None = None,
                 subclass_mode_model: bool = False, subclass_mode_data: bool = False,
                 args: Any = None, run: bool = True,
                 auto_configure_optimizers: bool = True) -> None:
        if trainer_class is None:
            from ray_lit.trainer import Trainer as trainer_class
        if model_class is None:
            from ray_lit.core.module import LightningModule

            model_class, subclass_mode_model = LightningModule, True
        self.model_class = model_class
        self.datamodule_class = datamodule_class
        self.save_config_callback = save_config_callback
        self.save_config_kwargs = save_config_kwargs or {}
        self.trainer_class = trainer_class
        self.trainer_defaults = trainer_defaults or {}
        self.seed_everything_default = seed_everything_default
        self.parser_kwargs = parser_kwargs or {}
        self.subclass_mode_model = subclass_mode_model
        self.subclass_mode_data = subclass_mode_data
        self.auto_configure_optimizers = auto_configure_optimizers
        defaults = self.parser_kwargs.get("default_config_files") or []
        self._callback_bases = _lightning_callback_bases(args, list(defaults))

        self.setup_parser(run, self.parser_kwargs)
        self.parse_arguments(self.parser, args)
        self.subcommand = self.config["subcommand"] if run else None
        self._set_seed()
        self.before_instantiate_classes()
        self.instantiate_classes()
        if self.subcommand is not None:
            self._run_subcommand(self.subcommand)

    # --- the parser ------------------------------------------------------------------------
    def init_parser(self, **kwargs: Any) -> Any:
        """A ``LightningArgumentParser`` with ``--config`` (and so ``--print_config``)."""
        jsonargparse = _jsonargparse()
        parser = _parser_class()(**kwargs)
        parser.add_argument("-c", "--config", action=jsonargparse.ActionConfigFile,
                            help="a YAML config file (repeatable; later ones override)")
        return parser

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any]) -> None:
        """Build ``self.parser``: one subparser per subcommand, or the options alone."""
        if not add_subcommands:
            self.parser = self.init_parser(**main_kwargs)
            self._add_arguments(self.parser)
            return
        main = {k: v for k, v in main_kwargs.items() if k not in _SUBCOMMANDS}
        self.parser = self.init_parser(**main)
        subcommands = self.parser.add_subcommands(dest="subcommand", required=True)
        self.subcommand_parsers: dict[str, Any] = {}
        for name, options in _SUBCOMMANDS.items():
            sub = self.init_parser(**main_kwargs.get(name, {}))
            self._add_arguments(sub)
            for option, (hint, default) in options.items():
                sub.add_argument(f"--{option}", type=hint, default=default)
            doc = getattr(self.trainer_class, name).__doc__ or ""
            subcommands.add_subcommand(name, sub, help=doc.strip().split("\n")[0])
            self.subcommand_parsers[name] = sub

    def _add_arguments(self, parser: Any) -> None:
        parser.add_argument("--seed_everything", type=bool | int,
                            default=self.seed_everything_default,
                            help="seed for seed_everything: an int, True (a random seed), "
                                 "False (no seeding)")
        parser.add_trainer_arguments("trainer", self.trainer_defaults,
                                     callback_bases=getattr(self, "_callback_bases", ()))
        self._add_class(parser, self.model_class, "model", self.subclass_mode_model)
        if self.datamodule_class is not None:
            self._add_class(parser, self.datamodule_class, "data", self.subclass_mode_data)
        self.add_arguments_to_parser(parser)

    @staticmethod
    def _add_class(parser: Any, cls: Any, key: str, subclass_mode: bool) -> None:
        if subclass_mode:
            parser.add_subclass_arguments(cls, key, required=True)
        else:
            parser.add_class_arguments(cls, key)

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Override to add arguments or ``parser.link_arguments(...)``."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse ``args`` (a list, a dict, or ``sys.argv[1:]``) into ``self.config``."""
        if isinstance(args, dict):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(sys.argv[1:] if args is None else args)

    def _active_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _set_seed(self) -> None:
        config = self._active_config()
        seed = config.get("seed_everything")
        if seed is None or seed is False:
            return
        if seed is True:
            # a random seed, written into the config so the saved config reproduces the run
            seed = random.randint(0, 2**31 - 1)
            config["seed_everything"] = seed
        from ray_lit.core.seed import seed_everything

        seed_everything(int(seed))

    # --- building the objects --------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        """Override to act on ``self.config`` before anything is built."""

    def instantiate_classes(self) -> None:
        """Build ``self.model``, ``self.datamodule`` and ``self.trainer`` from the config."""
        parser = self.subcommand_parsers[self.subcommand] if self.subcommand else self.parser
        # ``instantiate`` replaced ``instantiate_classes`` in jsonargparse 4.49
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        self.config_init = instantiate(self._active_config())
        self.model = self.config_init["model"]
        self.datamodule = self.config_init.get("data")
        self.trainer = self.instantiate_trainer()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer from the options set in configs or on the command line (the others
        keep the Trainer's defaults); ``kwargs`` override."""
        from ray_lit.config import TrainerConfig

        given = self.config_init["trainer"]
        defaults = {f.name: (f.default if f.default is not MISSING else
                             f.default_factory() if f.default_factory is not MISSING else None)
                    for f in fields(TrainerConfig)}
        options = {k: v for k, v in dict(given).items()
                   if k in defaults and (k in self.trainer_defaults or v != defaults[k])}
        options.update(kwargs)
        if options.get("callbacks") is not None:
            options["callbacks"] = _as_twins(options["callbacks"])
        if self.save_config_callback is not None and not options.get("fast_dev_run"):
            # saved when the Trainer first runs, with a subcommand or a run=False user's call
            parser = self.subcommand_parsers[self.subcommand] if self.subcommand else \
                self.parser
            saver = self.save_config_callback(parser, self._active_config(),
                                              **self.save_config_kwargs)
            callbacks = options.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
            options["callbacks"] = [*callbacks, saver]
        return self.trainer_class(**options)

    # --- running ---------------------------------------------------------------------------
    def _run_subcommand(self, subcommand: str) -> None:
        before = getattr(self, f"before_{subcommand}", None)
        if callable(before):
            before()
        kwargs = {k: self.config_init[k] for k in _SUBCOMMANDS[subcommand]
                  if k in self.config_init}
        fn = getattr(self.trainer, subcommand)
        self.result = fn(self.model, datamodule=self.datamodule, **kwargs)
        after = getattr(self, f"after_{subcommand}", None)
        if callable(after):
            after()


def _as_twins(callbacks: Any) -> Any:
    """The parsed callbacks with each of Lightning's own built-ins (not a user's subclass:
    ``Trainer`` rebases those) replaced by ray_lit's callback of the same name, built from the
    arguments Lightning's ``__init__`` recorded. Driver."""
    from ray_lit.adoption import is_lightning_class
    from ray_lit.callbacks.lightning_twins import arguments, twin_of

    many = isinstance(callbacks, (list, tuple))
    out = []
    for callback in (callbacks if many else [callbacks]):
        cls = type(callback)
        twin = twin_of(cls.__name__) if is_lightning_class(cls) else None
        out.append(twin(**arguments(cls.__name__, callback.__dict__)) if twin else callback)
    return out if many else out[0]
