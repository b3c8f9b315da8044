"""``Logger``: where the driver sends metrics and hyperparameters.

Loggers live in one process, the driver: in a distributed fit the workers stream their metrics
to it (``ray_lit.loop.reporting``), so nothing here needs a rank guard. The trainer sends each
of its log calls with ``log_now``: ``agg_and_log_metrics``, then ``save()`` as 0.9's trainer
did (the base ``save`` flushes), so every call reaches ``log_metrics`` when it is made, in
order, with its own step, unless the user's ``save`` keeps 0.9's merging of one step's calls
(docs/lightning_semantics_decisions.md, DECISION 0.9-2). It calls
``log_hyperparams`` at the start of ``fit``, and ``save`` then ``finalize`` at the end of each
stage. A finalized logger must keep working: ``test()`` after ``fit()`` logs again, so file
handles are reopened lazily.

``_FileLogger`` holds the directory layout shared by the TensorBoard and CSV loggers:
``save_dir/name/version_N`` with N the next free number, resolved once.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import os
import re
from abc import ABC, abstractmethod
from argparse import Namespace
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

import torch

_PRIMITIVES = (bool, int, float, str)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


class Logger(ABC):
    """Base class of loggers; subclass it and implement the abstract members.

    Args:
        agg_key_funcs: per-metric reduction of values logged at the same step.
        agg_default_func: reduction for every other metric (mean, as in 0.9).
    """

    def __init__(self, agg_key_funcs: Mapping[str, Callable[[Sequence[float]], float]] | None
                 = None, agg_default_func: Callable[[Sequence[float]], float] = _mean) -> None:
        self._agg_key_funcs = dict(agg_key_funcs or {})
        self._agg_default_func = agg_default_func
        self._prev_step: int | None = None
        self._metrics_to_agg: list[dict[str, float]] = []

    # --- what subclasses implement -------------------------------------------------------------
    @property
    @abstractmethod
    def name(self) -> str | None:
        """Experiment name."""

    @property
    @abstractmethod
    def version(self) -> int | str | None:
        """Experiment version (an int N for ``version_N`` directories, or a string)."""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record ``metrics`` at ``step``.

        Args:
            metrics: metric name -> value (floats from the trainer; tensors tolerated).
            step: the x-axis value (global step, or an eval batch index for 0.9 step curves).
        """

    @abstractmethod
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any,
                        **kwargs: Any) -> None:
        """Record the run's hyperparameters (called once at the start of ``fit``)."""

    # --- optional members ----------------------------------------------------------------------
    @property
    def experiment(self) -> Any:
        """The underlying object that writes (a ``SummaryWriter`` for TensorBoard)."""
        return None

    @property
    def save_dir(self) -> str | None:
        """Directory under which this logger writes, if any."""
        return None

    @property
    def log_dir(self) -> str | None:
        """Directory of this run's files, if any (checkpoints default to a subfolder)."""
        return None

    @property
    def group_separator(self) -> str:
        return "/"

    # optional hooks: deliberately concrete no-ops, so subclasses need not implement them
    def log_graph(self, model: torch.nn.Module, input_array: Any = None) -> None:  # noqa: B027
        """Record the model graph (no-op unless the logger supports it)."""

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:  # noqa: B027
        """Called after a checkpoint is saved (2.x hook; no-op here)."""

    def save(self) -> None:
        """Write out anything buffered, pending aggregated metrics first."""
        self._finalize_agg_metrics()

    def finalize(self, status: str) -> None:
        """End of a stage (``"success"``, ``"failed"``, ``"interrupted"``): flush everything.

        The logger stays usable: a later ``log_metrics`` reopens what ``finalize`` closed.
        """
        # flushed here too, not only in ``save``: a user's ``save`` may not call super()
        self._finalize_agg_metrics()
        self.save()

    # --- aggregation of metrics logged at the same step (0.9) ----------------------------------
    def update_agg_funcs(self, agg_key_funcs: Mapping[str, Callable] | None = None,
                         agg_default_func: Callable[[Sequence[float]], float] = _mean) -> None:
        """Change how metrics logged at the same step are reduced."""
        self.__dict__.setdefault("_agg_key_funcs", {}).update(agg_key_funcs or {})
        self._agg_default_func = agg_default_func

    def agg_and_log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Buffer ``metrics`` until the step changes, then log the reduced previous step.

        Called on its own, several dicts sent at one step become one ``log_metrics`` call
        (0.9). The trainer flushes after each of its calls (``log_now``), so its calls are not
        merged.
        """
        # setdefault: a user subclass may skip ``super().__init__()``
        pending = self.__dict__.setdefault("_metrics_to_agg", [])
        if pending and step == self.__dict__.get("_prev_step"):
            pending.append(dict(metrics))
            return
        self._finalize_agg_metrics()
        self._metrics_to_agg = [dict(metrics)]
        self._prev_step = step

    def _finalize_agg_metrics(self) -> None:
        pending = self.__dict__.get("_metrics_to_agg")
        if not pending:
            return
        self._metrics_to_agg = []
        reduced = pending[0] if len(pending) == 1 else _merge_dicts(
            pending, self.__dict__.get("_agg_key_funcs", {}),
            self.__dict__.get("_agg_default_func", _mean))
        self.log_metrics(reduced, self.__dict__.get("_prev_step"))


LightningLoggerBase = Logger


def log_now(logger: Any, metrics: dict[str, float], step: int | None) -> None:
    """Send one trainer log call to ``logger`` the way 0.9.0's trainer did (driver only).

    0.9.0 ``Trainer.log_metrics`` (``trainer/logging.py``) called ``agg_and_log_metrics`` and
    then ``logger.save()``. The base ``save`` flushes what ``agg_and_log_metrics`` holds, so a
    logger that keeps it (ray_lit's own, or a user's that calls ``super().save()``) gets every
    call in ``log_metrics`` at once, in order, with its own step. A 0.9 user's ``save`` (in a
    file that imports ``pytorch_lightning``) that does not call ``super().save()`` flushes
    nothing: that logger gets the calls of one step merged into one ``log_metrics`` call when
    the step changes (one call late), as in 0.9; ``flush_pending`` sends the last step at the
    end of the stage. Any other logger is flushed at once, as 2.x (which has no aggregation)
    sends every call. A logger without ``agg_and_log_metrics`` gets ``log_metrics`` directly.
    """
    agg = getattr(logger, "agg_and_log_metrics", None)
    if agg is None:
        logger.log_metrics(metrics, step)
        return
    agg(metrics, step)
    if _users_save(logger):
        logger.save()
    else:
        # the base ``save`` would do just this; ray_lit's file loggers would also rewrite their
        # files on every call, which 0.9 did and nobody needs
        flush_pending(logger)


def flush_pending(logger: Any) -> None:
    """Send what ``agg_and_log_metrics`` still holds to ``log_metrics`` (end of a stage).

    0.9 lost the last step of a logger whose ``save`` and ``finalize`` do not call super();
    the driver calls this before ``save`` / ``finalize`` so nothing is lost.
    """
    flush = getattr(logger, "_finalize_agg_metrics", None)
    if flush is not None:
        flush()


def _users_save(logger: Any) -> bool:
    """Whether ``logger.save`` is a 0.9 user's own: defined outside ray_lit, in a file written
    for 0.9. A 2.x logger's ``save`` never held metrics back (2.x has no aggregation)."""
    for cls in type(logger).__mro__:
        if "save" in vars(cls):
            # 0.9 loggers decorate it (``@rank_zero_only``): the user's own function counts
            code = getattr(inspect.unwrap(vars(cls)["save"]), "__code__", None)
            return (not cls.__module__.startswith("ray_lit.") and code is not None
                    and written_for_09(code.co_filename))
    return False


# a file that imports Lightning under its 0.9 name (through ray_lit's alias: ``python -m
# ray_lit``, ``ray_lit.compat.install()``); 2.x code imports ``lightning.pytorch`` or ray_lit
_IMPORTS_PL = re.compile(r"^\s*(?:from|import)\s+pytorch_lightning\b", re.MULTILINE)
_WRITTEN_FOR_09: dict[str, bool] = {}


def written_for_09(filename: str) -> bool:
    """Whether the user's source file ``filename`` imports ``pytorch_lightning`` (cached).

    ray_lit serves both Lightning generations with one set of classes; where their semantics
    disagree, how the user's file imports Lightning says which one the code expects
    (docs/lightning_semantics_decisions.md). A file whose source cannot be read (an ``exec``
    string) counts as 2.x code.
    """
    if filename not in _WRITTEN_FOR_09:
        source = "".join(linecache.getlines(filename))
        try:
            # import statements only: a string that holds such a line does not count
            nodes = list(ast.walk(ast.parse(source)))
            modules = [alias.name for node in nodes if isinstance(node, ast.Import)
                       for alias in node.names]
            modules += [node.module or "" for node in nodes
                        if isinstance(node, ast.ImportFrom) and not node.level]
            found = any(m.split(".")[0] == "pytorch_lightning" for m in modules)
        except (SyntaxError, ValueError):  # a notebook cell with magics: read the lines
            found = bool(_IMPORTS_PL.search(source))
        _WRITTEN_FOR_09[filename] = found
    return _WRITTEN_FOR_09[filename]


def _merge_dicts(dicts: Sequence[Mapping[str, Any]], key_funcs: Mapping[str, Callable],
                 default_func: Callable[[Sequence[float]], float]) -> dict[str, Any]:
    """Reduce each key over the dicts that have it (first-seen key order)."""
    keys: dict[str, None] = {}
    for d in dicts:
        keys.update(dict.fromkeys(d))
    merged = {}
    for key in keys:
        values = [_to_number(d[key]) for d in dicts if key in d]
        merged[key] = key_funcs.get(key, default_func)(values)
    return merged


def _to_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.detach().float().mean().item()
    return value


# --- hyperparameter helpers ------------------------------------------------------------------
def _convert_params(params: dict[str, Any] | Namespace | None) -> dict[str, Any]:
    """A plain dict from a dict, a Namespace or None."""
    if params is None:
        return {}
    if isinstance(params, Namespace):
        return vars(params).copy()
    return dict(params)


def _flatten_dict(params: Mapping[str, Any] | Namespace, delimiter: str = "/",
                  parent_key: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; Namespaces nest like dicts."""
    flat: dict[str, Any] = {}
    for key, value in _convert_params(params).items():
        full = f"{parent_key}{delimiter}{key}" if parent_key else str(key)
        if isinstance(value, (Mapping, Namespace)) and value:
            flat.update(_flatten_dict(value, delimiter, full))
        else:
            flat[full] = value
    return flat


def _sanitize_params(params: Mapping[str, Any] | Namespace) -> dict[str, Any]:
    """Values TensorBoard's hparams plugin accepts: bool, int, float, str.

    Callables become their names, Namespaces dicts, one-element tensors numbers, the rest
    ``str(value)``.
    """
    return {key: _sanitize_value(value) for key, value in _convert_params(params).items()}


def _sanitize_value(value: Any) -> Any:
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, Namespace):
        return str(vars(value))
    if callable(value):
        return getattr(value, "__name__", None) or type(value).__name__
    return str(value)


def _yaml_safe(value: Any) -> Any:
    """A structure ``yaml.safe_dump`` can write (nesting kept, unknown objects as strings)."""
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_yaml_safe(v) for v in value]
    if value is None or isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, Enum):
        return _yaml_safe(value.value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if callable(value):
        return getattr(value, "__name__", None) or type(value).__name__
    return str(value)


def _save_hparams_yaml(path: str, hparams: Mapping[str, Any]) -> None:
    import yaml  # ships with ray; imported here so ``import ray_lit.loggers`` stays cheap

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(_yaml_safe(hparams), f, sort_keys=False)
    os.replace(tmp, path)  # a reader never sees a half-written file


def _add_prefix(metrics: Mapping[str, Any], prefix: str, separator: str = "-") -> dict[str, Any]:
    if not prefix:
        return dict(metrics)
    return {f"{prefix}{separator}{key}": value for key, value in metrics.items()}


# --- directory layout of file loggers --------------------------------------------------------
_VERSION_DIR = re.compile(r"^version_(\d+)$")


def _next_version(root_dir: str) -> int:
    """One more than the highest ``version_N`` directory in ``root_dir`` (0 if none)."""
    try:
        entries = os.listdir(root_dir)
    except OSError:
        return 0
    found = [int(m.group(1)) for e in entries if (m := _VERSION_DIR.match(e))
             and os.path.isdir(os.path.join(root_dir, e))]
    return max(found) + 1 if found else 0


class _FileLogger(Logger):
    """A logger that writes under ``save_dir/name/version_N`` (``name`` empty: no name level).

    The version is resolved on first use (scanning existing ``version_*`` directories) and fixed
    from then on, also in pickled copies.
    """

    NAME_HPARAMS_FILE = "hparams.yaml"

    def __init__(self, save_dir: str | os.PathLike, name: str | None = "lightning_logs",
                 version: int | str | None = None, prefix: str = "") -> None:
        super().__init__()
        self._save_dir = os.fspath(save_dir)
        self._name = name or ""
        self._version = version
        self._prefix = prefix
        self.hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = _next_version(self.root_dir)
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        """``save_dir/name``: the parent of the version directories."""
        return os.path.join(self._save_dir, self._name) if self._name else self._save_dir

    @property
    def log_dir(self) -> str:
        version = self.version
        folder = version if isinstance(version, str) else f"version_{version}"
        return os.path.join(self.root_dir, folder)

    def _update_hparams(self, params: dict[str, Any] | Namespace | None) -> dict[str, Any]:
        """Merge ``params`` into ``self.hparams`` and rewrite ``hparams.yaml``."""
        params = _convert_params(params)
        self.hparams.update(params)
        os.makedirs(self.log_dir, exist_ok=True)
        _save_hparams_yaml(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), self.hparams)
        return params

    def __getstate__(self) -> dict[str, Any]:
        self.version  # noqa: B018 - resolve now, so every copy writes to the same directory
        state = dict(self.__dict__)
        state["_experiment"] = None  # writers hold file handles; reopened lazily
        return state
