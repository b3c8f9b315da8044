"""The fit loop: epochs of training batches, validation when due, and the stop rules.

Reads top to bottom like a script (spec §3.1-3.2 and §3.5). Every rank runs it; the points where
ranks must agree are marked COLLECTIVE (each rank reaches them in the same order).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ray_lit.core.metric_store import MetricStore
from ray_lit.core.results import TrainResult, gather, reduce_on_epoch
from ray_lit.loop.context import LoopContext
from ray_lit.loop.data import loader_length
from ray_lit.loop.optimization import step_schedulers
from ray_lit.loop.outputs import StepOutput, epoch_end_output
from ray_lit.loop.train_step import TrainingBatch


class FitLoop:
    """Runs the training epochs of ``trainer.fit`` inside one process (one rank)."""

    def __init__(self, ctx: LoopContext) -> None:
        self.ctx = ctx
        self.trainer = ctx.trainer  # the facade: Lightning's names, what hooks receive
        self.batch_runner = TrainingBatch(ctx)
        self._window_start = 0

    # --- the whole run -------------------------------------------------------------------------
    def run(self) -> None:
        ctx = self.ctx
        trainer, module, hooks = self.trainer, self.trainer.lightning_module, self.ctx.hooks
        progress = ctx.progress
        module.train()
        # one store for the whole fit: on_train_start logs count into the first epoch
        self.store = MetricStore("train")
        ctx.metrics = self.store
        hooks.both("on_train_start")
        while progress.epoch < trainer.max_epochs and not self._max_steps_reached():
            self.run_epoch(progress.epoch)
            # the epoch is done: the counter moves on (2.x reports max_epochs after a full fit)
            progress.epoch += 1
            progress.batches_done = 0
            progress.epoch_finished = False
            if self._max_steps_reached() or self._stop_requested():
                break
        hooks.both("on_train_end")

    def _max_steps_reached(self) -> bool:
        ctx = self.ctx
        trainer = self.trainer
        return trainer.max_steps is not None and trainer.max_steps >= 0 and \
            ctx.progress.global_step >= trainer.max_steps

    def _min_steps_done(self) -> bool:
        """Whether ``min_steps`` optimizer steps are done (a stop before then is ignored)."""
        ctx = self.ctx
        trainer = self.trainer
        return ctx.progress.global_step >= (trainer.config.min_steps or 0)

    def _stop_requested(self) -> bool:
        ctx = self.ctx
        trainer = self.trainer
        if not trainer.should_stop:
            return False
        if ctx.progress.epoch >= (trainer.config.min_epochs or 0) and \
                self._min_steps_done():
            return True
        # stopping is honoured only once min_epochs and min_steps are done (0.9 and 2.x)
        trainer.should_stop = False
        return False

    # --- one epoch -----------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> None:
        ctx = self.ctx
        trainer, hooks, progress = self.trainer, self.ctx.hooks, self.ctx.progress
        module = trainer.lightning_module
        progress.start_epoch(epoch)
        # a loader that cannot resume mid-epoch (a Ray Data set without a reproducible order)
        # starts the interrupted epoch again: the host says from which batch it continues
        progress.batches_done = ctx.host.set_epoch(epoch, progress.batches_done)
        ctx.refresh_epoch_length()
        store = self.store
        ctx.metrics = store
        ctx.val_ran_this_epoch = False
        ctx.accumulation = ctx.accumulation_for_epoch(epoch)
        # accumulation windows count from where this epoch's batches start: 0, or the resume
        # position, which is a window boundary at the checkpoint's world size but may not be
        # one in the new numbering after an elastic resize
        self._window_start = progress.batches_done
        outputs: list[list[Any]] = [[] for _ in trainer.optimizers]
        accumulators: dict[str, list[torch.Tensor]] = {}
        hooks.both("on_epoch_start")
        hooks.both("on_train_epoch_start")
        loader = ctx.train_loader
        total = trainer.num_training_batches
        ctx.sink.progress_start("train", None if total == math.inf else int(total),
                                     epoch, trainer.max_epochs)
        keep = self._keep_outputs()
        batches = ctx.host.iterate_train(loader, progress.batches_done)
        # a loader without a length says where the epoch ends only by running out: one batch
        # of look-ahead tells the last batch (validation and the optimizer step due at the
        # end of the epoch need it); a sized loader is read as before, without look-ahead
        sized = loader_length(loader) != math.inf
        marked = ((item, False) for item in batches) if sized else _mark_last(batches)
        for (batch_idx, batch), loader_ends in marked:
            if batch_idx >= total:
                break
            is_last = batch_idx + 1 >= total or loader_ends
            ended_early = self._run_batch(batch, batch_idx, is_last, store, outputs,
                                          accumulators, keep)
            if ended_early or self._stop_inside_epoch():
                break
        progress.epoch_finished = True
        self._epoch_end(outputs, accumulators, store)
        ctx.sink.progress_update("train", progress.batches_done, ctx.pbar_view())
        ctx.sink.progress_end("train")
        del module

    def _keep_outputs(self) -> bool:
        return self.ctx.hooks.overridden("training_epoch_end")

    def _stop_inside_epoch(self) -> bool:
        if self._max_steps_reached():
            return True
        trainer = self.trainer
        return bool(trainer.should_stop) and trainer.current_epoch + 1 >= (
            trainer.config.min_epochs or 0) and self._min_steps_done()

    # --- one batch -----------------------------------------------------------------------------
    def _run_batch(self, batch: Any, batch_idx: int, is_last: bool, store: MetricStore,
                   outputs: list[list[Any]], accumulators: dict[str, list[torch.Tensor]],
                   keep: bool) -> bool:
        ctx = self.ctx
        trainer, hooks, progress = self.trainer, self.ctx.hooks, self.ctx.progress
        trainer.batch_idx = batch_idx
        batch = ctx.transfer_batch(batch, 0)
        store.set_batch(batch)
        hooks.callbacks("on_batch_start")
        signal = hooks.module("on_batch_start", batch)
        signal2 = hooks.batch_start("on_train_batch_start", batch, batch_idx, 0)
        # -1 from either hook ends the epoch (documented 0.9 behaviour); rank 0 decides for all
        if trainer.strategy.agree_on_rank_zero(signal == -1 or signal2 == -1,
                                            needed=self._batch_start_overridden()):
            return True
        should_step = (batch_idx + 1 - self._window_start) % ctx.accumulation == 0 \
            or is_last
        if trainer.lightning_module.automatic_optimization:
            step_outputs = self.batch_runner.run(batch, batch_idx, should_step)
        else:
            step_outputs = [ctx.manual_training_step(batch, batch_idx)]
            should_step = False  # manual optimisation counts its own steps
        first = next((o for o in step_outputs if o is not None), None)
        hooks.callbacks("on_batch_end")
        hooks.module("on_batch_end")
        hooks.batch_end("on_train_batch_end", _batch_end_outputs(first), batch, batch_idx, 0)
        # outputs for the epoch end, callback accumulators (0.9 Results) and running loss
        for idx, out in enumerate(step_outputs):
            if out is None or out.raw is None:
                continue
            if keep or out.is_result:
                outputs[min(idx, len(outputs) - 1)].append(out.kept)
            if out.is_result:
                for key, value in out.callback.items():
                    accumulators.setdefault(key, []).append(value)
            if out.loss is not None:
                ctx.record_loss(out.loss.detach())
        log = self._step_metrics(step_outputs, store, batch_idx, should_step)
        # 0.9 returns (Results, a dict's "log") reach the loggers after this batch's validation
        # (0.9.0 training_loop.run_training_epoch); self.log metrics before it (2.x)
        log_after_val = any(o is not None and o.log for o in step_outputs)
        if log and not log_after_val:
            ctx.log_to_loggers(log)
        progress.batches_done = batch_idx + 1
        progress.total_batch_idx += 1
        stepped = should_step and any(o is not None and o.loss is not None
                                      for o in step_outputs)
        if stepped:
            progress.global_step += 1
            # 0.9 rule (spec §3.6): a step scheduler's frequency counts batches of the epoch
            step_schedulers(trainer.lr_scheduler_configs, "step", batch_idx + 1,
                            trainer.callback_metrics, ctx.lr_scheduler_step)
        if ctx.sink.wants_progress(batch_idx + 1):
            ctx.sink.progress_update("train", batch_idx + 1, ctx.pbar_view())
        if self._should_validate(batch_idx, is_last):
            ctx.run_validation()
            ctx.metrics = store
        if log and log_after_val:
            ctx.log_to_loggers(log)
        if stepped:
            # the loggers' step moves after validation, so a batch's train and val metrics
            # share one step (2.x ``_batches_that_stepped``)
            progress.batches_that_stepped += 1
        ctx.after_train_step(is_last)
        return False

    def _batch_start_overridden(self) -> bool:
        hooks = self.ctx.hooks
        return hooks.overridden("on_batch_start") or hooks.overridden("on_train_batch_start")

    def _step_metrics(self, step_outputs: list[StepOutput | None], store: MetricStore,
                      batch_idx: int, should_step: bool) -> dict[str, Any] | None:
        """Route the batch's metrics: progress bar every batch; returns what the loggers get
        (at the cadence, else None)."""
        ctx = self.ctx
        trainer = self.trainer
        log: dict[str, Any] = {}
        for out in step_outputs:
            if out is None:
                continue
            log.update(out.log)
            ctx.pbar_raw.update(out.pbar)
            if not out.is_result and out.callback:
                # 0.9 dicts: callback metrics merged after every batch (trap: last batch wins)
                trainer.callback_metrics.update(out.callback)
        s_log, s_pbar, s_callback = store.step_views()
        log.update(s_log)
        ctx.pbar_raw.update(s_pbar)
        trainer.callback_metrics.update(s_callback)
        if log and ctx.should_log_step(batch_idx, should_step):
            return log
        return None

    def _should_validate(self, batch_idx: int, is_last: bool) -> bool:
        ctx = self.ctx
        trainer = self.trainer
        if not ctx.val_enabled:
            return False
        every = trainer.config.check_val_every_n_epoch
        if every is not None and (trainer.current_epoch + 1) % every != 0:
            return False
        if trainer.should_stop and is_last:
            return True
        # an int interval counts batches; the float 1.0 of a loader without a length
        # (``_val_check_batch`` inf) validates at the loader's last batch (0.9)
        return (batch_idx + 1) % ctx.val_check_batch == 0 or (
            is_last and ctx.val_check_batch >= trainer.num_training_batches)

    # --- epoch end -----------------------------------------------------------------------------
    def _epoch_end(self, outputs: list[list[Any]], accumulators: dict[str, list[torch.Tensor]],
                   store: MetricStore) -> None:
        ctx = self.ctx
        trainer, hooks = self.trainer, self.ctx.hooks
        result_mode = any(o and isinstance(o[0], TrainResult) for o in outputs)
        if hooks.overridden("training_epoch_end"):
            collected = [gather(o, for_training=True) if o and isinstance(o[0], TrainResult)
                         else o for o in outputs]
            arg = collected[0] if len(collected) == 1 else collected
            out = epoch_end_output(hooks.module("training_epoch_end", arg))
            if out is not None:
                if out.log:
                    ctx.log_to_loggers(out.log)
                ctx.pbar_raw.update(out.pbar)
                # a bare tensor means nothing here (0.9): only validation_epoch_end's tensor
                # becomes ``val_loss``, which a checkpoint must not mistake a train value for
                if not out.is_result and not isinstance(out.raw, torch.Tensor):
                    trainer.callback_metrics.update(out.callback)
        elif result_mode:
            for per_opt in outputs:
                if per_opt and isinstance(per_opt[0], TrainResult):
                    reduced = reduce_on_epoch(per_opt)
                    log = reduced.epoch_log_metrics()
                    if log:
                        ctx.log_to_loggers(log)
                    ctx.pbar_raw.update(reduced.epoch_pbar_metrics())
        for key, values in accumulators.items():
            trainer.callback_metrics[key] = torch.stack([v.float().mean() for v in values]).mean()
        hooks.both("on_epoch_end")
        monitoring = ctx.monitoring_callbacks()
        others = [cb for cb in trainer.callbacks if cb not in monitoring]
        hooks.callbacks("on_train_epoch_end", callbacks=others)
        hooks.module("on_train_epoch_end")
        # COLLECTIVE: sync_dist epoch reductions
        log, pbar, callback = store.epoch_views()
        if log:
            ctx.log_to_loggers(log)
        ctx.pbar_raw.update(pbar)
        trainer.callback_metrics.update(callback)
        store.reset()
        # epoch schedulers step before the monitoring callbacks, so a checkpoint they save
        # holds the scheduler state the next epoch starts from
        if trainer.lightning_module.automatic_optimization:
            # manual optimisation steps its schedulers itself (2.x: the loop never does)
            step_schedulers(trainer.lr_scheduler_configs, "epoch", trainer.current_epoch + 1,
                            trainer.callback_metrics, ctx.lr_scheduler_step)
        hooks.callbacks("on_train_epoch_end", callbacks=monitoring)
        # COLLECTIVE: rank 0's stop decision holds for every rank
        trainer.should_stop = trainer.strategy.agree_on_rank_zero(trainer.should_stop)
        ctx.after_epoch()


def _mark_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """``(item, is_last)`` for each item, reading one item ahead."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def _batch_end_outputs(out: StepOutput | None) -> Any:
    """What ``on_train_batch_end(outputs, ...)`` receives: a tensor return as 2.x's
    ``{'loss': loss}``, a dict or Result as returned (after ``training_step_end``)."""
    if out is None or out.raw is None:
        return None
    if isinstance(out.raw, torch.Tensor):
        return {"loss": out.raw.detach()}
    return out.raw
