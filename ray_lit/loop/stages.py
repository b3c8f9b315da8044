"""The stages a process runs: ``run_fit`` and ``run_evaluation`` (spec §3.1, §3.5).

Both run in the process that hosts the loop: the driver for ``num_workers=0``, every Ray worker
otherwise. They set up the module and data, restore a checkpoint, call the stage hooks in order
and tear down on success, error and Ctrl-C alike.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ray_lit.core.hooks import is_overridden
from ray_lit.core.module import LightningModule
from ray_lit.core.seed import rng_state, set_rng_state
from ray_lit.errors import MisconfigurationException
from ray_lit.loop.data import (
    check_nonempty,
    limit_batches,
    loader_length,
    resolve_loaders,
    sequential_copy,
)
from ray_lit.loop.dispatch import HookDispatcher
from ray_lit.loop.eval_loop import EvalLoop
from ray_lit.loop.fit_loop import FitLoop
from ray_lit.loop.optimization import Precision, parse_optimizers

if TYPE_CHECKING:
    from ray_lit.loop.context import LoopContext


def attach(ctx: LoopContext, module: LightningModule, datamodule: Any) -> None:
    trainer = ctx.trainer
    trainer.lightning_module = module
    trainer.datamodule = datamodule
    module.trainer = trainer
    if datamodule is not None:
        datamodule.trainer = trainer
    ctx.hooks = HookDispatcher(trainer)
    trainer.callback_metrics.clear()  # each fit/validate/test starts without old metrics
    trainer.callbacks = merge_configured_callbacks(trainer.callbacks, module)


def merge_configured_callbacks(callbacks: list[Any], module: LightningModule) -> list[Any]:
    """``callbacks`` with the module's ``configure_callbacks()`` applied: each one replaces
    the callbacks of its type and goes last (Lightning's rule). Workers and the driver both
    call this, so the driver's list names the same callbacks the workers ran."""
    for cb in module.configure_callbacks() or []:
        callbacks = [c for c in callbacks if type(c) is not type(cb)] + [cb]
    return list(callbacks)


def prepare_and_setup(ctx: LoopContext, stage: str) -> None:
    """``prepare_data`` once per node (local rank 0), then ``setup(stage)`` everywhere."""
    trainer = ctx.trainer
    dm, host = trainer.datamodule, ctx.host
    if host.local_rank == 0:
        if dm is not None:
            dm._run_prepare_data()
        ctx.hooks.module("prepare_data")
    host.strategy.barrier()  # COLLECTIVE: every rank waits until its node's data is prepared
    if dm is not None:
        dm._run_setup(stage)
    ctx.hooks.callbacks("setup", stage)
    ctx.hooks.module("setup", stage)


@contextlib.contextmanager
def _guarded(ctx: LoopContext, stage: str) -> Iterator[None]:
    """Teardown on success, error and Ctrl-C; Ctrl-C ends the stage quietly (0.9). The
    Trainer's ``deterministic`` / ``benchmark`` torch flags hold for the stage."""
    trainer = ctx.trainer
    from ray_lit.loop.optimization import torch_flags
    from ray_lit.loop.trainer_state import TrainerState

    config = trainer.config
    try:
        with torch_flags(config.deterministic, config.benchmark):
            yield
    except KeyboardInterrupt:
        trainer.interrupted = True
        ctx.end_run(TrainerState.INTERRUPTED)
        ctx.hooks.callbacks("on_keyboard_interrupt")
        ctx.hooks.callbacks("on_exception", KeyboardInterrupt())
        ctx.sink.finalize("interrupted")
        if not getattr(ctx.host, "reraise_interrupt", False):
            return
        raise
    except BaseException as err:
        ctx.end_run(TrainerState.INTERRUPTED)  # 2.x: a failed stage is interrupted
        ctx.hooks.callbacks("on_exception", err)
        ctx.sink.finalize("failed")
        raise
    else:
        ctx.end_run(TrainerState.FINISHED)
    finally:
        trainer.training = trainer.validating = trainer.testing = False
        trainer.predicting = False
        trainer.sanity_checking = False
        with contextlib.suppress(Exception):
            ctx.sink.run_end()
        ctx.hooks.callbacks("teardown", stage)
        trainer.lightning_module.teardown(stage)
        if trainer.datamodule is not None:
            trainer.datamodule.teardown(stage)
        trainer.strategy.teardown_module()


def _setup_optimizers(ctx: LoopContext) -> None:
    trainer = ctx.trainer
    setup = parse_optimizers(ctx.hooks.module("configure_optimizers"))
    trainer.optimizers = setup.optimizers
    trainer.lr_scheduler_configs = setup.schedulers
    ctx.optimizer_frequencies = setup.frequencies
    module = trainer.lightning_module
    if len(setup.optimizers) > 1 and module.automatic_optimization and \
            not ctx.several_optimizers_expected():
        raise MisconfigurationException(
            f"configure_optimizers returned {len(setup.optimizers)} optimizers, but "
            f"{type(module).__name__}.training_step has no `optimizer_idx` argument. Add it "
            "(training_step(self, batch, batch_idx, optimizer_idx)), or return one optimizer.")
    if not trainer.lightning_module.automatic_optimization:
        for opt in trainer.optimizers:
            opt.register_step_post_hook(lambda *_: _count_manual_step(ctx))


def _count_manual_step(ctx: LoopContext) -> None:
    ctx.progress.global_step += 1


def _train_data(ctx: LoopContext, train_loaders: Any, val_loaders: Any) -> None:
    trainer = ctx.trainer
    config, module, dm, host = trainer.config, trainer.lightning_module, trainer.datamodule, \
        ctx.host
    train = resolve_loaders(train_loaders, dm, module, "train_dataloader")
    if not train:
        raise MisconfigurationException(
            "No training data: pass train_dataloaders to fit, or implement train_dataloader() "
            "on the module or its datamodule.")
    check_nonempty(train, "train")
    raw_train = train[0]
    ctx.train_loader = host.prepare_loader(raw_train, train=True)
    trainer.num_training_batches = limit_batches(loader_length(ctx.train_loader),
                                                 config.limit_train_batches,
                                                 "limit_train_batches")
    if config.overfit_batches:
        vals = [sequential_copy(raw_train)]
    else:
        vals = resolve_loaders(val_loaders, dm, module, "val_dataloader")
    ctx.val_loaders = [host.prepare_loader(v, train=False) for v in vals]
    # 0.9 names: the loaders this fit uses (this rank's copies in a Ray worker)
    trainer.train_dataloader = ctx.train_loader
    trainer.val_dataloaders = list(ctx.val_loaders)
    trainer.num_val_batches = [limit_batches(loader_length(v), config.limit_val_batches,
                                             "limit_val_batches") for v in ctx.val_loaders]
    has_step = is_overridden("validation_step", module, LightningModule)
    if vals and not has_step:
        warnings.warn("Validation dataloaders were given but the module has no "
                      "validation_step; validation is skipped.", stacklevel=3)
    if has_step and not vals and val_loaders is None:
        warnings.warn("The module defines validation_step but there is no val_dataloader; "
                      "validation is skipped.", stacklevel=3)
    ctx.val_enabled = bool(has_step and vals and sum(trainer.num_val_batches) > 0)
    interval = config.val_check_interval
    total = trainer.num_training_batches
    if isinstance(interval, int) and not isinstance(interval, bool):
        if interval > total and config.check_val_every_n_epoch is not None:
            raise MisconfigurationException(
                f"val_check_interval={interval} is more than the {total} training batches of an "
                "epoch. Use a smaller int, a float fraction, or check_val_every_n_epoch=None.")
        ctx.val_check_batch = interval
    elif loader_length(ctx.train_loader) == float("inf"):
        # a loader without a length has no fraction of an epoch: 1.0 validates at its end
        # (``_val_check_batch`` inf), an int every that many batches; anything else is an
        # error (0.9), even under an int limit_train_batches
        if interval != 1.0:
            raise MisconfigurationException(
                f"val_check_interval={interval} is a fraction of an epoch, but the train "
                "dataloader has no length (an IterableDataset). Use 1.0 (validate at the end "
                "of the loader) or an int k (validate every k training batches).")
        ctx.val_check_batch = float("inf")
    else:
        ctx.val_check_batch = max(1, int(total * interval))


def _sanity_check(ctx: LoopContext) -> None:
    trainer = ctx.trainer
    config = trainer.config
    steps = config.num_sanity_val_steps
    if not ctx.val_enabled or steps == 0 or ctx.resumed:
        return
    # the sanity check must not change the run: RNG state is put back afterwards
    saved = rng_state()
    limits = [n if steps == -1 else min(steps, n) for n in trainer.num_val_batches]
    trainer.sanity_checking = True
    ctx.hooks.callbacks("on_sanity_check_start")
    EvalLoop(ctx, "sanity_check").run(ctx.val_loaders, limits)
    ctx.hooks.callbacks("on_sanity_check_end")
    trainer.sanity_checking = False
    set_rng_state(saved)
    # sanity-check metrics never survive into training (2.x)
    trainer.callback_metrics.clear()
    ctx.pbar_raw.clear()


def run_fit(ctx: LoopContext, module: LightningModule, train_loaders: Any, val_loaders: Any,
            datamodule: Any, checkpoint: dict | None) -> None:
    """Fit in this process (one rank); ``checkpoint`` is an already loaded dict to resume."""
    trainer = ctx.trainer
    attach(ctx, module, datamodule)
    ctx.start_run("fit")
    trainer.training = True
    ctx.resumed = checkpoint is not None
    hooks = ctx.hooks
    with _guarded(ctx, "fit"):
        from ray_lit.core.hparams import clean_hparams_for_fit, stash_callables_for_checkpoint

        stash_callables_for_checkpoint(module)  # checkpoints save them by import path
        clean_hparams_for_fit(module.hparams)
        prepare_and_setup(ctx, "fit")
        ctx.hooks.module("configure_model")  # 2.x: layers built before wrapping
        trainer.strategy.setup_module(module, ctx.find_unused_parameters(),
                                   trainer.config.sync_batchnorm)
        # configure_optimizers may read trainer.estimated_stepping_batches, which sets the
        # training data up early (2.x does the same); otherwise it is set up right after
        ctx.pending_train_data = lambda: _train_data(ctx, train_loaders, val_loaders)
        try:
            # 2.6: freeze or inspect parameters before the optimizers take them
            hooks.both("on_before_optimizer_setup")
            _setup_optimizers(ctx)
        finally:
            pending, ctx.pending_train_data = ctx.pending_train_data, None
        ctx.precision = Precision(trainer.config.precision, ctx.host.device)
        if pending is not None:
            pending()
        if checkpoint is not None:
            from ray_lit.loop.checkpoint_state import restore_module, restore_training

            restore_module(trainer, checkpoint)
            restore_training(ctx, checkpoint)
        hooks.both("on_fit_start")
        ctx.sink.run_start("fit")
        if module.__dict__.get("_log_hyperparams", True) and module.hparams:
            ctx.sink.log_hyperparams(dict(module.hparams))
        depth = summary_depth(trainer)
        if depth and trainer.is_global_zero:
            from ray_lit.core.summary import summarize

            ctx.sink.print(str(summarize(module, max_depth=depth)))
        hooks.both("on_pretrain_routine_start")
        _sanity_check(ctx)
        hooks.both("on_pretrain_routine_end")
        module.zero_grad()
        FitLoop(ctx).run()
        hooks.both("on_fit_end")
        ctx.sink.finalize("success")


def wrap_with_weights(ctx: LoopContext, module: LightningModule, weights: dict | None) -> None:
    """The evaluation weights into ``module``, and the strategy's wrapper around it (every
    rank, ``validate`` / ``test`` / ``predict``). A lazy sharded checkpoint (FSDP on workers,
    ``checkpoint.sharded.load_lazily``) is read after sharding: each rank reads only the
    chunks of its own shards."""
    # a lazy state dict holds no tensor data: it loads itself into the sharded module
    lazy = weights is not None and hasattr(weights["state_dict"], "load_into_module")
    if weights is not None and not lazy:
        module.load_state_dict(weights["state_dict"])
    ctx.strategy.setup_module(module)
    if lazy:
        ctx.strategy.load_model_state_dict(module, weights["state_dict"])


def summary_depth(trainer: Any) -> int:
    """The depth of the summary table ``fit`` prints (0: none): a ``ModelSummary`` callback's
    ``max_depth`` (2.x: it replaces the default table), else 1 with ``enable_model_summary``."""
    from ray_lit.callbacks.model_summary import ModelSummary

    chosen = next((cb for cb in trainer.callbacks if isinstance(cb, ModelSummary)), None)
    if chosen is not None:
        return chosen.max_depth
    return 1 if trainer.config.enable_model_summary else 0


def run_evaluation(ctx: LoopContext, stage: str, module: LightningModule, loaders: Any,
                   datamodule: Any, weights: dict | None) -> list[dict[str, float]]:
    """``validate`` or ``test`` in this process; ``weights`` is a checkpoint dict to load."""
    trainer = ctx.trainer
    attach(ctx, module, datamodule)
    step = "test_step" if stage == "test" else "validation_step"
    if not is_overridden(step, module, LightningModule):
        raise MisconfigurationException(
            f"trainer.{stage}() needs `{step}` on the module; define it.")
    ctx.start_run(stage)
    setattr(trainer, "testing" if stage == "test" else "validating", True)
    results: list[dict[str, float]] = []
    with _guarded(ctx, stage):
        prepare_and_setup(ctx, stage)
        ctx.hooks.module("configure_model")  # 2.x: before the weights and the wrapper
        wrap_with_weights(ctx, module, weights)
        ctx.precision = Precision(trainer.config.precision, ctx.host.device)
        hook = "test_dataloader" if stage == "test" else "val_dataloader"
        found = resolve_loaders(loaders, trainer.datamodule, module, hook)
        if not found:
            raise MisconfigurationException(
                f"trainer.{stage}() found no dataloader: pass one, or implement {hook}() on the "
                "module or its datamodule.")
        limit = trainer.config.limit_test_batches if stage == "test" else \
            trainer.config.limit_val_batches
        prepared = [ctx.host.prepare_loader(dl, train=False) for dl in found]
        counts = [limit_batches(loader_length(dl), limit, f"limit_{stage}_batches".replace(
            "validate", "val")) for dl in prepared]
        if stage == "test":
            trainer.num_test_batches = counts
            trainer.test_dataloaders = prepared
        else:
            trainer.num_val_batches = counts
            trainer.val_dataloaders = prepared
        ctx.sink.run_start(stage)
        results = EvalLoop(ctx, stage).run(prepared, counts)
        ctx.sink.finalize("success")
    return results
