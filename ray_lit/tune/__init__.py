"""Hyperparameter sweeps of ray_lit runs with Ray Tune: ``trainable`` and ``sweep``.

Each trial is a whole ray_lit run: the trial's driver (the Tune function) plus its workers. The
trainable asks Tune for all of it at once — one placement group with a bundle for the trial's
driver and one per worker — and the workers are placed in that trial's own bundles, so
concurrent trials can never deadlock waiting for each other's resources.

Every validation end, rank 0 writes a checkpoint into the run's storage and the trial's driver
reports the ``callback_metrics`` (as floats) with that checkpoint to Tune. A trial that Tune
restores (PBT exploit, ``Tuner.restore``, a trial restart) continues from the checkpoint; with
PBT the new config's learning rate replaces the restored one in the optimizers.

Warm workers across trials: with ``tune.TuneConfig(reuse_actors=True)`` Tune runs the next trial
of the same resources in the same trial actor and placement group. A trial that finished parks
its idle workers there (``driver.pool``), and the next trial forms its process group on them
and ships its own module: torch and ray_lit stay imported, nothing of the earlier trial stays
(a fresh module, optimizer, RNG and process group). Without ``reuse_actors`` every trial starts
its workers afresh. ``sweep`` turns it on by default (every trial of a sweep asks for the same
resources, so Tune can always hand one trial's actor to the next); ``sweep(...,
reuse_actors=False)`` turns it off. A ``tune.Tuner`` built by hand keeps Tune's own default
(off): pass ``tune.TuneConfig(reuse_actors=True)`` for warm trials there.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from typing import Any

from ray_lit.callbacks.base import Callback
from ray_lit.errors import MisconfigurationException

__all__ = ["trainable", "sweep", "TuneReportCallback"]

_CKPT_FILE = "ray_lit.ckpt"


class TuneReportCallback(Callback):
    """Runs where the loop runs: at each validation end (each training epoch end without
    validation) rank 0 saves a checkpoint and sends the metrics to the trial's driver."""

    def __init__(self, metric: str | None = None) -> None:
        self.metric = metric
        self._reports = 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.training:
            return
        self._report(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer._val_enabled:
            self._report(trainer)

    def _report(self, trainer: Any) -> None:
        from ray_lit.loop.outputs import floats

        metrics = floats(trainer.callback_metrics)
        if self.metric is not None and self.metric not in metrics:
            raise MisconfigurationException(
                f"Tune's metric {self.metric!r} is not logged by the module. Metrics that "
                f"exist: {sorted(metrics)}. Log it with self.log / result.log, or sweep on one "
                "of these.")
        metrics.update(epoch=trainer.current_epoch, global_step=trainer.global_step)
        self._reports += 1
        uri = f"{trainer.config.tune.checkpoint_root.rstrip('/')}/" \
              f"report-{self._reports:05d}.ckpt"
        trainer.save_checkpoint(uri)
        if trainer.is_global_zero:
            trainer._sink.report(metrics, uri)


def _report_to_tune(metrics: dict[str, float], uri: str) -> None:
    """Driver side (the trial's function): hand the checkpoint to Tune as a directory."""
    from ray import tune

    from ray_lit.storage.filesystem import Storage

    head, name = uri.rsplit("/", 1)
    data = Storage(head).read_bytes(name)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, _CKPT_FILE), "wb") as f:
            f.write(data)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
    Storage(head).delete(name)  # Tune keeps its own copy


def trial_resources(num_workers: Any, resources_per_worker: dict | None = None,
                    use_gpu: bool = False, accelerator: str = "auto") -> Any:
    """The placement group factory of one trial: the trial's driver plus its workers."""
    from ray.tune import PlacementGroupFactory

    from ray_lit.driver.placement import resolve_worker_resources

    count = num_workers[1] if isinstance(num_workers, (tuple, list)) else int(num_workers or 0)
    if count == 0:
        per = {"CPU": 1.0}
        if use_gpu:
            per["GPU"] = 1.0
        return PlacementGroupFactory([per])
    per_worker = resolve_worker_resources(use_gpu=use_gpu, accelerator=accelerator,
                                          resources_per_worker=resources_per_worker)
    return PlacementGroupFactory([{"CPU": 1.0}] + [dict(per_worker)] * count, strategy="PACK")


def trainable(build: Callable[[dict], Any], train_dataloaders: Any = None,
              val_dataloaders: Any = None, datamodule: Any = None, *,
              metric: str | None = None, **trainer_options: Any) -> Any:
    """A Tune trainable running one ray_lit fit per trial.

    Args:
        build: ``config -> LightningModule`` (a fresh module per trial).
        train_dataloaders, val_dataloaders, datamodule: as for ``Trainer.fit``.
        metric: optional; the first report fails with the list of logged metrics when the
            module never logs it (``sweep`` passes its ``metric``).
        **trainer_options: every ``Trainer`` option (``num_workers`` included).

    Returns:
        A function trainable already wrapped with the resources of a whole trial.
    """
    from ray import tune

    from ray_lit.config import TrainerConfig, TuneSpec

    TrainerConfig.from_options(dict(trainer_options))  # bad options fail before any trial
    options = dict(trainer_options)

    def _run_trial(config: dict) -> None:
        from ray_lit.trainer import Trainer

        context = tune.get_context()
        trial_dir = context.get_trial_dir()
        module = build(config)
        trial_options = dict(options)
        callbacks = list(trial_options.pop("callbacks", None) or [])
        callbacks.append(TuneReportCallback(metric))
        trial_options.setdefault("enable_progress_bar", False)
        trial_options.setdefault("default_root_dir", trial_dir)
        trial_options.setdefault("storage_path", os.path.join(trial_dir, "ray_lit"))
        trial_options.setdefault("run_name", "run")
        trainer = Trainer(callbacks=callbacks, **trial_options)
        ckpt_path = None
        restored = tune.get_checkpoint()
        if restored is not None:
            local = restored.to_directory(os.path.join(trial_dir, "restored"))
            ckpt_path = os.path.join(local, _CKPT_FILE)
        # a declared, typed part of the config the workers get; PBT: the new config's lr wins
        trainer.config = dataclasses.replace(trainer.config, tune=TuneSpec(
            checkpoint_root=os.path.join(trial_dir, "reports"), report_fn=_report_to_tune,
            restore_lr_from_config=restored is not None))
        trainer.fit(module, train_dataloaders=train_dataloaders,
                    val_dataloaders=val_dataloaders, datamodule=datamodule, ckpt_path=ckpt_path)
        _park_workers(trainer)

    _run_trial.__name__ = getattr(build, "__name__", "ray_lit_trial")
    resources = trial_resources(options.get("num_workers", 0),
                                options.get("resources_per_worker"),
                                bool(options.get("use_gpu") or options.get("gpus")),
                                options.get("accelerator", "auto"))
    _check_trial_fits(resources.bundles)
    return tune.with_resources(_run_trial, resources)


def _park_workers(trainer: Any) -> None:
    """The trial is over: its idle workers wait in the warm pool of this trial actor for the
    next trial Tune runs here (``reuse_actors``); if Tune ends the actor instead, they end with
    it. Parked now, not when the Trainer is garbage collected: the next trial may start first,
    and its workers need these places of the placement group."""
    kept = trainer.__dict__.get("_kept")  # the Trainer's worker group (``driver.launch``)
    if kept is not None:
        kept.park()


def _check_trial_fits(bundles: list[dict[str, float]]) -> None:
    """A trial that can never be placed fails now, not as a trial pending forever (checked when
    Ray is already connected, as ``sweep`` makes sure)."""
    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            need[key] = need.get(key, 0.0) + value
    missing = {k: v for k, v in need.items() if total.get(k, 0.0) < v}
    if missing:
        have = {k: total.get(k, 0.0) for k in need}
        raise MisconfigurationException(
            f"One trial needs {need} (its driver plus {len(bundles) - 1} worker(s)) but the "
            f"cluster has {have}. Use fewer workers per trial (num_workers), smaller "
            "resources_per_worker, or a bigger cluster.")


def sweep(build: Callable[[dict], Any], param_space: dict[str, Any], *, metric: str,
          mode: str = "min", num_samples: int = 1, scheduler: Any = None,
          search_alg: Any = None, max_concurrent_trials: int | None = None,
          storage_path: str | None = None, name: str | None = None,
          train_dataloaders: Any = None, val_dataloaders: Any = None, datamodule: Any = None,
          reuse_actors: bool = True, **trainer_options: Any) -> Any:
    """``tune.Tuner(trainable(...), ...).fit()`` in one call (the driver calls it).

    Args:
        build, train_dataloaders, val_dataloaders, datamodule, trainer_options: as for
            ``trainable``.
        param_space, metric, mode, num_samples, scheduler, search_alg,
            max_concurrent_trials: Tune's, as for ``tune.TuneConfig`` / ``tune.Tuner``.
        storage_path, name: where Tune keeps the sweep (``tune.RunConfig``).
        reuse_actors: warm trials (default True): a trial that ends leaves its trial actor,
            placement group and idle workers to the next trial, which starts in a fraction
            of a second instead of importing torch on every worker again. Every run still
            gets a fresh module, optimizer, RNG seed and process group (a seeded trial learns
            bit for bit what it learns on fresh workers); what the trial's own process keeps
            is Python's module state of the user's code (as for any Tune trial reused).
            False: every trial starts its own workers.

    Returns:
        Tune's ``ResultGrid``.

    Raises:
        MisconfigurationException: ``reuse_actors`` is not a bool, or a Trainer option is
            invalid (before any trial starts).
    """
    from ray import tune

    from ray_lit.driver.launch import ensure_ray

    if not isinstance(reuse_actors, bool):
        raise MisconfigurationException(
            f"sweep(reuse_actors={reuse_actors!r}) must be True (warm trials: the next trial "
            "runs on the workers of the last) or False (every trial starts its own workers).")
    ensure_ray()
    tuner = tune.Tuner(
        trainable(build, train_dataloaders, val_dataloaders, datamodule, metric=metric,
                  **trainer_options),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples,
                                    scheduler=scheduler, search_alg=search_alg,
                                    max_concurrent_trials=max_concurrent_trials,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(storage_path=storage_path, name=name),
    )
    return tuner.fit()
