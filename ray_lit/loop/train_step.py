"""One training batch under automatic optimisation: for each active optimizer, forward,
backward, and at an accumulation boundary clip, step and zero the gradients (spec §3.2, §3.7).

Forward and backward run before ``optimizer_step`` (0.9 order), so a 0.9 override that calls
``optimizer.step()`` works; the closure handed to ``optimizer_step`` returns that loss, and only
optimizers that evaluate the loss several times (LBFGS) get a closure that re-runs the step.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from ray_lit.core.results import TrainResult
from ray_lit.loop.dispatch import positional_count
from ray_lit.loop.optimization import clip_gradients
from ray_lit.loop.outputs import StepOutput, training_output

if TYPE_CHECKING:
    from ray_lit.loop.context import LoopContext


def active_optimizers(ctx: LoopContext, total_batch_idx: int) -> list[tuple[int, Any]]:
    """All optimizers in order, or one at a time when ``frequency`` is set (0.9)."""
    trainer = ctx.trainer
    optimizers = trainer.optimizers
    freqs = ctx.optimizer_frequencies
    if not freqs:
        return list(enumerate(optimizers))
    position = total_batch_idx % sum(freqs)
    for idx, freq in enumerate(freqs):
        if position < freq:
            return [(idx, optimizers[idx])]
        position -= freq
    return [(0, optimizers[0])]


def check_finite_loss(loss: torch.Tensor) -> None:
    """``terminate_on_nan``: raise ``ValueError`` when the loss is nan or inf."""
    if not torch.isfinite(loss).all():
        raise ValueError("The loss returned in `training_step` is nan or inf.")


def check_finite_parameters(module: torch.nn.Module) -> None:
    """``terminate_on_nan``: raise ``ValueError`` naming the first parameter that holds a nan
    or inf (checked after each optimizer step, 0.9)."""
    for name, param in module.named_parameters():
        if not torch.isfinite(param).all():
            raise ValueError(f"Detected nan and/or inf values in `{name}`. Check your forward "
                             "pass for numerically unstable operations.")


class TrainingBatch:
    """Runs one batch; returns the per-optimizer ``StepOutput``s (None when skipped)."""

    def __init__(self, ctx: LoopContext) -> None:
        self.ctx = ctx
        self.trainer = ctx.trainer  # the facade: Lightning's names, what hooks receive

    def run(self, batch: Any, batch_idx: int, should_step: bool) -> list[StepOutput | None]:
        ctx = self.ctx
        trainer = self.trainer
        progress = ctx.progress
        outputs: list[StepOutput | None] = []
        optimizers = active_optimizers(ctx, progress.total_batch_idx)
        several = len(trainer.optimizers) > 1
        for opt_idx, optimizer in optimizers:
            toggled = self._toggle(optimizer) if several else None
            try:
                outputs.append(self._run_optimizer(batch, batch_idx, opt_idx, optimizer,
                                                   should_step, several))
            finally:
                if toggled is not None:
                    for param, flag in toggled:
                        param.requires_grad = flag
        return outputs

    def _toggle(self, optimizer: Any) -> list[tuple[torch.nn.Parameter, bool]]:
        """Only this optimizer's parameters require grad while it runs (0.9 GAN idiom)."""
        own = {id(p) for group in optimizer.param_groups for p in group["params"]}
        saved = []
        for param in self.trainer.lightning_module.parameters():
            saved.append((param, param.requires_grad))
            if id(param) not in own:
                param.requires_grad = False
        return saved

    def _forward_backward(self, batch: Any, batch_idx: int, opt_idx: int, optimizer: Any,
                          should_step: bool, several: bool) -> StepOutput:
        ctx = self.ctx
        trainer, hooks = self.trainer, self.ctx.hooks
        args = (batch, batch_idx, opt_idx) if several else (batch, batch_idx)
        # DDP syncs gradients only at the accumulation boundary (no_sync before it)
        sync = contextlib.nullcontext() if should_step else trainer.strategy.no_sync()
        with sync:
            with ctx.precision.autocast():
                raw = ctx.call_step("training_step", *args)
                if isinstance(raw, TrainResult):
                    raw.track_batch_size(ctx.metrics._current_batch_size())
                raw = ctx.training_step_end(raw)
            out = training_output(raw)
            if out.loss is None:
                return out
            if trainer.config.terminate_on_nan:
                # before backward and the step, so the weights stay as they were (0.9)
                check_finite_loss(out.loss)
            loss = out.loss / ctx.accumulation if ctx.accumulation > 1 else out.loss
            hooks.both("on_before_backward", loss)
            scaled = ctx.precision.scale(loss)
            names = hooks.parameter_names("backward")
            if names[:1] == ("trainer",):  # 0.9: backward(trainer, loss, optimizer, optimizer_idx)
                ctx.hooks.module("backward", trainer, scaled, optimizer, opt_idx)
            else:
                # 2.x backward(loss, *args, **kwargs) gets the loss alone; 1.x named
                # (loss, optimizer, optimizer_idx)
                fn = trainer.lightning_module.backward
                args = (scaled, optimizer, opt_idx)[: max(positional_count(fn, 0, 1), 1)]
                ctx.hooks.module("backward", *args)
            hooks.both("on_after_backward")
        return out

    def _run_optimizer(self, batch: Any, batch_idx: int, opt_idx: int, optimizer: Any,
                       should_step: bool, several: bool) -> StepOutput | None:
        ctx = self.ctx
        trainer, hooks = self.trainer, self.ctx.hooks
        lbfgs = isinstance(optimizer, torch.optim.LBFGS)
        out = None if lbfgs else self._forward_backward(batch, batch_idx, opt_idx, optimizer,
                                                        should_step, several)
        if out is not None and out.loss is None:
            return out
        if not should_step:
            return out
        if lbfgs:
            holder: dict[str, StepOutput] = {}

            def closure() -> torch.Tensor:
                holder["out"] = self._forward_backward(batch, batch_idx, opt_idx, optimizer,
                                                       True, several)
                return holder["out"].loss
        else:
            cached = out.loss.detach()

            def closure() -> torch.Tensor:
                return cached

        config = trainer.config
        if not lbfgs:
            # the hook sees the true (unscaled) gradients, before clipping (2.x order)
            ctx.precision.unscale(optimizer)
        # 2.x on_before_optimizer_step(optimizer); 1.x also took optimizer_idx
        hooks.both_by_arity("on_before_optimizer_step", (optimizer, opt_idx), 1)
        if not lbfgs:
            self._clip(optimizer, opt_idx)
        ctx.precision.step(optimizer, lambda: self._optimizer_step(batch_idx, optimizer,
                                                                         opt_idx, closure))
        if lbfgs:
            out = holder.get("out")
        if config.terminate_on_nan:
            check_finite_parameters(trainer.lightning_module)
        hooks.callbacks("on_before_zero_grad", optimizer)
        hooks.module("on_before_zero_grad", optimizer)
        self._zero_grad(batch_idx, optimizer, opt_idx)
        return out

    def _clip(self, optimizer: Any, opt_idx: int) -> None:
        """Clip before the step: the module's ``configure_gradient_clipping`` when it has one
        (2.x; it gets the Trainer's settings), else the Trainer's clipping of every parameter
        (0.9)."""
        ctx = self.ctx
        trainer, config = self.trainer, self.trainer.config
        if ctx.hooks.overridden("configure_gradient_clipping"):
            names = ctx.hooks.parameter_names("configure_gradient_clipping")
            # 1.x: (optimizer, optimizer_idx, gradient_clip_val, gradient_clip_algorithm)
            head = (optimizer, opt_idx) if "optimizer_idx" in names else (optimizer,)
            ctx.hooks.module("configure_gradient_clipping", *head,
                                  config.gradient_clip_val or None,
                                  config.gradient_clip_algorithm)
        elif config.gradient_clip_val:
            clip_gradients(trainer.lightning_module.parameters(), config.gradient_clip_val,
                           config.gradient_clip_algorithm)

    def _optimizer_step(self, batch_idx: int, optimizer: Any, opt_idx: int, closure: Any) -> None:
        ctx = self.ctx
        trainer = self.trainer
        epoch = trainer.current_epoch
        if not ctx.hooks.overridden("optimizer_step"):
            from ray_lit.core.module import step_optimizer

            step_optimizer(optimizer, closure)  # no closure for 0.9 wrappers' step(self)
            return
        names = ctx.hooks.parameter_names("optimizer_step")
        if "optimizer_idx" in names or len(names) > 4:  # 0.9 signature
            kwargs = {"epoch": epoch, "batch_idx": batch_idx, "optimizer": optimizer,
                      "optimizer_idx": opt_idx, "optimizer_closure": closure,
                      "second_order_closure": closure, "on_tpu": False,
                      "using_native_amp": ctx.precision.scaler is not None,
                      "using_lbfgs": isinstance(optimizer, torch.optim.LBFGS)}
            args = [kwargs.get(n) for n in names]
            ctx.hooks.module("optimizer_step", *args)
        else:  # 2.x: optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            ctx.hooks.module("optimizer_step", epoch, batch_idx, optimizer, closure)

    def _zero_grad(self, batch_idx: int, optimizer: Any, opt_idx: int) -> None:
        ctx = self.ctx
        trainer = self.trainer
        if not ctx.hooks.overridden("optimizer_zero_grad"):
            optimizer.zero_grad()
            return
        names = ctx.hooks.parameter_names("optimizer_zero_grad")
        args = [trainer.current_epoch, batch_idx, optimizer, opt_idx][: len(names)]
        ctx.hooks.module("optimizer_zero_grad", *args)
