"""Trainer options, validated once (before any step runs or any worker starts).

``TrainerConfig.from_options`` maps 0.9 aliases onto their 2.x names, rejects unknown options
with a suggestion, and checks every value; its messages name the option and the fix.
"""

from __future__ import annotations

import difflib
import numbers
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from ray_lit.errors import MisconfigurationException
from ray_lit.option_rules import (
    ALIAS_RULES,
    check_option,
    check_option_values,
    check_storage_path,
)

# 0.9 name -> 2.x / ray_lit name
_ALIASES = {
    "checkpoint_callback": "enable_checkpointing",
    "row_log_interval": "log_every_n_steps",
    "weights_summary": "enable_model_summary",
    "progress_bar_refresh_rate": "enable_progress_bar",
}
# accepted for compatibility; they change nothing here (with the reason)
_IGNORED = {
    "distributed_backend": "ray_lit always runs one DDP rank per Ray worker",
    "amp_backend": "native torch.autocast is always used",
    "amp_level": "native torch.autocast is always used",
    "process_position": "one progress bar runs on the driver",
    "replace_sampler_ddp": "ray_lit always shards dataloaders per rank",
    "use_distributed_sampler": "ray_lit always shards dataloaders per rank",
    "prepare_data_per_node": "prepare_data runs once per node",
    "log_save_interval": "loggers flush on their own cadence",
    "flush_logs_every_n_steps": "loggers flush on their own cadence",
    "auto_select_gpus": "Ray assigns GPUs to workers",
    "profiler": "profiling is not built in; use the torch profiler in a callback",
    "weights_save_path": "use ModelCheckpoint(dirpath=...)",
    "num_nodes": "Ray places workers on nodes; set num_workers",
    "num_processes": "set num_workers",
    "devices": "set num_workers (and use_gpu)",
    "reload_dataloaders_every_epoch": "dataloaders are built once per fit",
    "track_grad_norm": "log grad norms from on_after_backward",
}
_UNSUPPORTED = {
    "truncated_bptt_steps": "truncated BPTT is not supported; split sequences in training_step",
    "auto_lr_find": "the LR finder is not built in; sweep the learning rate with ray_lit.tune",
    "auto_scale_batch_size": "batch-size scaling is not built in; sweep it with ray_lit.tune",
    "train_dataloaders": "dataloaders are not Trainer options; pass them to "
                         "trainer.fit(model, train_dataloaders=...)",
    "val_dataloaders": "dataloaders are not Trainer options; pass them to "
                       "trainer.fit(model, val_dataloaders=...)",
}

# options applied over every Trainer's own for the current run (``python -m ray_lit`` /
# ``ray_lit.compat.install``): the command line knows where to run, the script does not
_RUN_OVERRIDES: dict[str, Any] = {}


def run_overrides() -> dict[str, Any]:
    """The run-scoped Trainer options now in force (a copy)."""
    return dict(_RUN_OVERRIDES)


def set_run_overrides(options: dict[str, Any]) -> None:
    """Replace the run-scoped Trainer options (``{}`` clears them)."""
    _RUN_OVERRIDES.clear()
    _RUN_OVERRIDES.update(options)


@dataclass(frozen=True)
class TuneSpec:
    """How a run inside a Ray Tune trial reports (set by ``ray_lit.tune``, never a user
    option): the workers read it with the rest of the config.

    Attributes:
        checkpoint_root: where each report's checkpoint is written (the trial's directory).
        report_fn: the driver-side function that hands metrics and checkpoint to Tune.
        restore_lr_from_config: PBT exploit: the new config's learning rate replaces the one
            restored from the checkpoint.
    """

    checkpoint_root: str
    report_fn: Any = None
    restore_lr_from_config: bool = False


@dataclass
class TrainerConfig:
    """Every Trainer option with its default (see the README's option table)."""

    # the loop
    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int | None = None
    min_steps: int | None = None
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    limit_test_batches: int | float = 1.0
    limit_predict_batches: int | float = 1.0
    val_check_interval: int | float = 1.0
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int = 2
    gradient_clip_val: float = 0.0
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int | dict = 1
    precision: int | str = 32
    fast_dev_run: bool | int = False
    overfit_batches: int | float = 0.0
    terminate_on_nan: bool = False
    deterministic: bool = False
    benchmark: bool | None = None
    sync_batchnorm: bool = False
    # what surrounds the loop
    callbacks: list = field(default_factory=list)
    logger: Any = True
    default_root_dir: str | None = None
    enable_checkpointing: bool = True
    early_stop_callback: Any = False
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    log_every_n_steps: int = 50
    resume_from_checkpoint: str | None = None
    gpus: int | None = None
    # distributed (ray_lit's own)
    num_workers: int | tuple = 0
    use_gpu: bool = False
    accelerator: str = "auto"
    resources_per_worker: dict | None = None
    placement_strategy: str = "PACK"
    strategy: Any = "auto"  # a name of ray_lit.strategies or a Strategy object
    max_failures: int = 3
    storage_path: str | None = None
    run_name: str | None = None
    resume: str = "auto"
    checkpoint_every_n_steps: int | None = None
    snapshot_every_n_steps: int | None = None
    keep_checkpoints: int = 2
    storage_retry_timeout_s: float = 300.0
    find_unused_parameters: bool = False
    gather_step_outputs: bool = False
    process_group_timeout_s: float = 300.0
    worker_hang_timeout_s: float | str | None = "auto"
    placement_timeout_s: float = 60.0
    elastic_batch: str = "keep_global_batch"
    # internal: set by ray_lit.tune for a trial's run (not accepted as a Trainer option)
    tune: TuneSpec | None = field(default=None, metadata={"internal": True})

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainerConfig:
        """Build and validate a config from ``Trainer(**options)``.

        Lightning's ways of asking for several processes (0.9 ``distributed_backend="ddp_cpu",
        num_processes=N``, ``gpus=N``, 2.x ``devices=N`` with ``strategy="ddp"`` /
        ``accelerator=...``) become ``num_workers`` Ray workers; the run-scoped options of
        ``python -m ray_lit`` / ``ray_lit.compat.install`` are applied last.
        """
        known = {f.name for f in fields(cls) if not f.metadata.get("internal")}
        options = dict(options)
        values: dict[str, Any] = _map_process_request(options)
        for name, value in options.items():
            resolved = _resolve_option(name, value, known)
            if resolved is None:
                continue
            name, value = resolved
            if name == "num_workers" and values.get("num_workers") not in (None, value):
                raise MisconfigurationException(
                    f"Trainer(num_workers={value!r}) disagrees with the "
                    f"{values['num_workers']} processes asked for by "
                    f"{_describe_request(options)}; drop one of them.")
            values[name] = value
        # the run's options (``python -m ray_lit --trainer-options``) speak the same names,
        # 0.9 aliases included
        overrides: dict[str, Any] = {}
        for name, value in run_overrides().items():
            resolved = _resolve_option(name, value, known)
            if resolved is not None:
                overrides[resolved[0]] = resolved[1]
        if "num_workers" in overrides or "use_gpu" in overrides:
            values.pop("gpus", None)  # the run's placement replaces the script's own
        values.update(overrides)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Check every option against its rule (``ray_lit.option_rules``), then normalise
        (``fast_dev_run``, ``overfit_batches``, 0.9 ``gpus``) and check what relates several
        options. Runs on the driver when the Trainer is built, before any worker starts.

        Raises:
            MisconfigurationException: naming the option and the fix.
        """
        self._plain_numbers()
        check_option_values({f.name: getattr(self, f.name) for f in fields(self)
                             if not f.metadata.get("internal")})
        check_storage_path(self.storage_path)
        if self.callbacks is None:
            self.callbacks = []
        elif not isinstance(self.callbacks, list):
            self.callbacks = list(self.callbacks) if isinstance(self.callbacks, tuple) else [
                self.callbacks]
        if self.gradient_clip_algorithm is None:  # 2.x's default
            self.gradient_clip_algorithm = "norm"
        if self.fast_dev_run:
            n = 1 if self.fast_dev_run is True else int(self.fast_dev_run)
            self.limit_train_batches = self.limit_val_batches = self.limit_test_batches = n
            self.limit_predict_batches = n
            self.max_epochs, self.num_sanity_val_steps, self.val_check_interval = 1, 0, 1.0
            self.max_steps = n
        if self.max_epochs is None:
            self.max_epochs = 1000 if self.max_steps in (None, -1) else 2**31 - 1
        for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                     "limit_predict_batches", "overfit_batches"):
            setattr(self, name, _whole_count(getattr(self, name)))
        if self.overfit_batches:
            self.limit_train_batches = self.limit_val_batches = self.limit_test_batches = \
                self.overfit_batches
        from ray_lit.loop.optimization import validate_precision

        validate_precision(self.precision, "cuda" if self.use_gpu else "cpu")
        self._validate_distributed()

    def _plain_numbers(self) -> None:
        """NumPy scalars (a Tune search space samples them) become Python numbers: the rules
        and the loop take ``int`` / ``float``."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
                continue
            setattr(self, f.name, int(value) if isinstance(value, numbers.Integral)
                    else float(value))

    def _validate_distributed(self) -> None:
        if self.gpus:
            # 0.9: gpus=N means N workers with one GPU each
            count = len(self.gpus) if isinstance(self.gpus, (list, tuple)) else \
                self.gpus if isinstance(self.gpus, int) else len(str(self.gpus).split(","))
            if not self.num_workers:
                self.num_workers = count
            self.use_gpu = True
        if self.accelerator in ("gpu", "cuda"):
            self.use_gpu = True
        if self.accelerator == "cpu" and self.use_gpu:
            raise MisconfigurationException(
                "accelerator='cpu' and use_gpu=True exclude each other: drop use_gpu, or set "
                "accelerator='gpu'.")
        if self.accelerator == "tpu" and self.use_gpu:
            raise MisconfigurationException("accelerator='tpu' and use_gpu=True exclude each "
                                            "other; pick one.")
        if isinstance(self.num_workers, list):
            self.num_workers = tuple(self.num_workers)
        if self.snapshot_every_n_steps is not None:
            if not self.num_workers:
                raise MisconfigurationException(
                    "snapshot_every_n_steps keeps in-memory snapshots on Ray workers for "
                    "recovery after a lost worker; with num_workers=0 there are none. Set "
                    "num_workers, or drop snapshot_every_n_steps.")
            from ray_lit.strategies import shards_state
            from ray_lit.strategies.fsdp import FSDPStrategy

            if shards_state(self.strategy) and not (
                    self.strategy == "fsdp" or isinstance(self.strategy, FSDPStrategy)):
                # a peer snapshot keeps the replicated tensors, or FSDP's DTensor shards
                # (``checkpoint.shard_ring``); another sharded strategy's state is neither
                raise MisconfigurationException(
                    f"snapshot_every_n_steps with strategy={self.strategy!r}: in-memory peer "
                    "snapshots know replicated parameters (DDP) and FSDPStrategy's shards, "
                    "not this strategy's. Drop snapshot_every_n_steps (fault-tolerance "
                    "checkpoints in storage, checkpoint_every_n_steps, still work).")

    @property
    def distributed(self) -> bool:
        return bool(self.num_workers)


# 0.9 ``distributed_backend`` values (1.x: ``accelerator=``) and 2.x ``strategy`` names that ask
# for one process per device; ray_lit gives each one a Ray worker
_DDP_NAMES = ("ddp", "ddp_spawn", "ddp_cpu", "ddp2", "dp", "ddp_fork", "ddp_notebook",
              "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")
_PROCESS_OPTIONS = ("distributed_backend", "num_processes", "devices", "num_nodes", "strategy")


def _describe_request(options: dict[str, Any]) -> str:
    shown = [f"{k}={options[k]!r}" for k in (*_PROCESS_OPTIONS, "gpus", "accelerator")
             if options.get(k) not in (None, "auto")]
    return "Trainer(" + ", ".join(shown) + ")"


def _count(name: str, value: Any) -> int | None:
    """How many devices ``devices=`` / ``num_processes=`` asks for (None: "auto" / unset)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str):
        value = value.strip()
        if "," in value:
            return len([v for v in value.split(",") if v.strip()])
        if value.lstrip("-").isdigit():
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1:
        raise MisconfigurationException(f"Trainer({name}={value!r}): use a count >= 1.")
    if value == -1:
        raise MisconfigurationException(
            f"Trainer({name}=-1) means 'every device of this machine'; ray_lit places workers "
            "on a cluster, so say how many: Trainer(num_workers=N) (python -m ray_lit "
            "--workers N).")
    return value


def _resolve_option(name: str, value: Any, known: set[str]) -> tuple[str, Any] | None:
    """One ``Trainer`` option as a config field: a 0.9 alias translated, an ignored one
    warned about (None), an unsupported one or an unknown name refused."""
    if name in _UNSUPPORTED:
        if value in (None, False, 0):
            return None
        raise MisconfigurationException(f"Trainer({name}=...): {_UNSUPPORTED[name]}.")
    if name in _IGNORED:
        if value not in (None, False):
            warnings.warn(f"Trainer({name}={value!r}) has no effect: {_IGNORED[name]}.",
                          stacklevel=4)
        return None
    if name in _ALIASES:
        check_option(name, value, ALIAS_RULES)
        target = _ALIASES[name]
        value = _translate_alias(name, value)
        if target is None:
            return None
        name = target
    if name not in known:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise MisconfigurationException(f"Trainer got an unknown option {name!r}.{hint}")
    return name, value


def _map_process_request(options: dict[str, Any]) -> dict[str, Any]:
    """Turn Lightning's several-processes options into ray_lit ones (pops what it consumes).

    A user who asked for N processes gets N Ray workers, never silently one process.

    Returns:
        options for ``TrainerConfig``: ``num_workers`` (and ``find_unused_parameters``) when
        the request named several processes.

    Raises:
        MisconfigurationException: ``devices=-1`` or another count that cannot be mapped, or
            the 0.9 ``horovod`` backend.
    """
    backend = options.get("distributed_backend")
    accelerator = options.get("accelerator")
    if isinstance(accelerator, str) and accelerator in _DDP_NAMES:  # 1.x: accelerator="ddp"
        backend = backend or options.pop("accelerator")
    strategy = options.get("strategy")
    strategy = strategy if isinstance(strategy, str) else None
    if backend == "horovod" or strategy == "horovod":
        raise MisconfigurationException(
            "Horovod is not supported: ray_lit runs DDP on Ray workers. Drop "
            "distributed_backend='horovod' and set Trainer(num_workers=N).")
    named = [n for n in (backend, strategy) if isinstance(n, str)]
    nodes = _count("num_nodes", options.get("num_nodes")) or 1
    devices = _count("devices", options.get("devices"))
    processes = _count("num_processes", options.get("num_processes"))
    values: dict[str, Any] = {}
    if options.get("gpus"):
        count = None  # gpus=N maps to N GPU workers in validate(); only the nodes multiply
        if nodes > 1:
            gpus = options["gpus"]
            count = (gpus if isinstance(gpus, int) else _count("gpus", gpus) or 1) * nodes
    elif devices is not None:
        count = devices * nodes
    elif processes is not None and (processes > 1 or nodes > 1):
        count = processes * nodes
    elif nodes > 1:
        count = nodes
    else:
        count = None
    consumed = count is not None or bool(named and any(n in _DDP_NAMES for n in named))
    if count is not None and count > 1:
        values["num_workers"] = count
    if "dp" in named and (count or options.get("gpus")):
        warnings.warn(
            "distributed_backend='dp' splits each batch over the GPUs of one process; ray_lit "
            "runs one DDP worker per GPU instead, each with whole batches (the global batch "
            "grows by the number of workers).", stacklevel=4)
    if "ddp_find_unused_parameters_true" in named:
        values["find_unused_parameters"] = True
    if consumed:
        for name in _PROCESS_OPTIONS:
            if name != "strategy":
                options.pop(name, None)
    if strategy in _DDP_NAMES:
        # Lightning's DDP flavours all mean one DDP rank per process: ray_lit's DDP ("auto");
        # other strategies (fsdp, a Strategy object) are the Trainer's to check
        options.pop("strategy")
    return values


def _translate_alias(name: str, value: Any) -> Any:
    if name == "progress_bar_refresh_rate":
        return bool(value)
    if name == "weights_summary":
        return value is not None
    return value


def _whole_count(value: int | float) -> int | float:
    """A whole float above 1 is that many batches (0.9: ``limit_test_batches=1e50`` means
    "all batches"); the rule table already refused anything else out of range."""
    if isinstance(value, float) and value > 1 and value.is_integer():
        return int(value)
    return value


# --- the command line (0.9 ``Trainer.add_argparse_args``) ---------------------------------------
def _gpus_type(value: str) -> int | str:
    return value if "," in value else int(value)


def _precision_type(value: str) -> int | str:
    return int(value) if value.isdigit() else value


# (name, parser, default): the 0.9 Trainer options a script may set on its command line, and
# ray_lit's own. ``--num_workers`` is deliberately absent: scripts define it for their
# DataLoaders; ray_lit's worker count is ``--ray_workers``.
ARGPARSE_OPTIONS: list[tuple[str, Any, Any]] = [
    ("logger", bool, True),
    ("checkpoint_callback", bool, True),
    ("early_stop_callback", bool, False),
    ("default_root_dir", str, None),
    ("gradient_clip_val", float, 0.0),
    ("process_position", int, 0),
    ("num_nodes", int, 1),
    ("num_processes", int, 1),
    ("gpus", _gpus_type, None),
    ("auto_select_gpus", bool, False),
    ("progress_bar_refresh_rate", int, 1),
    ("overfit_batches", "int_or_float", 0.0),
    ("track_grad_norm", int, -1),
    ("check_val_every_n_epoch", int, 1),
    ("fast_dev_run", bool, False),
    ("accumulate_grad_batches", int, 1),
    ("max_epochs", int, 1000),
    ("min_epochs", int, 1),
    ("max_steps", int, None),
    ("min_steps", int, None),
    ("limit_train_batches", "int_or_float", 1.0),
    ("limit_val_batches", "int_or_float", 1.0),
    ("limit_test_batches", "int_or_float", 1.0),
    ("val_check_interval", "int_or_float", 1.0),
    ("log_save_interval", int, 100),
    ("row_log_interval", int, 50),
    ("distributed_backend", str, None),
    ("sync_batchnorm", bool, False),
    ("precision", _precision_type, 32),
    ("weights_summary", str, "top"),
    ("weights_save_path", str, None),
    ("num_sanity_val_steps", int, 2),
    ("truncated_bptt_steps", int, None),
    ("resume_from_checkpoint", str, None),
    ("benchmark", bool, False),
    ("deterministic", bool, False),
    ("reload_dataloaders_every_epoch", bool, False),
    ("auto_lr_find", bool, False),
    ("replace_sampler_ddp", bool, True),
    ("terminate_on_nan", bool, False),
    ("auto_scale_batch_size", bool, False),
    ("prepare_data_per_node", bool, True),
    ("amp_backend", str, "native"),
    ("amp_level", str, "O2"),
    # ray_lit's own
    ("ray_workers", int, None),
    ("use_gpu", bool, False),
    ("storage_path", str, None),
    ("max_failures", int, 3),
]
# argparse names that are not Trainer option names
_ARGPARSE_RENAMES = {"ray_workers": "num_workers"}


def add_argparse_args(parser: Any) -> Any:
    """A parser with ``parser``'s options and the Trainer's (``--max_epochs``, ``--gpus``, ...).

    Options the script already defines are left as the script defined them.
    """
    from argparse import ArgumentParser

    from ray_lit.core.cli_args import add_argument, int_or_float

    out = ArgumentParser(parents=[parser], add_help=False)
    for name, parse, default in ARGPARSE_OPTIONS:
        parse = int_or_float if parse == "int_or_float" else parse
        help_text = ("Ray workers (DDP ranks); 0 trains in this process" if name == "ray_workers"
                     else "ray_lit Trainer option (see the README)")
        add_argument(out, name, parse, default, help_text)
    return out


def options_from_argparse(args: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """Trainer options from a parsed ``Namespace``: the ones that differ from their
    command-line defaults, then ``overrides``.

    A script's own ``num_workers`` (its DataLoader processes) is never read: the worker
    count comes from ``--ray_workers`` or an explicit ``num_workers=`` override.
    """
    params = vars(args) if not isinstance(args, dict) else dict(args)
    options: dict[str, Any] = {}
    for name, _, default in ARGPARSE_OPTIONS:
        if name in params and params[name] != default:
            options[_ARGPARSE_RENAMES.get(name, name)] = params[name]
    options.update(overrides)
    return options
