"""The value rules of every Trainer option: one table, checked once by ``TrainerConfig``.

Each option has one ``OptionRule``: a predicate over the value as the user passed it, and the
fix the error message gives. ``check_option_values`` runs the whole table before the config
normalises anything (``fast_dev_run``, 0.9 ``gpus``), so a wrong type is refused here with a
``MisconfigurationException`` naming the option and the fix, never found later as a
``TypeError`` deep inside the loop or on a worker. Checks that relate several options (elastic
ranges, snapshots with a sharded strategy) stay in ``TrainerConfig.validate``.

A new ``TrainerConfig`` field without a rule fails ``check_option_values`` (and the sweep test
``tests/unit/test_bad_input_sweep.py``), so no option goes unchecked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray_lit.errors import MisconfigurationException

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "tpu")
# storage_path schemes pyarrow.fs can open (each needs pyarrow built with that file system)
STORAGE_SCHEMES = ("file", "s3", "s3a", "gs", "gcs", "hdfs", "viewfs")


@dataclass(frozen=True)
class OptionRule:
    """What one Trainer option accepts.

    Attributes:
        accepts: True for a value the option takes.
        fix: what to pass instead, for the error message ("use ...").
    """

    accepts: Callable[[Any], bool]
    fix: str


# --- predicates -------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _int_at_least(low: int, none: bool = False) -> Callable[[Any], bool]:
    return lambda v: (none and v is None) or (_is_int(v) and v >= low)


def _seconds(low: float, inclusive: bool) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and (v >= low if inclusive else v > low)


def _flag(value: Any) -> bool:
    # 0 / 1 from a command line or an old config are flags too
    return isinstance(value, bool) or (_is_int(value) and value in (0, 1))


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (str, type(None), bool)) and v in choices


def _path(none: bool = True) -> Callable[[Any], bool]:
    return lambda v: (none and v is None) or (
        isinstance(v, (str, os.PathLike)) and os.fspath(v) != "")


def _limit(value: Any) -> bool:
    """A count (int >= 0), a fraction in [0, 1], or a whole float count (0.9: 1e50)."""
    if _is_int(value):
        return value >= 0
    return _is_number(value) and (0.0 <= value <= 1.0 or (value > 1 and value.is_integer()))


def _interval(value: Any) -> bool:
    if _is_int(value):
        return value >= 1
    return _is_number(value) and 0.0 < value <= 1.0


def _accumulation(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(_is_int(e) and e >= 0 and _is_int(k) and k >= 1
                                   for e, k in value.items())
    return _is_int(value) and value >= 1


def _gpus(value: Any) -> bool:
    # -1 ("every GPU of this machine") has no meaning on a cluster: say how many
    if value is None or (_is_int(value) and value >= 0):
        return True
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        return bool(items) and all(v.isdigit() for v in items)
    return isinstance(value, (list, tuple)) and bool(value) and all(
        _is_int(v) and v >= 0 for v in value)


def _num_workers(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return len(value) == 2 and all(_is_int(v) for v in value) and 1 <= value[0] <= value[1]
    return _is_int(value) and value >= 0


def _resources(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and _is_number(v) and v >= 0 for k, v in value.items()))


def _instances(*kinds: str) -> Callable[[Any], bool]:
    """``value`` is an instance of one of the named ray_lit classes (imported when checked:
    this module is imported by ``config``, before the callback modules)."""

    def accepts(value: Any) -> bool:
        from ray_lit.callbacks.base import Callback
        from ray_lit.callbacks.early_stopping import EarlyStopping
        from ray_lit.callbacks.model_checkpoint import ModelCheckpoint

        known = {"Callback": Callback, "EarlyStopping": EarlyStopping,
                 "ModelCheckpoint": ModelCheckpoint}
        return isinstance(value, tuple(known[k] for k in kinds))

    return accepts


def _is_callback(value: Any) -> bool:
    # a ray_lit Callback, or one built on another package's ``Callback`` (the real
    # Lightning's: ``ray_lit.adoption`` adopts or refuses it with its own message)
    return _instances("Callback")(value) or any(
        c.__name__ == "Callback" for c in type(value).__mro__)


def _callbacks(value: Any) -> bool:
    if value is None or _is_callback(value):
        return True
    return isinstance(value, (list, tuple)) and all(_is_callback(cb) for cb in value)


def _is_logger(value: Any) -> bool:
    return callable(getattr(value, "log_metrics", None))


def _logger(value: Any) -> bool:
    if value is None or isinstance(value, bool) or _is_logger(value):
        return True
    return isinstance(value, (list, tuple)) and all(_is_logger(v) for v in value)


def _strategy(value: Any) -> bool:
    from ray_lit.strategies import STRATEGY_NAMES, Strategy

    return value is None or isinstance(value, Strategy) or (
        isinstance(value, str) and value in STRATEGY_NAMES)


def _strategy_fix() -> str:
    from ray_lit.strategies import STRATEGY_NAMES

    return (f"use one of {', '.join(repr(n) for n in STRATEGY_NAMES)}, or a "
            "ray_lit.strategies.Strategy object (e.g. DDPStrategy(find_unused_parameters=True))")


def _hang_timeout(value: Any) -> bool:
    if value is None or isinstance(value, str):
        return value in (None, "auto")
    return _is_number(value) and value > 0


def _resume(value: Any) -> bool:
    return value is None or (isinstance(value, (str, os.PathLike)) and os.fspath(value) != "")


def _run_name(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip("/ ") != "")


_BOOL = "use True or False"
_LIMIT = ("use an int >= 0 (a number of batches) or a float in [0.0, 1.0] (a fraction of "
          "them)")

# every Trainer option (``TrainerConfig`` field) -> its rule
OPTION_RULES: dict[str, OptionRule] = {
    # the loop
    "max_epochs": OptionRule(_int_at_least(0, none=True),
                             "use an int >= 0, or None (1000, or unbounded with max_steps)"),
    "min_epochs": OptionRule(_int_at_least(0, none=True), "use an int >= 0, or None"),
    "max_steps": OptionRule(_int_at_least(-1, none=True),
                            "use an int >= 0, or -1 / None for no step limit"),
    "min_steps": OptionRule(_int_at_least(0, none=True), "use an int >= 0, or None"),
    "limit_train_batches": OptionRule(_limit, _LIMIT),
    "limit_val_batches": OptionRule(_limit, _LIMIT + "; 0 turns validation off"),
    "limit_test_batches": OptionRule(_limit, _LIMIT),
    "limit_predict_batches": OptionRule(_limit, _LIMIT),
    "val_check_interval": OptionRule(
        _interval, "use an int >= 1 (training batches between validations) or a float in "
                   "(0.0, 1.0] (a fraction of the epoch); to turn validation off set "
                   "limit_val_batches=0"),
    "check_val_every_n_epoch": OptionRule(
        _int_at_least(1, none=True), "use an int >= 1, or None (validate by "
                                     "val_check_interval only)"),
    "num_sanity_val_steps": OptionRule(
        _int_at_least(-1), "use an int >= 0, or -1 for every validation batch"),
    "gradient_clip_val": OptionRule(lambda v: v is None or (_is_number(v) and v >= 0),
                                    "use a number >= 0 (0 or None: no clipping)"),
    "gradient_clip_algorithm": OptionRule(_one_of("norm", "value", None),
                                          "use 'norm' or 'value'"),
    "accumulate_grad_batches": OptionRule(
        _accumulation, "use an int >= 1, or a non-empty dict {epoch (int >= 0): k (int >= 1)}"),
    # precision: validate_precision names the values (it also knows the device)
    "precision": OptionRule(lambda v: isinstance(v, (int, float, str)) and
                            not isinstance(v, bool), "use 32, 16 or 'bf16'"),
    "fast_dev_run": OptionRule(lambda v: isinstance(v, bool) or (_is_int(v) and v >= 0),
                               "use True (one batch) or an int >= 0 (that many batches)"),
    "overfit_batches": OptionRule(_limit, _LIMIT + "; 0 turns it off"),
    "terminate_on_nan": OptionRule(_flag, _BOOL),
    "deterministic": OptionRule(lambda v: v is None or _flag(v) or v == "warn",
                                "use True, False or 'warn'"),
    "benchmark": OptionRule(lambda v: v is None or _flag(v),
                            "use True, False or None (leave cudnn.benchmark alone)"),
    "sync_batchnorm": OptionRule(_flag, _BOOL),
    # what surrounds the loop
    "callbacks": OptionRule(_callbacks, "use a list of ray_lit.Callback instances (subclass "
                                        "ray_lit.Callback for your own)"),
    "logger": OptionRule(_logger, "use True (TensorBoard), False, a Logger (an object with "
                                  "log_metrics, e.g. ray_lit.loggers.CSVLogger) or a list of "
                                  "them"),
    "default_root_dir": OptionRule(_path(), "use a directory path (str or os.PathLike) or None "
                                            "(the current directory)"),
    "enable_checkpointing": OptionRule(lambda v: _flag(v) or _instances("ModelCheckpoint")(v),
                                       "use True, False or (0.9) a ModelCheckpoint"),
    "early_stop_callback": OptionRule(
        lambda v: v is None or _flag(v) or _instances("EarlyStopping")(v),
        "use True (EarlyStopping on val_loss), False, or an EarlyStopping"),
    "enable_progress_bar": OptionRule(_flag, _BOOL),
    "enable_model_summary": OptionRule(_flag, _BOOL),
    "log_every_n_steps": OptionRule(_int_at_least(1), "use an int >= 1"),
    "resume_from_checkpoint": OptionRule(_path(), "use a checkpoint path (str) or None"),
    "gpus": OptionRule(_gpus, "use a number of GPU workers (int >= 0), a list of GPU indices, "
                              "or a string such as '0,1' (-1, every GPU of one machine, has "
                              "no meaning on a cluster: say how many)"),
    # distributed (ray_lit's own)
    "num_workers": OptionRule(_num_workers, "use 0 (in process), N >= 1 Ray workers, or "
                                            "(min, max) with 1 <= min <= max (elastic)"),
    "use_gpu": OptionRule(_flag, _BOOL),
    "accelerator": OptionRule(_one_of(*ACCELERATORS), "use 'cpu', 'gpu', 'tpu' or 'auto'"),
    "resources_per_worker": OptionRule(
        _resources, "use a dict of Ray resource names to amounts >= 0, e.g. {'CPU': 2, "
                    "'GPU': 1}, or None"),
    "placement_strategy": OptionRule(_one_of(*PLACEMENT_STRATEGIES),
                                     f"use one of {PLACEMENT_STRATEGIES}"),
    "strategy": OptionRule(_strategy, ""),  # its fix lists the strategies (_strategy_fix)
    "max_failures": OptionRule(_int_at_least(-1), "use an int >= 0, or -1 for unlimited"),
    "storage_path": OptionRule(_path(), "use a local directory or an s3:// / gs:// / hdfs:// "
                                        "/ file:// URI, or None (default_root_dir)"),
    "run_name": OptionRule(_run_name, "use a non-empty string (the run's directory under "
                                      "storage_path), or None for a generated one"),
    "resume": OptionRule(_resume, "use 'auto' (the latest committed checkpoint of run_name), "
                                  "'never', or a checkpoint path"),
    "checkpoint_every_n_steps": OptionRule(
        _int_at_least(1, none=True), "use an int >= 1 (optimizer steps between "
                                     "fault-tolerance checkpoints) or None (at epoch ends only)"),
    "snapshot_every_n_steps": OptionRule(
        _int_at_least(1, none=True), "use an int >= 1 (optimizer steps between in-memory "
                                     "snapshots) or None"),
    "keep_checkpoints": OptionRule(_int_at_least(1), "use an int >= 1 (committed "
                                   "fault-tolerance checkpoints kept; the newest is never "
                                   "deleted)"),
    "storage_retry_timeout_s": OptionRule(
        _seconds(0, inclusive=True), "use a number of seconds >= 0 (how long checkpoint writes "
                                     "retry a failing storage_path before the run stops; 0 "
                                     "tries once)"),
    "find_unused_parameters": OptionRule(_flag, _BOOL),
    "gather_step_outputs": OptionRule(_flag, _BOOL),
    "process_group_timeout_s": OptionRule(
        _seconds(0, inclusive=False), "use a number of seconds > 0 (how long a collective waits "
                                      "for a missing peer)"),
    "worker_hang_timeout_s": OptionRule(
        _hang_timeout, "use 'auto' (max(60 s, 20x the slowest step)), a number of seconds > 0, "
                       "or None (no hang detection)"),
    "placement_timeout_s": OptionRule(
        _seconds(0, inclusive=True), "use a number of seconds >= 0 (how long to wait for the "
                                     "workers' resources)"),
    "elastic_batch": OptionRule(_one_of("keep_global_batch", "keep_per_worker"),
                                "use 'keep_global_batch' or 'keep_per_worker'"),
}

# 0.9 aliases are checked before they are translated (their translation accepts anything)
ALIAS_RULES: dict[str, OptionRule] = {
    "checkpoint_callback": OPTION_RULES["enable_checkpointing"],
    "row_log_interval": OPTION_RULES["log_every_n_steps"],
    "weights_summary": OptionRule(_one_of(None, "top", "full"), "use 'top', 'full' or None"),
    "progress_bar_refresh_rate": OptionRule(
        lambda v: v is None or _int_at_least(0)(v) or isinstance(v, bool),
        "use an int >= 0 (0 hides the bar)"),
}


def option_error(name: str, value: Any, fix: str) -> MisconfigurationException:
    """The one shape of a bad-option message: ``Trainer(name=value): fix.``"""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return MisconfigurationException(f"Trainer({name}={shown}): {fix}.")


def check_option(name: str, value: Any, rules: dict[str, OptionRule] = OPTION_RULES) -> None:
    """Refuse ``value`` for option ``name`` unless its rule accepts it.

    Raises:
        MisconfigurationException: naming the option, the value and the fix.
    """
    rule = rules[name]
    try:
        accepted = rule.accepts(value)
    except Exception:  # a value whose comparisons raise (an array, a tensor) is refused too
        accepted = False
    if not accepted:
        fix = _strategy_fix() if name == "strategy" else rule.fix
        raise option_error(name, value, fix)


def check_option_values(values: dict[str, Any]) -> None:
    """Check every option of ``values`` (a ``TrainerConfig`` as a dict) against its rule.

    Raises:
        MisconfigurationException: the first option whose value its rule refuses.
        KeyError: an option has no rule (a new ``TrainerConfig`` field needs one).
    """
    missing = sorted(set(values) - set(OPTION_RULES))
    if missing:
        raise KeyError(f"Trainer options without a rule in ray_lit.option_rules: {missing}")
    for name, value in values.items():
        check_option(name, value)


def check_storage_path(value: Any) -> None:
    """A ``storage_path`` that can never work, refused when the Trainer is built: an unknown
    URI scheme, a file system this ``pyarrow`` lacks, or a local path under a file. (Whether
    the storage answers and takes writes is checked before workers start, in ``fit``.)

    Raises:
        MisconfigurationException: naming ``storage_path`` and the fix.
    """
    if value is None:
        return
    path = os.fspath(value)
    if "://" not in path:
        _check_local_parent(path)
        return
    scheme = path.split("://", 1)[0].lower()
    if scheme not in STORAGE_SCHEMES:
        raise option_error("storage_path", value, (
            f"{scheme}:// is not a file system ray_lit can write to; use a local directory or "
            "an s3://, gs://, hdfs:// or file:// URI"))
    if scheme == "file":
        _check_local_parent(path.split("://", 1)[1] or "/")
        return
    needed = {"s3": "S3FileSystem", "s3a": "S3FileSystem", "gs": "GcsFileSystem",
              "gcs": "GcsFileSystem", "hdfs": "HadoopFileSystem",
              "viewfs": "HadoopFileSystem"}[scheme]
    try:
        import pyarrow.fs as pafs

        getattr(pafs, needed)
    except (ImportError, AttributeError) as err:
        raise option_error("storage_path", value, (
            f"{scheme}:// needs pyarrow with {needed} ({err}); pip install a pyarrow build "
            "that has it, or use a local directory")) from err


def _check_local_parent(path: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory (else nothing under it
    can ever be created)."""
    current = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent
    if not os.path.isdir(current):
        raise option_error("storage_path", path, (
            f"{current} is a file, so no directory can be created under it; use a directory "
            "path"))
