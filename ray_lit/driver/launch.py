"""From ``Trainer.fit`` / ``validate`` / ``test`` to a Ray worker group and back (driver side).

``launch_fit`` checks what can be checked before any worker starts (the cluster can place the
workers, the module and data pickle, the storage is writable), ships the module and data once
through the object store, runs the controller, and puts rank 0's results into the user's module
and Trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
import weakref
from typing import Any

import cloudpickle
import numpy as np

from ray_lit.driver.pool import POOL, current_ray_job
from ray_lit.driver.results import apply_final_state
from ray_lit.errors import MisconfigurationException
from ray_lit.messages import CheckpointSpec, Job, RunSpec

log = logging.getLogger("ray_lit")


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS`` or a running cluster, else start a local one (loopback)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address)
        return
    if not address:
        try:
            ray.init(address="auto")
            return
        except ConnectionError:
            pass
    # a local single-node Ray started by us (also for RAY_ADDRESS=local): nothing listens
    # beyond loopback, and no dashboard to start
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", include_dashboard=False)


def _device_type(config: Any) -> str:
    if config.accelerator == "tpu":
        return "tpu"
    return "cuda" if config.use_gpu else "cpu"


def _num_workers(config: Any) -> int:
    """Workers that must be placeable at all: ``min`` of an elastic range."""
    workers = config.num_workers
    return workers[0] if isinstance(workers, tuple) else int(workers)


def run_spec(trainer: Any) -> RunSpec:
    """The Trainer as the workers get it (``RunSpec``): its options, callbacks and logger
    proxies, and the few fields a later stage reads; no progress bar, no loop state."""
    from ray_lit.callbacks.progress import ProgressBar
    from ray_lit.worker.logger_proxy import LoggerProxy

    callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, ProgressBar)]
    for i, callback in enumerate(callbacks):
        # the key rank 0's state comes back under (``FinalState.callbacks``): it travels with
        # the pickled callback, where ``state_key`` may not (a class pickled by value loses
        # its ``__qualname__``)
        callback.__dict__["_ray_lit_key"] = f"driver-callback-{i}"
    return RunSpec(
        trainer_class=type(trainer),
        # the callbacks and loggers travel as themselves (tagged / proxied) below: the
        # options' copies (the real loggers included) stay on the driver
        config=dataclasses.replace(trainer.config, callbacks=[], logger=False),
        default_root_dir=trainer.default_root_dir,
        callbacks=tuple(callbacks),
        # the index says which driver logger a rank-0 ``logger.experiment`` call is applied to
        loggers=tuple(LoggerProxy.of(logger, i) for i, logger in enumerate(trainer.loggers)),
        run_dir=trainer.run_dir,
        progress=trainer._progress.state_dict(),
        num_restarts=trainer.num_restarts,
        world_size_history=tuple(trainer.world_size_history),
        tested_ckpt_path=trainer.tested_ckpt_path,
        extras=_user_attributes(trainer),
    )


def _user_attributes(trainer: Any) -> dict[str, Any]:
    """Public attributes the base Trainer does not define: a subclass's or the user's own.

    Private names are the Trainer's machinery on the driver (the controller, kept group,
    loaders) and never travel.
    """
    from ray_lit.loop.trainer_state import LoopState

    base = LoopState.__new__(LoopState)
    base._init_loop_state()
    base._init_run_fields()
    own = set(base.__dict__) | {"config", "default_root_dir", "callbacks", "loggers"}
    return {name: value for name, value in trainer.__dict__.items()
            if not name.startswith("_") and name not in own}


def _ship(payload: dict[str, Any]) -> Any:
    """One object-store transfer of everything the workers need, or an error naming the
    attribute that cannot be pickled."""
    import ray

    from ray_lit.driver.pickling import find_unpicklable

    try:
        blob = cloudpickle.dumps(payload)
    except Exception as err:
        for name, value in payload.items():
            # the spec is the user's Trainer as it travels: its paths read ``trainer.callbacks``
            culprit = find_unpicklable(value, "trainer" if name == "spec" else name)
            if culprit:
                raise MisconfigurationException(
                    f"Cannot ship {'the Trainer' if name == 'spec' else name} to the Ray workers: "
                    f"{culprit} cannot be pickled. "
                    "Create such objects in setup() or the *_dataloader() hooks instead of "
                    "__init__, or keep them out of the module.") from err
        raise MisconfigurationException(
            f"Cannot ship the run to the Ray workers: {err}") from err
    # As a NumPy array the bytes travel out of band: each worker unpickles straight from the
    # object store's shared memory instead of first copying them into its heap, which saves one
    # copy of the payload (data sets built on the driver included) at every worker's peak.
    return ray.put(np.frombuffer(blob, dtype=np.uint8))


def _group_options(trainer: Any) -> dict[str, Any]:
    from ray_lit.driver.placement import check_feasible, resolve_worker_resources

    config = trainer.config
    per_worker = resolve_worker_resources(use_gpu=config.use_gpu, accelerator=config.accelerator,
                                          resources_per_worker=config.resources_per_worker)
    num_workers = _num_workers(config)
    inside_tune = config.tune is not None
    if not inside_tune:  # a Tune trial's resources were reserved by Tune already
        check_feasible(num_workers, per_worker, config.placement_strategy)
    env = {}
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "RAY_LIT_WORKER_SETUP"):
        if key in os.environ:
            env[key] = os.environ[key]
    return {"num_workers": num_workers, "per_worker": per_worker,
            "strategy": config.placement_strategy, "device_type": _device_type(config),
            "placement_timeout_s": config.placement_timeout_s,
            "pg_timeout_s": config.process_group_timeout_s, "env": env,
            "use_current_pg": inside_tune}


def _run_uri(trainer: Any) -> str:
    config = trainer.config
    root = config.storage_path or (config.default_root_dir or os.path.join(os.getcwd(),
                                                                           "ray_lit_runs"))
    if config.run_name is None:
        # unique: two Trainers started in the same second must not share a run directory
        # (the second would resume the first's checkpoints); a rerun that should continue a
        # run names it (``run_name=``)
        run_name = time.strftime("ray_lit_%Y%m%d_%H%M%S") + f"_{secrets.token_hex(2)}"
        # a new config, not a mutated one: options are validated once and then only replaced
        config = trainer.config = dataclasses.replace(config, run_name=run_name)
    root = os.fspath(root)
    if "://" not in root:
        root = os.path.abspath(root)  # workers resolve paths in their own cwd
    return f"{root.rstrip('/')}/{config.run_name}"


class KeptGroup:
    """The worker group a Trainer keeps between ``fit`` / ``validate`` / ``test`` / ``predict``
    (driver side). ``trainer.teardown()`` releases it; when the Trainer is garbage collected it
    is parked in the warm pool for the next Trainer (``driver.pool``); at interpreter exit Ray
    kills a driver's actors."""

    def __init__(self) -> None:
        self.group: Any = None
        self.options: dict[str, Any] | None = None
        self.ray_job: str | None = None  # the Ray session the group was started in

    def take(self, options: dict[str, Any]) -> Any:
        """The kept group when it was formed with the same options, else None (a group
        formed otherwise is released)."""
        current = self.current()
        group, self.group = self.group, None
        if group is not None and (not current or self.options != options):
            if current:
                group.shutdown()
            group = None
        return group

    def keep(self, group: Any, options: dict[str, Any]) -> None:
        self.release()
        self.group, self.options, self.ray_job = group, dict(options), current_ray_job()

    def current(self) -> bool:
        """Whether the kept group belongs to this Ray session (a test, a notebook, may have
        restarted Ray since: then its actors are gone and must not be called)."""
        return self.group is not None and self.ray_job == current_ray_job()

    def release(self) -> None:
        import ray

        current = self.current()
        group, self.group = self.group, None
        # after ray.shutdown() (or at exit, after Ray's own atexit) the actors are gone
        # already, and a call would start a new Ray
        if current and ray.is_initialized():
            group.shutdown()

    def park(self) -> None:
        """The Trainer went: leave its idle group to the next Trainer (``driver.pool``)."""
        import ray

        current = self.current()
        group, self.group = self.group, None
        if current and ray.is_initialized():
            POOL.park(group, self.options or {})


# every Trainer's kept group in this driver process (alive while its Trainer is)
_ALL_KEPT: weakref.WeakSet[KeptGroup] = weakref.WeakSet()


def _kept_group(trainer: Any) -> KeptGroup:
    kept = trainer.__dict__.get("_kept")
    if kept is None:
        kept = trainer._kept = KeptGroup()
        _ALL_KEPT.add(kept)
        # parked with the Trainer's end (the finalizer holds the holder, never the Trainer)
        weakref.finalize(trainer, kept.park)
    return kept


def _warm_group(options: dict[str, Any], besides: KeptGroup) -> Any:
    """Workers of an earlier Trainer placed like ``options``, for a call that has no group of
    its own: a parked group, else another Trainer's idle one (``Survivors``: the controller
    forms a new process group on them), or None. With None, the idle groups of every shape
    give their resources back first, so they never block the group about to be placed."""
    warm = POOL.take(options)
    if warm is not None:
        return warm
    for kept in list(_ALL_KEPT):
        if kept is not besides and kept.current() and kept.options == options:
            group, kept.group = kept.group, None
            try:
                survivors = group.salvage(abort_timeout_s=5.0)
            except Exception:  # noqa: BLE001 (a worker went while idle: start afresh)
                survivors = None
            if survivors is not None and len(survivors.actors) == len(survivors.slots):
                survivors.snapshots, survivors.confirmations = {}, []
                return survivors
            if survivors is not None:
                survivors.release()
    POOL.drain()
    _release_idle_groups(besides)
    return None


def _release_idle_groups(besides: KeptGroup) -> None:
    """Before a new group forms, other Trainers' idle groups give their resources back (a
    Trainer no longer used, or not yet garbage collected, never blocks a new one)."""
    for kept in list(_ALL_KEPT):
        if kept is not besides:
            kept.release()


def _run_stage(trainer: Any, job: Job, payload: dict[str, Any], *, manager: Any = None,
               hang_timeout_s: float | None = None, collector: Any = None) -> Any:
    """Run ``job`` on the Trainer's worker group (reused when one is kept and still fits,
    else formed) and return rank 0's ``FinalState``. A group that finished is kept for the
    Trainer's next call; after a failure or a Ctrl-C it was released."""
    from ray_lit.driver.controller import Controller

    ensure_ray()
    group_options = _group_options(trainer)
    payload_ref = _ship(payload)
    sink = trainer._driver_sink()
    trainer._sink = sink
    kept = _kept_group(trainer)
    reuse = kept.take(group_options)
    warm = _warm_group(group_options, besides=kept) if reuse is None else None
    controller = Controller(trainer=trainer, payload_ref=payload_ref, job=job,
                            group_options=group_options, sink=sink, manager=manager,
                            hang_timeout_s=hang_timeout_s, reuse=reuse, keep_group=True,
                            warm=warm)
    controller.prediction_collector = collector
    trainer._controller = controller
    try:
        result = controller.run()
    finally:
        if controller.kept_group is not None:
            kept.keep(controller.kept_group, group_options)
    return cloudpickle.loads(result)


def launch_fit(trainer: Any, module: Any, train: Any, val: Any, datamodule: Any,
               ckpt_path: str | None) -> None:
    """``Trainer.fit`` on a Ray worker group (driver)."""
    import ray

    from ray_lit.checkpoint.manager import CheckpointManager
    from ray_lit.core.seed import global_seed
    from ray_lit.storage.filesystem import Storage
    from ray_lit.storage.retry import launch_retry

    config = trainer.config
    # before ``_run_uri`` names a new run: a rerun of a named run waits out a storage outage
    retry = launch_retry(config.run_name, config.resume, config.storage_retry_timeout_s)
    run_uri = _run_uri(trainer)
    Storage(run_uri, retry=retry).check_writable()  # before any worker starts
    trainer.run_dir = run_uri
    ensure_ray()
    manager = CheckpointManager(run_uri, keep=config.keep_checkpoints,
                                retry_timeout_s=config.storage_retry_timeout_s)
    resume_from = None
    if ckpt_path is not None:
        resume_from = ckpt_path
    elif config.resume not in ("auto", "never", None):
        resume_from = config.resume
    # a resume checkpoint is put in the object store once, not sent to every worker by value
    checkpoint_ref = None
    if resume_from is not None:
        checkpoint_ref = ray.put(trainer._load_resume_checkpoint(resume_from))
    job = Job(stage="fit", seed=global_seed(), sampler_seed=global_seed() or 0,
              use_gpu=config.use_gpu, accelerator=config.accelerator,
              checkpointing=CheckpointSpec(run_uri, config.checkpoint_every_n_steps,
                                           config.snapshot_every_n_steps),
              checkpoint=checkpoint_ref,
              resume_latest=ckpt_path is None and config.resume == "auto")
    payload = {"spec": run_spec(trainer), "module": module, "train": train,
               "val": val, "dm": datamodule}
    try:
        state = _run_stage(trainer, job, payload, manager=manager,
                           hang_timeout_s=config.worker_hang_timeout_s)
    except KeyboardInterrupt:
        trainer.interrupted = True
        trainer._sink.finalize("interrupted")
        log.warning("ray_lit: interrupted; the worker group was released.")
        return
    apply_final_state(trainer, module, datamodule, state)


def launch_evaluation(trainer: Any, stage: str, module: Any, loaders: Any, datamodule: Any,
                      weights: dict | None) -> list[dict[str, float]]:
    """``Trainer.validate`` / ``test`` on a Ray worker group (driver)."""
    import ray

    ensure_ray()
    job = Job(stage=stage, use_gpu=trainer.config.use_gpu,
              accelerator=trainer.config.accelerator,
              weights=ray.put(weights) if weights is not None else None)
    state = _run_stage(trainer, job, {"spec": run_spec(trainer), "module": module,
                                      "loaders": loaders, "dm": datamodule},
                       hang_timeout_s=trainer.config.worker_hang_timeout_s)
    apply_final_state(trainer, module, datamodule, state, fitted=False)
    return state.results


def launch_predict(trainer: Any, module: Any, loaders: Any, datamodule: Any,
                   weights: dict | None, return_predictions: bool) -> list[Any] | None:
    """``Trainer.predict`` on a Ray worker group (driver).

    Every rank predicts its shard and streams its batch outputs with its polls; the
    controller hands them to a ``PredictionCollector`` (``driver.predictions``), which puts
    them in dataloader order once every rank is done. With ``return_predictions=False`` the
    ranks send none (their prediction writers are the output) and this returns None.
    """
    import ray

    from ray_lit.core.seed import global_seed
    from ray_lit.driver.predictions import PredictionCollector

    ensure_ray()
    job = Job(stage="predict", sampler_seed=global_seed() or 0, use_gpu=trainer.config.use_gpu,
              accelerator=trainer.config.accelerator,
              weights=ray.put(weights) if weights is not None else None,
              return_predictions=return_predictions)
    collector = PredictionCollector()
    trainer._prediction_collector = collector  # what arrived, for tests and diagnostics
    state = _run_stage(trainer, job, {"spec": run_spec(trainer), "module": module,
                                      "loaders": loaders, "dm": datamodule},
                       hang_timeout_s=trainer.config.worker_hang_timeout_s, collector=collector)
    apply_final_state(trainer, module, datamodule, state, fitted=False)
    if not return_predictions:
        return None
    return collector.assemble(state.results)
