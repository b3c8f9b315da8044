"""One evaluation run: validation (inside fit or ``trainer.validate``), the sanity check, or
``trainer.test`` (spec §3.3-3.5, §1.6-1.9).

Every rank runs the same number of batches (the per-rank samplers pad), so the ``sync_dist``
reductions at epoch end line up across ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ray_lit.core.hooks import is_overridden
from ray_lit.core.metric_store import MetricStore
from ray_lit.core.module import LightningModule
from ray_lit.core.results import EvalResult, gather, reduce_on_epoch
from ray_lit.loop.context import LoopContext
from ray_lit.loop.outputs import StepOutput, epoch_end_output, eval_output, floats

_CALLBACK_KEYS = ("val_checkpoint_on", "val_early_stop_on")


class EvalLoop:
    """Runs ``stage`` ("validate", "test" or "sanity_check") over its dataloaders."""

    def __init__(self, ctx: LoopContext, stage: str) -> None:
        self.ctx = ctx
        self.trainer = ctx.trainer  # the facade: Lightning's names, what hooks receive
        self.stage = stage
        self.prefix = "test" if stage == "test" else "validation"

    def run(self, loaders: list[Any], num_batches: list[float]) -> list[dict[str, float]]:
        """Run every loader; returns one dict of floats per dataloader (what ``test`` returns)."""
        ctx = self.ctx
        trainer, module = self.trainer, self.trainer.lightning_module
        hooks, p = ctx.hooks, self.prefix
        sanity = self.stage == "sanity_check"
        if not loaders or sum(num_batches) == 0:
            return []
        store = MetricStore(self.stage)
        store.num_dataloaders = len(loaders)
        ctx.metrics = store
        # 2.x restores each submodule's own training flag afterwards (frozen BN stays frozen)
        modes = {name: m.training for name, m in module.named_modules()}
        # 2.x hooks replace the defaults when overridden (e.g. dropout kept on in validation)
        if hooks.overridden(f"on_{p}_model_zero_grad"):
            hooks.module(f"on_{p}_model_zero_grad")
        else:
            module.zero_grad()
        if hooks.overridden(f"on_{p}_model_eval"):
            hooks.module(f"on_{p}_model_eval")
        else:
            module.eval()
        # the sanity check runs the epoch and batch hooks but not on_validation_start/end
        # (0.9, spec 3.3): a callback that acts at the end of a validation run must not act
        # on the sanity check's two batches
        if not sanity:
            hooks.both(f"on_{p}_start")
        hooks.both(f"on_{p}_epoch_start")
        total = sum(num_batches)
        # a loader without a length (an IterableDataset) runs to its end: no total to show
        ctx.sink.progress_start(self.stage, None if total == math.inf else int(total),
                                     trainer.current_epoch, trainer.config.max_epochs)
        per_loader: list[list[Any]] = []
        immediate: list[dict[str, Any]] = [{} for _ in loaders]
        done = 0
        with torch.no_grad():
            for dl_idx, (loader, limit) in enumerate(zip(loaders, num_batches)):
                kept: list[Any] = []
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= limit:
                        break
                    out = self._step(batch, batch_idx, dl_idx, len(loaders), store, sanity)
                    if out is not None:
                        if self._keep_outputs(out):
                            kept.append(out.kept)
                        else:
                            self._report_dict_output(out, immediate[dl_idx], sanity)
                    done += 1
                    if ctx.sink.wants_progress(done):
                        ctx.sink.progress_update(self.stage, done, ctx.pbar_view())
                per_loader.append(kept)
        results = self._epoch_end(per_loader, immediate, store, sanity)
        hooks.callbacks(f"on_{p}_epoch_end")
        hooks.module(f"on_{p}_epoch_end")
        self._log_store_epoch(store, results, sanity)
        if hooks.overridden(f"on_{p}_model_train"):
            hooks.module(f"on_{p}_model_train")
        else:
            for name, m in module.named_modules():
                m.train(modes.get(name, True))
        ctx.sink.progress_update(self.stage, done, ctx.pbar_view())
        ctx.sink.progress_end(self.stage)
        if not sanity:
            hooks.both(f"on_{p}_end")
        return [{k: v for k, v in r.items() if k not in _CALLBACK_KEYS} for r in results]

    # --- one batch ----------------------------------------------------------------------------
    def _step(self, batch: Any, batch_idx: int, dl_idx: int, num_loaders: int,
              store: MetricStore, sanity: bool) -> StepOutput | None:
        ctx = self.ctx
        trainer, hooks, p = self.trainer, self.ctx.hooks, self.prefix
        batch = ctx.transfer_batch(batch, dl_idx)
        store.set_batch(batch, dl_idx)
        hooks.batch_start(f"on_{p}_batch_start", batch, batch_idx, dl_idx)
        step_name = "test_step" if self.stage == "test" else "validation_step"
        args = (batch, batch_idx, dl_idx) if num_loaders > 1 else (batch, batch_idx)
        with ctx.precision.autocast():
            raw = ctx.call_step(step_name, *args)
        if isinstance(raw, EvalResult):
            raw.track_batch_size(store._current_batch_size())
        if hooks.overridden(f"{step_name}_end"):
            raw = hooks.module(f"{step_name}_end", raw)
        out = eval_output(raw, step_name)
        hooks.batch_end(f"on_{p}_batch_end", raw, batch, batch_idx, dl_idx)
        # step-level metrics: 0.9 Result curves ``x/epoch_N`` and 2.x self.log(on_step=True)
        log, pbar, _ = store.step_views()
        ctx.pbar_raw.update(pbar)
        if out is not None and out.is_result:
            ctx.pbar_raw.update(out.pbar)
            if out.log and not sanity:
                # 0.9: one curve per epoch, ``x/epoch_N`` stepped by the batch index
                suffix = f"/epoch_{trainer.current_epoch}"
                ctx.log_to_loggers({f"{k}{suffix}": v for k, v in out.log.items()},
                                        step=batch_idx)
        if log and not sanity:
            ctx.log_to_loggers(log, step=ctx.next_eval_step(self.stage))
        return out

    def _keep_outputs(self, out: StepOutput) -> bool:
        """Outputs are kept for the epoch end only when something there needs them."""
        hook = "test_epoch_end" if self.stage == "test" else "validation_epoch_end"
        return out.is_result or self.ctx.hooks.overridden(hook)

    def _report_dict_output(self, out: StepOutput, result: dict, sanity: bool) -> None:
        """0.9 without an epoch-end hook: each dict output is reported as it comes."""
        ctx = self.ctx
        trainer = self.trainer
        if out.log and not sanity:
            ctx.log_to_loggers(out.log)
        ctx.pbar_raw.update(out.pbar)
        trainer.callback_metrics.update(out.callback)
        result.update(out.pbar)
        result.update(out.log)
        result.update(out.callback)

    # --- epoch end -----------------------------------------------------------------------------
    def _epoch_end(self, per_loader: list[list[Any]], immediate: list[dict], store: MetricStore,
                   sanity: bool) -> list[dict[str, Any]]:
        ctx = self.ctx
        trainer, module = self.trainer, self.trainer.lightning_module
        hook = "test_epoch_end" if self.stage == "test" else "validation_epoch_end"
        results = [dict(r) for r in immediate]
        result_mode = any(o and isinstance(o[0], EvalResult) for o in per_loader)
        if is_overridden(hook, module, LightningModule):
            if result_mode:
                gathered = [gather(o) if o else EvalResult() for o in per_loader]
                arg = gathered[0] if len(gathered) == 1 else gathered
                returned = ctx.hooks.module(hook, arg)
                callback = _eval_callback_values(gathered)
            else:
                arg = per_loader[0] if len(per_loader) == 1 else per_loader
                returned = ctx.hooks.module(hook, arg)
                callback = {}
            out = epoch_end_output(returned)
            if out is not None:
                if out.log and not sanity:
                    ctx.log_to_loggers(out.log)
                ctx.pbar_raw.update(out.pbar)
                merged = {**out.pbar, **out.log, **out.callback}
                results = [{**r, **merged} for r in results]
            else:
                merged = {}
            if result_mode:
                ctx.replace_callback_metrics({**callback, **merged})
            elif out is not None:
                trainer.callback_metrics.update(out.callback)
        elif result_mode:
            reduced = [reduce_on_epoch(o) if o else EvalResult() for o in per_loader]
            merged_cb: dict[str, Any] = {}
            for i, r in enumerate(reduced):
                log, pbar = r.epoch_log_metrics(), r.epoch_pbar_metrics()
                results[i].update({**pbar, **log})
                merged_cb.update({**pbar, **log})
                if not sanity:
                    ctx.log_to_loggers(log)
                ctx.pbar_raw.update(pbar)
            callback = _eval_callback_values(reduced)
            for r in results:
                r.update(callback)
            ctx.replace_callback_metrics({**callback, **merged_cb})
        return results

    def _log_store_epoch(self, store: MetricStore, results: list[dict], sanity: bool) -> None:
        """2.x ``self.log`` epoch values: logged once, and into each dataloader's result."""
        ctx = self.ctx
        trainer = self.trainer
        log, pbar, callback = store.epoch_views()
        if log and not sanity:
            ctx.log_to_loggers(log)
        ctx.pbar_raw.update(pbar)
        trainer.callback_metrics.update(callback)
        for idx, result in enumerate(results):
            dl_log, _, _ = store.epoch_views(dataloader_idx=idx) if len(results) > 1 else (
                log, None, None)
            result.update(dl_log)
        for idx in range(len(results)):
            results[idx] = floats(results[idx])


def _eval_callback_values(results: list[Any]) -> dict[str, Any]:
    """``val_checkpoint_on`` / ``val_early_stop_on`` (None when not given; last loader wins)."""
    callback: dict[str, Any] = {"val_early_stop_on": None, "val_checkpoint_on": None}
    for r in results:
        if r.get("early_stop_on") is not None:
            callback["val_early_stop_on"] = r["early_stop_on"]
        if r.get("checkpoint_on") is not None:
            callback["val_checkpoint_on"] = r["checkpoint_on"]
    return callback
