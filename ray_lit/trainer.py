"""``Trainer`` and ``ray_lit.fit``: options in, a run out.

``Trainer(**options)`` validates its options once. ``fit`` / ``validate`` / ``test`` run the loop
in this process for ``num_workers=0`` and on a Ray worker group otherwise
(``ray_lit.driver.launch``); either way the Trainer afterwards holds the run's state as a
single-process Lightning user expects (metrics, epoch, step, checkpoint paths).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from ray_lit.adoption import adopt_callbacks, adopt_datamodule, adopt_module, check_loggers
from ray_lit.callbacks.base import Callback
from ray_lit.config import TrainerConfig
from ray_lit.core.datamodule import LightningDataModule
from ray_lit.core.hooks import is_overridden
from ray_lit.core.module import LightningModule
from ray_lit.driver.reporting import DriverSink
from ray_lit.errors import MisconfigurationException
from ray_lit.loop.data import as_loader_list
from ray_lit.loop.host import LocalHost
from ray_lit.loop.trainer_state import LoopState


class Trainer(LoopState):
    """Runs a ``LightningModule``: ``Trainer(max_epochs=3, num_workers=2).fit(model)``.

    All options are keyword arguments (see README for the table); an unknown option or a bad
    value raises ``MisconfigurationException`` naming it and the fix.
    """

    def __init__(self, **options: Any) -> None:
        self.config = TrainerConfig.from_options(options)
        self._init_loop_state()
        config = self.config
        root = os.fspath(config.default_root_dir or os.getcwd())
        # absolute: Ray workers run in their own working directories
        self.default_root_dir = root if "://" in root else os.path.abspath(root)
        # callbacks built on the real Lightning package run adopted (ray_lit.adoption)
        self.callbacks: list[Callback] = adopt_callbacks(list(config.callbacks))
        self.loggers = self._build_loggers(config.logger)
        self._add_default_callbacks()
        self._init_run_fields()
        self._host = LocalHost(config.use_gpu, config.strategy)
        for cb in self.callbacks:
            cb.on_init_start(self)
        for cb in self.callbacks:
            cb.on_init_end(self)

    # --- the command line (0.9) -----------------------------------------------------------------
    @classmethod
    def add_argparse_args(cls, parent_parser: Any) -> Any:
        """Return a parser with ``parent_parser``'s options and the Trainer's (0.9 idiom).

        ``--num_workers`` is not added (scripts use it for their DataLoaders): the Ray worker
        count is ``--ray_workers``.
        """
        from ray_lit.config import add_argparse_args

        return add_argparse_args(parent_parser)

    @classmethod
    def from_argparse_args(cls, args: Any, **kwargs: Any) -> Trainer:
        """``Trainer`` from a parsed ``Namespace`` (options left at their defaults are not
        passed); ``kwargs`` override. The script's ``args.num_workers`` is never read."""
        from ray_lit.config import options_from_argparse

        return cls(**options_from_argparse(args, kwargs))

    # --- construction --------------------------------------------------------------------------
    def _build_loggers(self, logger: Any) -> list[Any]:
        if logger is True:
            from ray_lit.loggers import TensorBoardLogger

            return [TensorBoardLogger(save_dir=self.default_root_dir, name="lightning_logs")]
        if logger is False or logger is None:
            return []
        if isinstance(logger, (list, tuple)):
            return list(logger)
        return [logger]

    def _add_default_callbacks(self) -> None:
        from ray_lit.callbacks.early_stopping import EarlyStopping
        from ray_lit.callbacks.model_checkpoint import ModelCheckpoint
        from ray_lit.callbacks.progress import ProgressBar

        config = self.config
        es = config.early_stop_callback
        if es is True:
            self.callbacks.append(EarlyStopping(monitor="val_loss", patience=3, verbose=True))
        elif isinstance(es, EarlyStopping):
            self.callbacks.append(es)
        checkpointing = config.enable_checkpointing
        if isinstance(checkpointing, ModelCheckpoint):  # 0.9: checkpoint_callback=ModelCheckpoint
            self.callbacks.append(checkpointing)
        elif checkpointing and not any(isinstance(c, ModelCheckpoint) for c in self.callbacks):
            self.callbacks.append(ModelCheckpoint())
        if not checkpointing and any(isinstance(c, ModelCheckpoint) for c in self.callbacks):
            raise MisconfigurationException(
                "enable_checkpointing=False but a ModelCheckpoint is in callbacks; drop one.")
        # checkpoints go last so they save the state the other callbacks reached (2.x)
        self.callbacks = [c for c in self.callbacks if not isinstance(c, ModelCheckpoint)] + \
            [c for c in self.callbacks if isinstance(c, ModelCheckpoint)]
        bars = [c for c in self.callbacks if isinstance(c, ProgressBar)]
        if len(bars) > 1:
            raise MisconfigurationException("Only one ProgressBar callback is allowed.")
        if config.enable_progress_bar and not bars:
            self.callbacks.append(ProgressBar())
        elif not config.enable_progress_bar:
            for bar in bars:
                bar.disable()

    # --- properties of the run -----------------------------------------------------------------
    @property
    def logger(self) -> Any:
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        logger = self.logger
        if logger is not None and getattr(logger, "log_dir", None):
            return logger.log_dir
        return self.default_root_dir

    @property
    def model(self) -> LightningModule | None:
        return self.lightning_module

    @property
    def progress_bar_callback(self) -> Any:
        from ray_lit.callbacks.progress import ProgressBar

        return next((c for c in self.callbacks if isinstance(c, ProgressBar)), None)

    @property
    def checkpoint_callbacks(self) -> list[Any]:
        from ray_lit.callbacks.model_checkpoint import ModelCheckpoint

        return [c for c in self.callbacks if isinstance(c, ModelCheckpoint)]

    @property
    def checkpoint_callback(self) -> Any:
        found = self.checkpoint_callbacks
        return found[0] if found else None

    @property
    def early_stopping_callback(self) -> Any:
        from ray_lit.callbacks.early_stopping import EarlyStopping

        return next((c for c in self.callbacks if isinstance(c, EarlyStopping)), None)

    early_stop_callback = early_stopping_callback

    @property
    def lr_schedulers(self) -> list[Any]:
        return self.lr_scheduler_configs

    @property
    def max_epochs(self) -> int:
        return self.config.max_epochs

    @property
    def max_steps(self) -> int | None:
        return self.config.max_steps

    @property
    def min_epochs(self) -> int | None:
        return self.config.min_epochs

    @property
    def precision(self) -> Any:
        return self.config.precision

    @property
    def global_rank(self) -> int:
        return self._host.world_rank

    world_rank = global_rank

    @property
    def local_rank(self) -> int:
        return self._host.local_rank

    @property
    def node_rank(self) -> int:
        return self._host.node_rank

    @property
    def world_size(self) -> int:
        return self._host.world_size

    @property
    def is_global_zero(self) -> bool:
        return self._host.world_rank == 0

    @property
    def num_workers(self) -> Any:
        return self.config.num_workers

    # 0.9 flags user code branches on (``if self.use_ddp or self.use_ddp2: gather ...``)
    @property
    def use_ddp(self) -> bool:
        """True in a run on Ray workers (each one a DDP rank)."""
        return bool(self.config.num_workers) or self.world_size > 1

    @property
    def use_ddp2(self) -> bool:
        return False

    @property
    def use_dp(self) -> bool:
        return False

    @property
    def use_horovod(self) -> bool:
        return False

    @property
    def use_tpu(self) -> bool:
        return self.config.accelerator == "tpu"

    @property
    def on_gpu(self) -> bool:
        return bool(self.config.use_gpu)

    @property
    def use_single_gpu(self) -> bool:
        return self.on_gpu and not self.use_ddp

    @property
    def data_parallel(self) -> bool:
        return self.use_ddp

    @property
    def use_amp(self) -> bool:
        """Mixed precision is on (``precision=16`` / ``"bf16"``)."""
        return str(self.config.precision) not in ("32", "64", "32-true", "64-true")

    # --- checks before anything runs -----------------------------------------------------------
    def _check_module(self, model: Any, stage: str) -> LightningModule:
        """The module ``stage`` runs: ``model`` itself, or for a module built on the real
        Lightning package its adopted twin sharing ``model``'s state (``ray_lit.adoption``)."""
        check_loggers(self.loggers)
        model = adopt_module(model)
        if not isinstance(model, LightningModule):
            raise MisconfigurationException(
                f"trainer.{stage}() needs a LightningModule, got {type(model).__name__}. "
                "Subclass `ray_lit.LightningModule` (or Lightning 2.x's "
                "`lightning.pytorch.LightningModule`).")
        if stage == "fit":
            if not is_overridden("training_step", model, LightningModule):
                raise MisconfigurationException(
                    f"{type(model).__name__} has no `training_step()`: define it to fit.")
            if not is_overridden("configure_optimizers", model, LightningModule):
                raise MisconfigurationException(
                    f"{type(model).__name__} has no `configure_optimizers()`: define it to "
                    "return an optimizer.")
        return model

    @staticmethod
    def _split_datamodule(loaders: Any, datamodule: Any, stage: str) -> tuple[Any, Any]:
        loaders, datamodule = adopt_datamodule(loaders), adopt_datamodule(datamodule)
        if isinstance(loaders, LightningDataModule):
            return None, loaders
        as_loader_list(loaders)  # a bare ray.data.Dataset is refused before workers start
        if loaders is not None and datamodule is not None:
            raise MisconfigurationException(
                f"trainer.{stage}() got both dataloaders and a datamodule; pass one.")
        return loaders, datamodule

    def _driver_sink(self) -> DriverSink:
        return DriverSink(self.loggers, self.progress_bar_callback,
                          report_fn=self.config.tune.report_fn if self.config.tune else None)

    # --- fit -----------------------------------------------------------------------------------
    def fit(self, model: LightningModule, train_dataloader: Any = None,
            val_dataloaders: Any = None, datamodule: LightningDataModule | None = None, *,
            train_dataloaders: Any = None, ckpt_path: str | None = None) -> int:
        """Train ``model``. Returns 1 (0.9) when training ends.

        The 2.x keywords ``train_dataloaders=`` and ``ckpt_path=`` are accepted; ``ckpt_path``
        (or the 0.9 option ``resume_from_checkpoint``) resumes a run from a checkpoint file.
        """
        if train_dataloaders is not None:
            if train_dataloader is not None:
                raise MisconfigurationException(
                    "Pass train_dataloader or train_dataloaders, not both.")
            train_dataloader = train_dataloaders
        model = self._check_module(model, "fit")
        train_dataloader, datamodule = self._split_datamodule(train_dataloader, datamodule, "fit")
        if datamodule is None and train_dataloader is None and isinstance(
                getattr(model, "datamodule", None), LightningDataModule):
            datamodule = model.datamodule  # 0.9: a module may carry its own datamodule
        if val_dataloaders is not None and datamodule is not None:
            raise MisconfigurationException(
                "trainer.fit() got both val_dataloaders and a datamodule; pass one.")
        as_loader_list(val_dataloaders)
        ckpt_path = ckpt_path or self.config.resume_from_checkpoint
        self._check_resume_checkpoint(model, ckpt_path)
        self.should_stop = False
        if self.config.distributed:
            self._probe_remote_storage()
            from ray_lit.driver.launch import launch_fit

            with self._driver_run("fit"):
                launch_fit(self, model, train_dataloader, val_dataloaders, datamodule, ckpt_path)
            return 1
        from ray_lit.loop.stages import run_fit

        checkpoint = self._load_resume_checkpoint(ckpt_path)
        self._host = LocalHost(self.config.use_gpu, self.config.strategy)
        self._sink = self._driver_sink()
        self.world_size_history = [1]
        run_fit(self._ctx, model, train_dataloader, val_dataloaders, datamodule, checkpoint)
        return 1

    def _check_resume_checkpoint(self, model: LightningModule, ckpt_path: str | None) -> None:
        """Read the checkpoint ``fit`` resumes from (``ckpt_path``, ``resume_from_checkpoint``
        or, on Ray workers, a ``resume=`` path) on the driver, before any worker starts, and
        refuse one that is corrupt, not a model checkpoint, or of another model. It is kept
        for ``_load_resume_checkpoint``, so the file is read once."""
        resume_from = ckpt_path
        if resume_from is None and self.config.distributed and \
                self.config.resume not in ("auto", "never", None):
            resume_from = self.config.resume
        self.__dict__.pop("_resume_checkpoint", None)
        checkpoint = self._load_resume_checkpoint(resume_from)
        if checkpoint is None:
            return
        if "optimizer_states" not in checkpoint or "lr_schedulers" not in checkpoint:
            raise MisconfigurationException(
                f"Checkpoint {resume_from} contains only the model (saved with "
                "weights_only=True, or not by a Trainer); fit cannot resume training from it. "
                "Load its weights with YourModule.load_from_checkpoint(path) and fit without "
                "ckpt_path, or resume from a full checkpoint.")
        self._check_weights_fit(model, checkpoint, resume_from)
        self._resume_checkpoint = (resume_from, checkpoint)

    def _probe_remote_storage(self) -> None:
        """A remote ``storage_path`` (or ``default_root_dir`` URI) must take a small write
        within seconds (driver, before any worker starts): a file system that is not there
        (``gs://`` without credentials, an endpoint that drops packets) can otherwise keep
        its client retrying for many minutes."""
        root = os.fspath(self.config.storage_path or self.config.default_root_dir or "")
        if "://" not in root or root.lower().startswith("file://"):
            return  # local disks fail at once, in the launch's own probe
        from ray_lit.storage.probe import probe_storage
        from ray_lit.storage.retry import launch_retry

        config = self.config
        probe_storage(root, retry=launch_retry(config.run_name, config.resume,
                                               config.storage_retry_timeout_s))

    def _load_resume_checkpoint(self, ckpt_path: str | None) -> dict | None:
        if ckpt_path is None:
            return None
        kept = self.__dict__.pop("_resume_checkpoint", None)
        if kept is not None and kept[0] == ckpt_path:
            return kept[1]
        path = self._resolve_ckpt_path(ckpt_path)
        if path is None:
            return None
        from ray_lit.strategies import shards_state

        # each rank reads its own shards (FSDP)
        return self._read_weights(path, lazy=shards_state(self.config.strategy))

    def _read_eval_checkpoint(self, path: str) -> dict:
        """The checkpoint ``validate`` / ``test`` / ``predict`` load (driver): lazy on Ray
        workers under a sharding strategy (FSDP), as for ``fit``; otherwise (DDP, in process)
        read whole: a replica needs all of it."""
        from ray_lit.strategies import shards_state

        return self._read_weights(
            path, lazy=bool(self.config.distributed and shards_state(self.config.strategy)))

    def _read_weights(self, path: str, lazy: bool) -> dict:
        """A model checkpoint (driver). ``lazy``: a sharded directory stays lazy, only its meta
        file and DCP's index are read here, and each rank reads only the chunks of its own
        shards after sharding; a single file is still read whole."""
        if lazy:
            from ray_lit.checkpoint.sharded import load_lazily

            found = load_lazily(path)
            if found is not None:
                return found
        return self._read_checkpoint(path)

    @staticmethod
    def _read_checkpoint(path: str) -> dict:
        """A model checkpoint from ``path`` (driver); a corrupt, foreign or bare-state_dict
        file is refused with ``MisconfigurationException`` naming it and the fix."""
        from ray_lit.core.saving import check_model_checkpoint
        from ray_lit.storage.checkpoint_io import load_checkpoint

        checkpoint = load_checkpoint(path, map_location="cpu")
        check_model_checkpoint(checkpoint, path)
        return checkpoint

    @staticmethod
    def _check_weights_fit(model: Any, checkpoint: dict, path: str) -> None:
        """The checkpoint's weights fit ``model`` (driver, before workers start). Skipped for
        a module whose layers ``configure_model`` builds later (on the workers), and for one
        whose ``on_load_checkpoint`` may still change the weights (renamed keys)."""
        if not isinstance(model, LightningModule) or any(
                is_overridden(hook, model, LightningModule)
                for hook in ("configure_model", "on_load_checkpoint")):
            return
        from ray_lit.core.saving import check_state_dict_fits

        check_state_dict_fits(model, checkpoint["state_dict"], path,
                              strict=bool(getattr(model, "strict_loading", True)))

    def _resolve_ckpt_path(self, ckpt_path: str) -> str | None:
        if ckpt_path == "best":
            cb = self.checkpoint_callback
            if cb is None or not cb.best_model_path:
                warnings.warn("ckpt_path='best' but no best checkpoint was recorded; the "
                              "current weights are used.", stacklevel=3)
                return None
            return cb.best_model_path
        if ckpt_path == "last":
            cb = self.checkpoint_callback
            path = cb.last_model_path or (cb.saved_paths[-1] if cb and cb.saved_paths else "") \
                if cb is not None else ""
            if not path:
                warnings.warn("ckpt_path='last' but no checkpoint was saved; the current "
                              "weights are used.", stacklevel=3)
                return None
            return path
        return ckpt_path

    # --- validate / test -----------------------------------------------------------------------
    def validate(self, model: LightningModule | None = None, dataloaders: Any = None,
                 ckpt_path: str | None = None, datamodule: Any = None, verbose: bool = True,
                 *, val_dataloaders: Any = None) -> list[dict[str, float]]:
        """Run the validation loop once; one dict of floats per dataloader."""
        return self._evaluate("validate", model, dataloaders if dataloaders is not None
                              else val_dataloaders, ckpt_path, datamodule, verbose)

    def test(self, model: LightningModule | None = None, test_dataloaders: Any = None,
             ckpt_path: str | None = "best", datamodule: Any = None, verbose: bool = True,
             *, dataloaders: Any = None) -> list[dict[str, float]]:
        """Run the test loop (never run by ``fit``); one dict of floats per dataloader.

        ``ckpt_path="best"`` tests the best checkpoint of this trainer's fit (when a model is
        not passed), a path tests that file, None the current weights.
        """
        loaders = test_dataloaders if test_dataloaders is not None else dataloaders
        return self._evaluate("test", model, loaders, ckpt_path, datamodule, verbose)

    def predict(self, model: LightningModule | None = None, dataloaders: Any = None,
                datamodule: LightningDataModule | None = None,
                return_predictions: bool | None = None,
                ckpt_path: str | None = None) -> list[Any] | None:
        """Run ``predict_step`` over the predict dataloaders (2.x); returns the batch outputs.

        Returns one list of batch outputs (moved to CPU) in dataloader order, a list of such
        lists for several dataloaders, or None with ``return_predictions=False`` (then only the
        ``BasePredictionWriter`` callbacks see them). On Ray workers every rank predicts its
        shard, streams its outputs to the driver as it goes, and the result is the same list
        ``num_workers=0`` returns. ``ckpt_path``: a path, ``"best"`` or ``"last"``; without a
        model it defaults to ``"best"`` (the previous fit's best checkpoint, as in 2.x).
        """
        loaders, datamodule = self._split_datamodule(dataloaders, datamodule, "predict")
        return_predictions = True if return_predictions is None else bool(return_predictions)
        weights = None
        if model is None:
            model = self.lightning_module
            if model is None:
                raise MisconfigurationException(
                    "trainer.predict() needs a model: pass one, or call fit() first.")
            ckpt_path = "best" if ckpt_path is None else ckpt_path
        path = self._resolve_ckpt_path(ckpt_path) if ckpt_path is not None else None
        if path is not None:
            weights = self._read_eval_checkpoint(path)
            self._check_weights_fit(model, weights, path)
        model = self._check_module(model, "predict")
        if datamodule is None and model is self.lightning_module:
            datamodule = self.datamodule  # predict() after fit(datamodule=dm) reads dm's loader
        if self.config.distributed:
            from ray_lit.driver.launch import launch_predict

            with self._driver_run("predict"):
                return launch_predict(self, model, loaders, datamodule, weights,
                                      return_predictions)
        from ray_lit.loop.predict_loop import run_predict

        self._host = LocalHost(self.config.use_gpu, self.config.strategy)
        self._sink = self._driver_sink()
        loop = run_predict(self._ctx, model, loaders, datamodule, weights, return_predictions)
        return loop.predictions if return_predictions else None

    def _evaluate(self, stage: str, model: Any, loaders: Any, ckpt_path: str | None,
                  datamodule: Any, verbose: bool) -> list[dict[str, float]]:
        loaders, datamodule = self._split_datamodule(loaders, datamodule, stage)
        weights = None
        # "best" is this trainer's own best checkpoint: for a model passed in, it means that
        # model's weights as they are
        load_from = ckpt_path if model is None or ckpt_path != "best" else None
        if model is None:
            model = self.lightning_module
            if model is None:
                raise MisconfigurationException(
                    f"trainer.{stage}() needs a model: pass one, or call fit() first.")
        path = self._resolve_ckpt_path(load_from) if load_from is not None else None
        if path is not None:  # None: "best"/"last" without one (warned), the weights as they are
            weights = self._read_eval_checkpoint(path)
            self._check_weights_fit(model, weights, path)
            self.tested_ckpt_path = path
        model = self._check_module(model, stage)
        datamodule = datamodule if datamodule is not None else self.datamodule
        if self.config.distributed:
            from ray_lit.driver.launch import launch_evaluation

            with self._driver_run(stage):
                results = launch_evaluation(self, stage, model, loaders, datamodule, weights)
        else:
            from ray_lit.loop.stages import run_evaluation

            self._host = LocalHost(self.config.use_gpu, self.config.strategy)
            self._sink = self._driver_sink()
            results = run_evaluation(self._ctx, stage, model, loaders, datamodule, weights)
        if verbose and results:
            _print_results(stage, results)
        return results

    # --- the worker group ----------------------------------------------------------------------
    def teardown(self) -> None:
        """Release the Ray worker group this Trainer keeps (driver).

        ``fit``, ``validate``, ``test`` and ``predict`` on one Trainer run on the same worker
        actors and process group: the first call forms the group, the later ones ship their
        module and data to it. The group is also released when the Trainer is garbage
        collected and at interpreter exit; an idle group makes no calls. Safe to call twice,
        and a no-op in process (``num_workers=0``).
        """
        kept = self.__dict__.get("_kept")
        if kept is not None:
            kept.release()

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, filepath: str, weights_only: bool = False) -> None:
        """Write the run's checkpoint to ``filepath`` (global rank 0 writes; every rank may
        call). Atomic: a reader never sees a half-written file."""
        from ray_lit.loop.checkpoint_state import dump_checkpoint
        from ray_lit.loop.liveness import long_phase

        # a large model to slow storage can take longer than the hang timeout: not a hang
        with long_phase("checkpoint save"):
            checkpoint = dump_checkpoint(self._ctx, weights_only)
            if self.is_global_zero:
                from ray_lit.storage.checkpoint_io import save_checkpoint

                save_checkpoint(checkpoint, os.fspath(filepath))

    def _save_sharded_checkpoint(self, dirpath: str, weights_only: bool = False) -> None:
        """ModelCheckpoint's save under ``FSDPStrategy(state_dict_type="sharded")``: a
        ``torch.distributed.checkpoint`` directory, each rank writing its own shards
        (COLLECTIVE: every rank calls it at the same point). ``save_checkpoint`` stays one full
        file."""
        from ray_lit.checkpoint.sharded import save_sharded

        save_sharded(self, dirpath, weights_only)


def _print_results(stage: str, results: list[dict[str, float]]) -> None:
    name = "TEST" if stage == "test" else "VALIDATE"
    for idx, result in enumerate(results):
        print("-" * 80)
        print(f"DATALOADER:{idx} {name} RESULTS")
        for key in sorted(result):
            print(f"  {key}: {result[key]:.6g}")
    print("-" * 80)


def fit(module: LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None, *,
        datamodule: LightningDataModule | None = None, num_workers: Any = 8,
        **trainer_options: Any) -> Trainer:
    """``Trainer(num_workers=num_workers, **trainer_options).fit(...)``; returns the Trainer.

    Connects to the Ray cluster in ``RAY_ADDRESS`` or the running one, else starts a local one.
    """
    trainer = Trainer(num_workers=num_workers, **trainer_options)
    trainer.fit(module, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders,
                datamodule=datamodule)
    return trainer
