"""What a checkpoint holds and how a run is restored from one (spec §4, exact resume).

The dict has the 2.x keys (``epoch``, ``global_step``, ``state_dict``, ``optimizer_states``,
``lr_schedulers``, ``callbacks``, ``hyper_parameters``, ``loops``) plus the 0.9 keys
(``checkpoint_callback_best_model_score/path``, ``early_stop_callback_state_dict``), so both
generations of user code find what they read. ``loops`` is ray_lit's own progress record with
the RNG states, which makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

import torch

from ray_lit._version import __version__
from ray_lit.core.seed import rng_state, set_rng_state
from ray_lit.errors import MisconfigurationException
from ray_lit.loop.dispatch import positional_count
from ray_lit.loop.outputs import floats

if TYPE_CHECKING:
    from ray_lit.loop.context import LoopContext

FORMAT_VERSION = 1


def dump_checkpoint(ctx: LoopContext, weights_only: bool = False, on_device: bool = False
                    ) -> dict[str, Any]:
    """The checkpoint of ``trainer``'s run as it stands (called on every rank; rank 0 writes).

    ``on_device`` leaves the weights where they are (the fault-tolerance writer copies them to
    host memory itself, overlapped with training); otherwise they are copied to the CPU.
    """
    trainer = ctx.trainer
    module = trainer.lightning_module
    strategy = trainer.strategy  # what of the module and optimizers this rank holds
    progress = ctx.progress
    progress_state = progress.state_dict()
    if progress.batches_done >= trainer.num_training_batches and not progress.epoch_finished:
        # saved inside the epoch's last batch (at validation): resume at the next epoch, and
        # do there what this epoch's end would still have done (epoch-interval schedulers)
        progress_state["epoch_finished"] = True
        progress_state["epoch_end_pending"] = True
    elif progress.epoch_finished:
        progress_state["epoch_finished"] = True
    checkpoint: dict[str, Any] = {
        "epoch": progress.epoch,
        "global_step": progress.global_step,
        "pytorch-lightning_version": "2.4.0",
        "ray_lit_version": __version__,
        "ray_lit_format": FORMAT_VERSION,
        "state_dict": {k: v.detach() if on_device else v.detach().cpu()
                       for k, v in strategy.lightning_module_state_dict(module).items()},
        "loops": {"progress": progress_state, "rng": rng_state(),
                  "sampler": ctx.host.sampler_state(progress.batches_done),
                  "world_size": ctx.host.world_size,
                  "callback_metrics": floats(trainer.callback_metrics)},
    }
    # the optimizers, schedulers and precision plugin live where fit ran: after a fit on Ray
    # workers the driver's Trainer holds the weights, counters and callbacks only
    holds_training_state = ctx.precision is not None
    if not weights_only and not holds_training_state:
        warnings.warn(
            "trainer.save_checkpoint: the optimizer, scheduler and precision state live on the "
            "Ray workers that ran fit, not in this process; this file holds the weights, "
            "counters, callbacks and hyperparameters, and fit(ckpt_path=...) cannot resume "
            "from it. To resume, use a checkpoint ModelCheckpoint wrote during fit "
            "(trainer.checkpoint_callback.last_model_path or best_model_path); pass "
            "weights_only=True to save the weights without this warning.", stacklevel=3)
    if not weights_only and holds_training_state:
        checkpoint["optimizer_states"] = [strategy.optimizer_state(opt)
                                          for opt in trainer.optimizers]
        checkpoint["lr_schedulers"] = [c.scheduler.state_dict()
                                       for c in trainer.lr_scheduler_configs]
        checkpoint["precision"] = ctx.precision.state_dict()
    if not weights_only:
        callbacks: dict[str, Any] = {}
        for cb in trainer.callbacks:
            state = cb.state_dict()
            # 0.9: on_save_checkpoint(trainer, pl_module); 2.x adds the checkpoint dict
            legacy = _callback_save_hook(cb, trainer, module, checkpoint)
            if legacy is not None and not state:
                state = legacy  # 0.9: the state is what on_save_checkpoint returned
            if state:
                callbacks[cb.state_key] = copy.deepcopy(state)
        checkpoint["callbacks"] = callbacks
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None:
            checkpoint["checkpoint_callback_best_model_score"] = ckpt_cb.best_model_score
            checkpoint["checkpoint_callback_best_model_path"] = ckpt_cb.best_model_path
        es = trainer.early_stopping_callback
        if es is not None:
            checkpoint["early_stop_callback_state_dict"] = es.state_dict()
    if module.hparams:
        checkpoint["hparams_name"] = module.__dict__.get("_hparams_name", "kwargs")
        from ray_lit.core.hparams import hparams_for_checkpoint

        # classes and functions by import path (weights-only loadable), never dropped
        checkpoint["hyper_parameters"] = hparams_for_checkpoint(module)
        if module.__dict__.get("_hparams_type") in ("Namespace", "DictConfig"):
            checkpoint["hparams_type"] = module.__dict__["_hparams_type"]
    dm = trainer.datamodule
    if dm is not None and dm.state_dict():
        checkpoint[type(dm).__qualname__] = dm.state_dict()
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def join_state_gather(ctx: LoopContext, weights_only: bool = False) -> None:
    """A rank that does not write joins the COLLECTIVE gathers of ``dump_checkpoint`` (a
    sharded strategy, ``Strategy.shards_state``): the same strategy calls in the same order,
    results dropped. Nothing to do when every rank holds the full state."""
    strategy = getattr(ctx.host, "strategy", None)  # stand-in hosts of tests have none
    if strategy is None or not strategy.shards_state:
        return
    trainer = ctx.trainer
    strategy.lightning_module_state_dict(trainer.lightning_module)
    if not weights_only:
        for opt in trainer.optimizers:
            strategy.optimizer_state(opt)


def _callback_save_hook(cb: Any, trainer: Any, module: Any, checkpoint: dict[str, Any]) -> Any:
    """A callback's ``on_save_checkpoint`` with the arguments its override names."""
    args = (trainer, module, checkpoint)
    return cb.on_save_checkpoint(*args[: max(positional_count(cb.on_save_checkpoint, 0, 3), 2)])


def is_legacy(checkpoint: dict[str, Any]) -> bool:
    """A 0.9 checkpoint: no ``loops`` and a version below 1.0."""
    version = str(checkpoint.get("pytorch-lightning_version", "0"))
    return "loops" not in checkpoint and version.split(".")[0] == "0"


def restore_module(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """Hooks, then weights (2.x order): ``m.on_load_checkpoint``, callbacks, ``load_state_dict``."""
    module = trainer.lightning_module
    module.on_load_checkpoint(checkpoint)
    states = checkpoint.get("callbacks", {})
    for cb in trainer.callbacks:
        state = states.get(cb.state_key)
        if state is None and cb is trainer.early_stopping_callback:
            state = checkpoint.get("early_stop_callback_state_dict")
        if positional_count(cb.on_load_checkpoint, 0, 3) == 1:
            # 0.9: on_load_checkpoint(checkpointed_state), the callback's own saved state
            if state is not None:
                cb.on_load_checkpoint(copy.deepcopy(state))
        else:
            cb.on_load_checkpoint(trainer, module, checkpoint)
        if state is not None:
            cb.load_state_dict(copy.deepcopy(state))
    trainer.strategy.load_model_state_dict(module, checkpoint["state_dict"])


def restore_training(ctx: LoopContext, checkpoint: dict[str, Any]) -> None:
    """Optimizers, schedulers, scaler, counters, sampler position and RNG."""
    trainer = ctx.trainer
    if "optimizer_states" not in checkpoint or "lr_schedulers" not in checkpoint:
        raise MisconfigurationException(
            "This checkpoint contains only the model (saved with weights_only=True); it cannot "
            "resume training. Load it with load_from_checkpoint, or resume from a full one."
        )
    optimizer_states = checkpoint["optimizer_states"]
    if len(optimizer_states) != len(trainer.optimizers):
        raise MisconfigurationException(
            f"The checkpoint has {len(optimizer_states)} optimizer states but "
            f"configure_optimizers returned {len(trainer.optimizers)} optimizers.")
    tune = trainer.config.tune  # PBT exploit: the new config's lr replaces the restored one
    keep_lr = tune is not None and tune.restore_lr_from_config
    for opt, state in zip(trainer.optimizers, optimizer_states):
        configured = [group["lr"] for group in opt.param_groups]
        trainer.strategy.load_optimizer_state_dict(opt, state)
        _optimizer_to(opt, ctx.host.device)
        if keep_lr:  # PBT exploit: the new config's learning rate replaces the restored one
            for group, lr in zip(opt.param_groups, configured):
                group["lr"] = lr
                group["initial_lr"] = lr
    for config, state in zip(trainer.lr_scheduler_configs, checkpoint["lr_schedulers"]):
        config.scheduler.load_state_dict(state)
        if keep_lr and hasattr(config.scheduler, "base_lrs"):
            config.scheduler.base_lrs = [g["initial_lr"] for g in
                                         config.scheduler.optimizer.param_groups]
    ctx.precision.load_state_dict(checkpoint.get("precision", {}))
    progress = ctx.progress
    loops = checkpoint.get("loops")
    if loops is None or is_legacy(checkpoint):
        # 0.9: ``epoch`` is the epoch to start from, ``global_step`` one past the steps done
        progress.epoch = int(checkpoint["epoch"])
        progress.global_step = max(int(checkpoint["global_step"]) - 1, 0)
        progress.batches_done = 0
        return
    state = dict(loops["progress"])
    pending = state.pop("epoch_end_pending", False)
    progress.load_state_dict(state)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in
                                     loops.get("callback_metrics", {}).items()})
    progress_was_finished = progress.epoch_finished
    if pending:
        from ray_lit.loop.optimization import step_schedulers

        step_schedulers(trainer.lr_scheduler_configs, "epoch", progress.epoch + 1,
                        trainer.callback_metrics, ctx.lr_scheduler_step)
    if progress.epoch_finished:
        progress.epoch += 1
        progress.batches_done = 0
        progress.epoch_finished = False
    if loops.get("rng") is not None:
        set_rng_state(loops["rng"])
    if loops.get("sampler") is not None and not progress_was_finished:
        ctx.host.load_sampler_state(loops["sampler"])
    ctx.restarted_mid_epoch = progress.batches_done > 0


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)
