"""Every Trainer option, swept with wrong types and out-of-range values (issue 19 item 5): each
is refused when the Trainer is built (no worker exists yet) with one
``MisconfigurationException`` naming the option and the fix, never a ``TypeError`` from deep
inside. The options are enumerated from ``TrainerConfig`` (what ``Trainer(**options)``
accepts), so a new option without rows here fails ``test_every_option_has_rows``."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

import ray_lit as pl
from ray_lit.config import _ALIASES, _IGNORED, _UNSUPPORTED, TrainerConfig
from ray_lit.option_rules import OPTION_RULES

OPTIONS = [f.name for f in dataclasses.fields(TrainerConfig) if not f.metadata.get("internal")]
NAN, INF = float("nan"), float("inf")

# option -> values it must refuse (wrong types first, then out-of-range values)
BAD: dict[str, list] = {
    "max_epochs": ["3", 2.5, -1],
    "min_epochs": ["1", 1.5, -1],
    "max_steps": ["10", 1.5, -2],
    "min_steps": ["x", -1],
    "limit_train_batches": ["all", True, None, -1, 1.5],
    "limit_val_batches": ["x", [1], -0.5, NAN],
    "limit_test_batches": [None, 2.5, -3],
    "limit_predict_batches": [None, 2.5, -3],
    "val_check_interval": ["half", None, 0, 0.0, 1.5],
    "check_val_every_n_epoch": ["1", 1.5, 0],
    "num_sanity_val_steps": ["2", 2.0, None, -2],
    "gradient_clip_val": ["0.5", [1.0], -1.0, NAN],
    "gradient_clip_algorithm": [1, "median"],
    "accumulate_grad_batches": ["2", 2.5, None, {"a": 2}, 0, {}, {0: 0}, {-1: 2}],
    "precision": [[16], True, None, 8, "fp8"],
    "fast_dev_run": ["yes", 1.5, -1],
    "overfit_batches": ["x", None, -1, 1.5],
    "terminate_on_nan": ["yes", 2],
    "deterministic": ["maybe", 2],
    "benchmark": ["yes", 2],
    "sync_batchnorm": ["yes", None],
    "callbacks": [5, "EarlyStopping", [object()]],
    "logger": ["tensorboard", 5, [object()]],
    "default_root_dir": [5, ["a"], ""],
    "enable_checkpointing": ["yes", None, 2],
    "early_stop_callback": ["val_loss", 3],
    "enable_progress_bar": ["no", 2],
    "enable_model_summary": ["full", 2],
    "log_every_n_steps": ["50", 1.5, 0],
    "resume_from_checkpoint": [5, ""],
    "gpus": ["abc", 1.5, [-1], -2, -1],
    "num_workers": ["2", 1.5, True, -1, (2, 1), (0, 2), (1, 2, 3)],
    "use_gpu": ["yes", 2],
    "accelerator": [1, None, "abacus"],
    "resources_per_worker": ["CPU", {1: 1}, {"CPU": "two"}, {}, {"CPU": -1}],
    "placement_strategy": [1, "pack", "RANDOM"],
    "strategy": [5, "deepspeed"],
    "max_failures": ["3", 1.5, True, -2],
    "storage_path": [5, "", "foo://bar"],
    "run_name": [5, "", "/"],
    "resume": [5, True, ""],
    "checkpoint_every_n_steps": ["10", True, 0],
    "snapshot_every_n_steps": ["x", 1.5, 0],
    "keep_checkpoints": ["2", True, 0],
    "storage_retry_timeout_s": ["300", True, -1, INF],
    "find_unused_parameters": ["yes", None],
    "gather_step_outputs": ["yes", None],
    "process_group_timeout_s": ["300", None, 0, -5, INF],
    "worker_hang_timeout_s": ["soon", True, 0, -3],
    "placement_timeout_s": ["60", None, -1, NAN],
    "elastic_batch": [1, "linear"],
}

# option -> values it must still take (the sweep must not make the rules over-strict)
GOOD: dict[str, list] = {
    "max_epochs": [None, 0, 3],
    "max_steps": [None, -1, 0, 7],
    "limit_train_batches": [0, 3, 0.5, 1.0, 1e50],
    "val_check_interval": [1, 0.25],
    "gradient_clip_val": [None, 0, 0.5],
    "gradient_clip_algorithm": [None, "value"],
    "accumulate_grad_batches": [2, {0: 1, 3: 2}],
    "precision": [32, "16", "bf16", "bf16-mixed"],
    "fast_dev_run": [True, False, 3],
    "deterministic": [True, "warn", None],
    "callbacks": [None, [], (pl.Callback(),), pl.Callback()],
    "logger": [False, None],
    "enable_checkpointing": [True, False, 1],
    "gpus": [None, 0],
    "num_workers": [0, 2, (1, 2), [1, 3]],
    "resources_per_worker": [None, {"CPU": 2, "custom": 0.5}],
    "storage_path": [None, "s3://bucket/runs", "file:///tmp/ray_lit_sweep"],
    "resume": [None, "auto", "never", "some/checkpoint.ckpt"],
    "worker_hang_timeout_s": [None, "auto", 0.5, 30],
    "placement_timeout_s": [0, 60.0],
}

# 0.9 aliases, checked before they are translated
BAD_ALIASES: dict[str, list] = {
    "checkpoint_callback": ["yes", 2],
    "row_log_interval": ["50", 0],
    "weights_summary": ["everything", 1],
    "progress_bar_refresh_rate": ["fast", -1],
}


def _rows(table: dict[str, list]) -> list:
    return [pytest.param(name, value, id=f"{name}={value!r}") for name, values in
            table.items() for value in values]


def test_every_option_has_rows() -> None:
    """A Trainer option added without rows (or without a rule) fails here."""
    assert sorted(BAD) == sorted(OPTIONS)
    assert sorted(OPTION_RULES) == sorted(OPTIONS)
    assert sorted(BAD_ALIASES) == sorted(_ALIASES)


def _refused(options: dict, name: str) -> str:
    """The message ``Trainer(**options)`` raises; it must name ``name``."""
    options = dict(options)
    if name != "logger":
        options.setdefault("logger", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(pl.MisconfigurationException) as info:
            pl.Trainer(**options)
    message = str(info.value)
    assert f"{name}=" in message, message  # the option, as the user wrote it
    return message


def _root(name: str, tmp_path) -> dict:
    return {} if name == "default_root_dir" else {"default_root_dir": str(tmp_path)}


@pytest.mark.parametrize(("name", "value"), _rows(BAD))
def test_a_bad_value_names_the_option_and_the_fix(name, value, tmp_path) -> None:
    message = _refused({name: value, **_root(name, tmp_path)}, name)
    assert "use " in message, message  # the fix


@pytest.mark.parametrize(("name", "value"),
                         _rows({k: v for k, v in BAD.items() if k != "num_workers"}))
def test_a_bad_value_is_refused_for_ray_workers_too(name, value, tmp_path) -> None:
    """The same checks run for a distributed Trainer, when it is built: no Ray call has
    happened and no worker exists yet."""
    import sys

    _refused({"num_workers": 2, name: value, **_root(name, tmp_path)}, name)
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


@pytest.mark.parametrize(("name", "value"), _rows(GOOD))
def test_good_values_are_taken(name, value, tmp_path) -> None:
    options = {name: value, "logger": False, "default_root_dir": str(tmp_path)}
    if name == "logger":
        options.pop("logger")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # precision=16 on CPU warns
        pl.Trainer(**options)


@pytest.mark.parametrize(("name", "value"), _rows(BAD_ALIASES))
def test_a_bad_alias_value_names_the_alias(name, value) -> None:
    assert "use " in _refused({name: value}, name)


def test_numpy_numbers_are_taken_as_python_numbers() -> None:
    """A Tune search space samples NumPy scalars."""
    import numpy as np

    config = pl.Trainer(logger=False, max_epochs=np.int64(3), gradient_clip_val=np.float32(0.5),
                        limit_train_batches=np.float64(0.5)).config
    assert (config.max_epochs, config.gradient_clip_val, config.limit_train_batches) == \
        (3, 0.5, 0.5)
    assert type(config.max_epochs) is int and type(config.gradient_clip_val) is float


def test_good_alias_values_translate() -> None:
    trainer = pl.Trainer(logger=False, checkpoint_callback=False, row_log_interval=10,
                         weights_summary=None, progress_bar_refresh_rate=0)
    config = trainer.config
    assert (config.enable_checkpointing, config.log_every_n_steps, config.enable_model_summary,
            config.enable_progress_bar) == (False, 10, False, False)


@pytest.mark.parametrize("name", sorted(_IGNORED))
@pytest.mark.parametrize("value", ["nonsense", -7, 2.5, [1]])
def test_ignored_options_warn_or_refuse_but_never_crash(name, value) -> None:
    """The 0.9 options ray_lit ignores warn; the process-count ones among them map to workers
    and refuse what cannot be a count. Nothing else escapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pl.Trainer(logger=False, **{name: value})
        except pl.MisconfigurationException as err:
            assert name in str(err)


@pytest.mark.parametrize("name", sorted(_UNSUPPORTED))
def test_unsupported_options_say_what_to_do(name) -> None:
    with pytest.raises(pl.MisconfigurationException, match=name):
        pl.Trainer(logger=False, **{name: 3})


def test_cross_option_conflicts_name_both_options() -> None:
    with pytest.raises(pl.MisconfigurationException, match="accelerator='cpu' and use_gpu"):
        pl.Trainer(logger=False, accelerator="cpu", use_gpu=True)
    with pytest.raises(pl.MisconfigurationException, match="snapshot_every_n_steps.*num_workers"):
        pl.Trainer(logger=False, snapshot_every_n_steps=5)


def test_a_long_value_is_shortened_in_the_message() -> None:
    with pytest.raises(pl.MisconfigurationException) as info:
        pl.Trainer(logger=False, max_epochs="x" * 500)
    assert len(str(info.value)) < 300
