"""``WandbLogger``: metrics and hyperparameters into a Weights & Biases run (optional extra).

It lives on the driver like every ray_lit logger: the workers stream their metrics to it and rank
0's ``self.logger.experiment.<method>(...)`` calls are replayed on its ``wandb`` run. The run is
started on first use; ``offline=True`` keeps it in ``save_dir/wandb/offline-run-*`` (nothing is
sent; ``wandb sync`` uploads it later). ``wandb`` is imported only when the logger is used:
``pip install ray_lit[wandb]``.
"""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from ray_lit.loggers.base import Logger, _add_prefix, _convert_params, _sanitize_value
from ray_lit.loggers.model_artifacts import CheckpointUploads, Upload, check_log_model

_STEP_KEY = "trainer/global_step"


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ImportError("WandbLogger needs the `wandb` package: pip install "
                          "ray_lit[wandb].") from err
    return wandb


def _plain(value: Any) -> Any:
    """A config value wandb stores as is: nesting kept, callables by name."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None:
        return value
    return _sanitize_value(value)


class WandbLogger(Logger):
    """Log to a Weights & Biases run.

    Args:
        name: the run's display name.
        save_dir: directory of wandb's local files (``save_dir/wandb/...``).
        version: the run id, to resume a run (wandb ``id``).
        offline: keep the run on disk only (wandb's offline mode), to sync later.
        project: the project; None: ``$WANDB_PROJECT`` or ``"lightning_logs"``.
        log_model: log ``ModelCheckpoint``'s checkpoints as ``model`` artifacts of the run:
            True, those kept when training ends (each as saved with ``save_top_k=-1``);
            ``"all"``, each as it is saved; False, none. One artifact ``checkpoint_name``, a
            version per checkpoint holding ``model.ckpt``, aliased ``latest`` (and ``best``),
            with the score and ModelCheckpoint options as metadata. Offline runs keep them for
            ``wandb sync``.
        prefix: prepended to every metric name as ``"{prefix}-{name}"``.
        checkpoint_name: the artifact's name; None: ``"model-<run id>"``.
        **kwargs: more ``wandb.init`` arguments (``entity``, ``group``, ``tags``, ``dir``,
            ``id``, ``config``, ...).

    Raises:
        MisconfigurationException: ``log_model`` other than True, False or ``"all"``.
        ImportError: ``wandb`` is not installed (on first use).

    Example::

        trainer = pl.Trainer(logger=WandbLogger(project="mnist", offline=True))
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(self, name: str | None = None, save_dir: str | os.PathLike = ".",
                 version: str | None = None, offline: bool = False,
                 project: str | None = None, log_model: bool | str = False,
                 prefix: str = "", checkpoint_name: str | None = None,
                 **kwargs: Any) -> None:
        log_model = check_log_model(log_model, "WandbLogger")
        super().__init__()
        project = project or os.environ.get("WANDB_PROJECT", "lightning_logs")
        run_dir = os.fspath(kwargs.pop("dir", None) or save_dir)
        self._wandb_init: dict[str, Any] = {
            "name": name, "project": project, "dir": run_dir,
            "id": version or kwargs.pop("id", None), "resume": "allow",
        }
        if offline:
            self._wandb_init["mode"] = "offline"
        self._wandb_init.update(kwargs)
        self._offline = offline
        self._save_dir = run_dir
        self._name = name
        self._project = project
        self._id = self._wandb_init["id"]
        self._prefix = prefix
        self._log_model = log_model
        self._uploads = CheckpointUploads(log_model)
        self._checkpoint_name = checkpoint_name
        self._experiment: Any = None

    @property
    def experiment(self) -> Any:
        """The ``wandb`` run (started on first use; an already running ``wandb.run`` is
        reused). Metrics are charted against ``trainer/global_step``."""
        if self._experiment is not None:
            return self._experiment
        wandb = _import_wandb()
        if wandb.run is not None:
            self._experiment = wandb.run  # the user's own wandb.init() came first
        else:
            os.makedirs(self._save_dir, exist_ok=True)
            self._experiment = wandb.init(**self._wandb_init)
            self._experiment.define_metric(_STEP_KEY)
            self._experiment.define_metric("*", step_metric=_STEP_KEY, step_sync=True)
        self._id = self._experiment.id
        return self._experiment

    @property
    def name(self) -> str:
        """The project."""
        return self._project

    @property
    def version(self) -> str | None:
        """The run id (starts the run)."""
        return self.experiment.id

    @property
    def save_dir(self) -> str:
        return self._save_dir

    # --- logging (driver) -----------------------------------------------------------------------
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any,
                        **kwargs: Any) -> None:
        """Merge ``params`` into the run's config (nested dicts stay nested)."""
        self.experiment.config.update(_plain(_convert_params(params)), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log ``metrics``, with ``trainer/global_step`` = ``step`` when given."""
        row = {k: v.item() if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1
               else v for k, v in _add_prefix(metrics, self._prefix,
                                              self.LOGGER_JOIN_CHAR).items()}
        if step is not None:
            row[_STEP_KEY] = step
        self.experiment.log(row)

    def log_text(self, key: str, columns: list[str] | None = None,
                 data: list[list[Any]] | None = None, dataframe: Any = None,
                 step: int | None = None) -> None:
        """Log a table of text (``columns`` + ``data`` rows, or a pandas ``dataframe``)."""
        wandb = _import_wandb()
        self.log_metrics({key: wandb.Table(columns=columns, data=data, dataframe=dataframe)},
                         step)

    def log_image(self, key: str, images: list[Any], step: int | None = None,
                  **kwargs: list[Any]) -> None:
        """Log images (tensors, arrays, PIL images or paths); each keyword is a list with one
        value per image (``caption=[...]``)."""
        wandb = _import_wandb()
        for name, values in kwargs.items():
            if len(values) != len(images):
                raise ValueError(f"WandbLogger.log_image: {name} has {len(values)} values for "
                                 f"{len(images)} images.")
        per_image = [{k: v[i] for k, v in kwargs.items()} for i in range(len(images))]
        self.log_metrics({key: [wandb.Image(img, **kw) for img, kw in zip(images, per_image)]},
                         step)

    # --- checkpoints as artifacts (driver) -------------------------------------------------------
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """``ModelCheckpoint`` saved (rank 0, forwarded to the driver): with ``log_model="all"``
        (or True and ``save_top_k=-1``) log the new checkpoints now; with True remember the
        callback's state for ``finalize``."""
        for upload in self._uploads.after_save(checkpoint_callback):
            self._log_checkpoint(upload)

    def _log_checkpoint(self, upload: Upload) -> None:
        wandb = _import_wandb()
        name = self._checkpoint_name or f"model-{self.experiment.id}"
        artifact = wandb.Artifact(name=name, type="model", metadata=upload.metadata)
        with upload.local_copy() as local:
            if os.path.isdir(local):  # a sharded checkpoint: its directory of shards
                artifact.add_dir(local, name="model.ckpt")
            else:
                artifact.add_file(local, name="model.ckpt")
            # wandb copies the file into its staging area here, before a URI's copy is removed
            self.experiment.log_artifact(artifact, aliases=list(upload.aliases))

    def finalize(self, status: str = "success") -> None:
        """Flush what is pending and, after a successful stage, log the checkpoints
        ``log_model=True`` waits for. The run stays open (``test`` after ``fit`` logs to it);
        wandb closes it at exit, or call ``logger.experiment.finish()``."""
        super().finalize(status)
        if status == "success":
            for upload in self._uploads.at_end():
                self._log_checkpoint(upload)

    def __getstate__(self) -> dict[str, Any]:
        # a live run holds sockets to wandb's service; a copy re-attaches by id on first use
        state = dict(self.__dict__)
        state["_experiment"] = None
        if self._id is not None:
            state["_wandb_init"] = {**self._wandb_init, "id": self._id}
        return state

    def __repr__(self) -> str:
        return f"WandbLogger(project={self._project!r}, name={self._name!r}, " \
               f"offline={self._offline})"
