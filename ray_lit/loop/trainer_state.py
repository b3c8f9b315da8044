"""The state and helpers the loops use on the Trainer (the object callbacks see as ``trainer``).

``LoopState`` is a base class of ``ray_lit.Trainer``; it holds the run's counters and metric
dictionaries and the small services the loops call (batch transfer, logging cadence, progress
bar view, step dispatch). Kept apart from ``trainer.py`` so that file stays about options and
stages.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import torch

from ray_lit.core.hooks import _signature_of
from ray_lit.core.metric_store import MetricStore
from ray_lit.loop.optimization import accumulation_for_epoch
from ray_lit.loop.outputs import floats, to_float, training_output
from ray_lit.loop.progress import Progress


class LoopState:
    """Counters, metric dictionaries and loop services shared by the fit and eval loops."""

    def _init_loop_state(self) -> None:
        self._progress = Progress()
        self.callback_metrics: dict[str, Any] = {}
        self.logged_metrics: dict[str, Any] = {}
        self._pbar_raw: dict[str, Any] = {}
        # outside a running loop stage the store only checks that the hook may log
        self._metric_store: Any = MetricStore("idle")
        self._running_losses: collections.deque = collections.deque(maxlen=20)
        self._eval_steps: dict[str, int] = {}
        self.should_stop = False
        self.sanity_checking = False
        self.training = self.validating = self.testing = False
        self.interrupted = False
        self._val_ran_this_epoch = False
        self._val_enabled = False
        self._val_check_batch: float = 1
        self._accumulation = 1
        self._restarted_mid_epoch = False
        self.num_training_batches: float = 0
        self.num_val_batches: list[float] = []
        self.num_test_batches: list[float] = []

    # --- counters as Lightning names them ---------------------------------------------------
    @property
    def current_epoch(self) -> int:
        return self._progress.epoch

    @property
    def global_step(self) -> int:
        return self._progress.global_step

    @property
    def running_sanity_check(self) -> bool:
        return self.sanity_checking

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        return floats(self._pbar_raw)

    @property
    def progress_bar_dict(self) -> dict[str, Any]:
        module = getattr(self, "lightning_module", None)
        base = module.get_progress_bar_dict() if module is not None else {}
        return {**base, **self.progress_bar_metrics}

    # --- loop services -------------------------------------------------------------------------
    def _accumulation_for_epoch(self, epoch: int) -> int:
        return accumulation_for_epoch(self.config.accumulate_grad_batches, epoch)

    def _transfer_batch(self, batch: Any, dataloader_idx: int) -> Any:
        """``on_before_batch_transfer`` -> ``transfer_batch_to_device`` ->
        ``on_after_batch_transfer`` (datamodule hooks win over the module's)."""
        module, dm, device = self.lightning_module, self.datamodule, self._host.device
        owner = module
        if dm is not None and type(dm).transfer_batch_to_device is not \
                _dm_base().transfer_batch_to_device:
            owner = dm
        hooks = self._hooks
        before = hooks.overridden("on_before_batch_transfer")
        after = hooks.overridden("on_after_batch_transfer")
        custom = owner is dm or hooks.overridden("transfer_batch_to_device")
        if before:
            batch = module.on_before_batch_transfer(batch, dataloader_idx)
        if custom:
            fn = owner.transfer_batch_to_device
            if len(_signature_of(fn)[0]) >= 3:
                batch = fn(batch, device, dataloader_idx)
            else:
                batch = fn(batch, device)
        elif device.type != "cpu":
            batch = module.transfer_batch_to_device(batch, device, dataloader_idx)
        if after:
            batch = module.on_after_batch_transfer(batch, dataloader_idx)
        return batch

    def _call_step(self, name: str, *args: Any) -> Any:
        module = self.lightning_module
        previous = module._current_fx_name
        module.__dict__["_current_fx_name"] = name
        try:
            return self._host.call_step(name, *args)
        finally:
            module.__dict__["_current_fx_name"] = previous

    def _training_step_end(self, raw: Any) -> Any:
        """``training_step_end``: each rank's own output, or (``gather_step_outputs=True``,
        the seed's dp/ddp2 use case) the outputs of all ranks gathered with a differentiable
        all-gather. COLLECTIVE when gathering."""
        if not self._hooks.overridden("training_step_end"):
            return raw
        if self.config.gather_step_outputs:
            raw = _gather_tree(raw, self._host.all_gather)
        return self._hooks.module("training_step_end", raw)

    def _manual_training_step(self, batch: Any, batch_idx: int) -> Any:
        raw = self._call_step("training_step", batch, batch_idx)
        if raw is None or (isinstance(raw, dict) and "loss" not in raw):
            from ray_lit.loop.outputs import StepOutput

            return StepOutput(raw=raw, kept=raw)
        return training_output(raw)

    def _manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self._precision.scale(loss).backward(*args, **kwargs)

    def _record_loss(self, loss: torch.Tensor) -> None:
        self._running_losses.append(loss)

    def _running_loss_value(self) -> float | None:
        if not self._running_losses:
            return None
        return float(torch.stack(list(self._running_losses)).float().mean().item())

    def _logger_version(self) -> Any:
        loggers = getattr(self, "loggers", [])
        return loggers[0].version if loggers else None

    def _pbar_view(self) -> dict[str, Any]:
        """What the progress bar shows now (host sync: only called at the refresh cadence)."""
        return self.progress_bar_dict

    def _should_log_step(self, batch_idx: int, should_step: bool = True) -> bool:
        """Log cadence: every ``log_every_n_steps`` batches (0.9); while accumulating, only at
        the optimizer steps, every ``log_every_n_steps`` of them (2.x never logs mid-window)."""
        if self.config.fast_dev_run or self.should_stop:
            return True
        every = self.config.log_every_n_steps
        if self._accumulation == 1:
            return (batch_idx + 1) % every == 0
        return should_step and (self._progress.batches_that_stepped + 1) % every == 0

    def _log_to_loggers(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record ``metrics`` in ``logged_metrics`` and send them to the loggers (as floats).

        Without an explicit step a ``'step'`` key is used as the step, otherwise the global
        step, and ``'epoch'`` is added (spec §1.8).
        """
        metrics = dict(metrics)
        if step is None:
            explicit = metrics.pop("step", None)
            step = int(to_float(explicit)) if explicit is not None else \
                self._progress.batches_that_stepped
            metrics["epoch"] = self.current_epoch
        for key, value in metrics.items():
            if key != "epoch":
                self.logged_metrics[key] = value
        if self.loggers:
            self._sink.log_metrics(floats(metrics), step)

    def _next_eval_step(self, stage: str) -> int:
        step = self._eval_steps.get(stage, 0)
        self._eval_steps[stage] = step + 1
        return step

    def _replace_callback_metrics(self, metrics: dict[str, Any]) -> None:
        self.callback_metrics.clear()
        self.callback_metrics.update(metrics)

    def _monitoring_callbacks(self) -> list[Any]:
        from ray_lit.callbacks.early_stopping import EarlyStopping
        from ray_lit.callbacks.model_checkpoint import ModelCheckpoint

        return [cb for cb in self.callbacks if isinstance(cb, (ModelCheckpoint, EarlyStopping))]

    def _default_checkpoint_dir(self) -> str:
        root = self.default_root_dir
        if self.loggers:
            logger = self.loggers[0]
            save_dir = getattr(logger, "save_dir", None) or root
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            return os.path.join(save_dir, str(logger.name), version, "checkpoints")
        return os.path.join(root, "checkpoints")

    def _run_validation(self) -> None:
        """Validation inside fit; rank 0's stop decision then holds for every rank."""
        from ray_lit.loop.eval_loop import EvalLoop

        EvalLoop(self, "validate").run(self._val_loaders, self.num_val_batches)
        self._val_ran_this_epoch = True
        self.should_stop = self._host.agree_on_rank_zero(self.should_stop)  # COLLECTIVE

    def _refresh_epoch_length(self) -> None:
        """Batches this epoch runs (a resumed epoch may have been re-sharded)."""
        from ray_lit.loop.data import limit_batches

        length = self._host.epoch_length(self._train_loader, self._progress.batches_done)
        self.num_training_batches = limit_batches(length, self.config.limit_train_batches,
                                                  "limit_train_batches")

    def _after_train_step(self, is_last: bool) -> None:
        if self.config.terminate_on_nan and self._running_losses:
            last = self._running_losses[-1]
            if not torch.isfinite(last).all():
                raise ValueError("The loss returned in `training_step` is nan or inf.")
        self._host.after_train_step(self, is_last)

    def _after_epoch(self) -> None:
        self._host.after_epoch(self)


def _dm_base() -> type:
    from ray_lit.core.datamodule import LightningDataModule

    return LightningDataModule


def _gather_tree(value: Any, gather: Any) -> Any:
    """All-gather every tensor in a step output (dicts, lists, Results keep their shape)."""
    from ray_lit.core.results import Result

    if isinstance(value, torch.Tensor):
        return gather(value)
    if isinstance(value, Result):
        out = value.copy()
        for key in list(out.keys()):
            if key != "meta" and isinstance(dict.__getitem__(out, key), torch.Tensor):
                dict.__setitem__(out, key, gather(dict.__getitem__(out, key)))
        return out
    if isinstance(value, dict):
        return {k: _gather_tree(v, gather) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_gather_tree(v, gather) for v in value)
    return value
