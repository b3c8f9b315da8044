"""Trainer options, validated once (before any step runs or any worker starts).

``TrainerConfig.from_options`` maps 0.9 aliases onto their 2.x names, rejects unknown options
with a suggestion, and checks every value; its messages name the option and the fix.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from ray_lit.errors import MisconfigurationException

# 0.9 name -> 2.x / ray_lit name
_ALIASES = {
    "checkpoint_callback": "enable_checkpointing",
    "row_log_interval": "log_every_n_steps",
    "weights_summary": "enable_model_summary",
    "progress_bar_refresh_rate": "enable_progress_bar",
    "train_dataloaders": None,
}
# accepted for compatibility; they change nothing here (with the reason)
_IGNORED = {
    "distributed_backend": "ray_lit always runs one DDP rank per Ray worker",
    "strategy": "ray_lit always runs one DDP rank per Ray worker",
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
}
_PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


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
    max_failures: int = 3
    storage_path: str | None = None
    run_name: str | None = None
    resume: str = "auto"
    checkpoint_every_n_steps: int | None = None
    snapshot_every_n_steps: int | None = None
    keep_checkpoints: int = 2
    find_unused_parameters: bool = False
    gather_step_outputs: bool = False
    process_group_timeout_s: float = 300.0
    worker_hang_timeout_s: float | None = None
    placement_timeout_s: float = 60.0
    elastic_batch: str = "keep_global_batch"

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainerConfig:
        """Build and validate a config from ``Trainer(**options)``."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in options.items():
            if name in _UNSUPPORTED:
                if value in (None, False, 0):
                    continue
                raise MisconfigurationException(f"Trainer({name}=...): {_UNSUPPORTED[name]}.")
            if name in _IGNORED:
                if value not in (None, False):
                    warnings.warn(f"Trainer({name}={value!r}) has no effect: {_IGNORED[name]}.",
                                  stacklevel=3)
                continue
            if name in _ALIASES:
                target = _ALIASES[name]
                value = _translate_alias(name, value)
                name = target
                if name is None:
                    continue
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise MisconfigurationException(f"Trainer got an unknown option {name!r}.{hint}")
            values[name] = value
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.callbacks is None:
            self.callbacks = []
        elif not isinstance(self.callbacks, list):
            self.callbacks = list(self.callbacks) if isinstance(self.callbacks, tuple) else [
                self.callbacks]
        if self.fast_dev_run:
            n = 1 if self.fast_dev_run is True else int(self.fast_dev_run)
            if n < 0:
                raise MisconfigurationException("fast_dev_run must be a bool or an int >= 0.")
            self.limit_train_batches = self.limit_val_batches = self.limit_test_batches = n
            self.max_epochs, self.num_sanity_val_steps, self.val_check_interval = 1, 0, 1.0
            self.max_steps = n
        if self.max_epochs is None:
            self.max_epochs = 1000 if self.max_steps in (None, -1) else 2**31 - 1
        for name in ("max_epochs", "log_every_n_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (
                    0 if name == "max_epochs" else 1):
                raise MisconfigurationException(f"{name}={value!r} must be a positive int.")
        if self.max_steps is not None and self.max_steps != -1 and self.max_steps < 0:
            raise MisconfigurationException(f"max_steps={self.max_steps} must be >= 0 or -1.")
        for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                     "overfit_batches"):
            _check_limit(name, getattr(self, name))
        if self.overfit_batches:
            self.limit_train_batches = self.limit_val_batches = self.limit_test_batches = \
                self.overfit_batches
        _check_limit("val_check_interval", self.val_check_interval)
        if self.val_check_interval == 0:
            raise MisconfigurationException("val_check_interval must be > 0; to turn validation "
                                            "off set limit_val_batches=0.")
        if isinstance(self.num_sanity_val_steps, bool) or not isinstance(
                self.num_sanity_val_steps, int) or self.num_sanity_val_steps < -1:
            raise MisconfigurationException(
                f"num_sanity_val_steps={self.num_sanity_val_steps!r}: use an int >= 0, or -1 "
                "for every validation batch.")
        _check_accumulation(self.accumulate_grad_batches)
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise MisconfigurationException(
                f"gradient_clip_algorithm={self.gradient_clip_algorithm!r}: use 'norm' or "
                "'value'.")
        from ray_lit.loop.optimization import validate_precision

        validate_precision(self.precision, "cuda" if self.use_gpu else "cpu")
        self._validate_distributed()

    def _validate_distributed(self) -> None:
        if self.gpus:
            # 0.9: gpus=N means N workers with one GPU each
            count = self.gpus if isinstance(self.gpus, int) else len(
                str(self.gpus).split(",")) if str(self.gpus) != "-1" else 1
            if not self.num_workers:
                self.num_workers = count
            self.use_gpu = True
        if self.accelerator not in ("auto", "cpu", "gpu", "cuda", "tpu"):
            raise MisconfigurationException(
                f"accelerator={self.accelerator!r}: use 'cpu', 'gpu', 'tpu' or 'auto'.")
        if self.accelerator in ("gpu", "cuda"):
            self.use_gpu = True
        if self.accelerator == "tpu" and self.use_gpu:
            raise MisconfigurationException("accelerator='tpu' and use_gpu=True exclude each "
                                            "other; pick one.")
        workers = self.num_workers
        if isinstance(workers, (tuple, list)):
            if len(workers) != 2 or not all(isinstance(w, int) for w in workers) or not (
                    1 <= workers[0] <= workers[1]):
                raise MisconfigurationException(
                    f"num_workers={workers!r}: an elastic range is (min, max) with "
                    "1 <= min <= max.")
            self.num_workers = tuple(workers)
        elif not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise MisconfigurationException(
                f"num_workers={workers!r}: use 0 (in process), N >= 1 Ray workers, or "
                "(min, max).")
        if self.placement_strategy not in _PLACEMENT:
            raise MisconfigurationException(
                f"placement_strategy={self.placement_strategy!r}: use one of {_PLACEMENT}.")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise MisconfigurationException(
                f"max_failures={self.max_failures!r}: use an int >= 0, or -1 for unlimited.")
        if self.checkpoint_every_n_steps is not None and self.checkpoint_every_n_steps < 1:
            raise MisconfigurationException("checkpoint_every_n_steps must be >= 1 or None.")
        snap = self.snapshot_every_n_steps
        if snap is not None:
            if isinstance(snap, bool) or not isinstance(snap, int) or snap < 1:
                raise MisconfigurationException(
                    f"snapshot_every_n_steps={snap!r}: use an int >= 1 (optimizer steps between "
                    "in-memory snapshots) or None.")
            if not self.num_workers:
                raise MisconfigurationException(
                    "snapshot_every_n_steps keeps in-memory snapshots on Ray workers for "
                    "recovery after a lost worker; with num_workers=0 there are none. Set "
                    "num_workers, or drop snapshot_every_n_steps.")
        if self.elastic_batch not in ("keep_global_batch", "keep_per_worker"):
            raise MisconfigurationException(
                f"elastic_batch={self.elastic_batch!r}: use 'keep_global_batch' or "
                "'keep_per_worker'.")

    @property
    def distributed(self) -> bool:
        return bool(self.num_workers)


def _translate_alias(name: str, value: Any) -> Any:
    if name == "progress_bar_refresh_rate":
        return bool(value)
    if name == "weights_summary":
        return value is not None
    return value


def _check_limit(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MisconfigurationException(f"{name}={value!r} must be an int or a float.")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise MisconfigurationException(
            f"{name}={value} as a float is a fraction in [0.0, 1.0]; use an int for a count.")
    if isinstance(value, int) and value < 0:
        raise MisconfigurationException(f"{name}={value} must be >= 0.")


def _check_accumulation(value: Any) -> None:
    if isinstance(value, dict):
        if not value:
            raise TypeError("accumulate_grad_batches as a dict needs at least one {epoch: k}.")
        for epoch, k in value.items():
            if not isinstance(epoch, int) or not isinstance(k, int):
                raise TypeError("accumulate_grad_batches dict keys and values must be ints.")
            if epoch < 0:
                raise IndexError(f"accumulate_grad_batches epoch key {epoch} must be >= 0.")
            if k < 1:
                raise MisconfigurationException("accumulate_grad_batches values must be >= 1.")
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"accumulate_grad_batches={value!r} must be an int or {{epoch: k}}.")
    if value < 1:
        raise MisconfigurationException(f"accumulate_grad_batches={value} must be >= 1.")
