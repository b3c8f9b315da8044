"""``MLFlowLogger``: metrics and hyperparameters into an MLflow tracking store (optional extra).

Like every ray_lit logger it lives on the driver: the workers stream their metrics to it, and
rank 0's ``self.logger.experiment.<method>(...)`` calls are replayed on its ``MlflowClient``. The
experiment and run are created on first use (the driver reads ``name`` / ``version`` when it
launches the workers, which creates them then). ``mlflow`` (``mlflow-skinny`` is enough) is
imported only when the logger is used: ``pip install ray_lit[mlflow]``.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from ray_lit.loggers.base import Logger, _add_prefix, _convert_params, _flatten_dict
from ray_lit.loggers.model_artifacts import CheckpointUploads, Upload, check_log_model

_FILE_URI = "file:"
_STATUS = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED",
           "interrupted": "KILLED"}
_BAD_METRIC_CHARS = re.compile(r"[^a-zA-Z0-9_/. -]+")
_MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
_MAX_PARAM_LENGTH = 250


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as err:
        raise ImportError("MLFlowLogger needs the `mlflow` package: pip install ray_lit[mlflow] "
                          "(mlflow-skinny is enough).") from err
    return mlflow


def _resolve_tags(tags: dict[str, Any] | None) -> dict[str, Any]:
    """``tags`` plus MLflow's context tags (source, user, git commit), as ``mlflow.start_run``
    adds them."""
    try:
        from mlflow.tracking.context.registry import resolve_tags
    except ImportError:  # an MLflow without the context registry: the user's tags only
        return dict(tags or {})
    return resolve_tags(dict(tags or {}))


class MLFlowLogger(Logger):
    """Log to MLflow: a run in ``experiment_name`` of the store at ``tracking_uri``.

    Args:
        experiment_name: the MLflow experiment (created when missing).
        run_name: the run's display name (the ``mlflow.runName`` tag).
        tracking_uri: the tracking server or store; None: ``$MLFLOW_TRACKING_URI`` if set,
            else a local file store in ``save_dir``.
        tags: tags of the new run.
        save_dir: the local file store's directory when no ``tracking_uri`` is given.
        log_model: upload ``ModelCheckpoint``'s checkpoints as run artifacts: True, those kept
            when training ends (each as saved with ``save_top_k=-1``); ``"all"``, each as it is
            saved; False, none. Each goes under ``<checkpoint_path_prefix>/<file stem>/`` with a
            ``metadata.yaml`` (score, file name, ModelCheckpoint options) and ``aliases.txt``.
        prefix: prepended to every metric name as ``"{prefix}-{name}"``.
        artifact_location: where a newly created experiment stores artifacts.
        run_id: continue this existing run instead of creating one.
        checkpoint_path_prefix: the artifact folder of uploaded checkpoints ("" = the run's
            artifact root).

    Raises:
        MisconfigurationException: ``log_model`` other than True, False or ``"all"``.
        ImportError: ``mlflow`` is not installed (on first use).

    Example::

        logger = MLFlowLogger("mnist", tracking_uri="http://127.0.0.1:5000")
        trainer = pl.Trainer(logger=logger)
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(self, experiment_name: str = "lightning_logs", run_name: str | None = None,
                 tracking_uri: str | None = None, tags: dict[str, Any] | None = None,
                 save_dir: str | None = "./mlruns", log_model: bool | str = False,
                 prefix: str = "", artifact_location: str | None = None,
                 run_id: str | None = None, checkpoint_path_prefix: str = "") -> None:
        log_model = check_log_model(log_model, "MLFlowLogger")
        super().__init__()
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            tracking_uri = f"{_FILE_URI}{os.path.abspath(save_dir or './mlruns')}"
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._tracking_uri = tracking_uri
        self.tags = dict(tags) if tags else None
        self._log_model = log_model
        self._uploads = CheckpointUploads(log_model)
        self._checkpoint_path_prefix = checkpoint_path_prefix
        self._prefix = prefix
        self._artifact_location = artifact_location
        self._run_id = run_id
        self._experiment_id: str | None = None
        self._client: Any = None

    # --- the run --------------------------------------------------------------------------------
    @property
    def experiment(self) -> Any:
        """The ``mlflow.tracking.MlflowClient`` (creating the experiment and run on first use).

        Calls on it take the run id: ``logger.experiment.log_param(logger.run_id, k, v)``.
        """
        if self._client is not None:
            return self._client
        _import_mlflow()
        from mlflow.tracking import MlflowClient

        if self._tracking_uri.startswith(_FILE_URI):
            # MLflow 3 refuses a plain-file store unless allowed; the file store in save_dir is
            # this logger's documented default (as in Lightning), so the logger allows it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=self._tracking_uri)
        if self._run_id is not None:
            self._experiment_id = client.get_run(self._run_id).info.experiment_id
        else:
            self._experiment_id = self._experiment_id or self._find_or_create_experiment(client)
            tags = dict(self.tags or {})
            if self._run_name is not None:
                tags["mlflow.runName"] = self._run_name
            run = client.create_run(experiment_id=self._experiment_id,
                                    tags=_resolve_tags(tags))
            self._run_id = run.info.run_id
        self._client = client
        return client

    def _find_or_create_experiment(self, client: Any) -> str:
        found = client.get_experiment_by_name(self._experiment_name)
        if found is not None and found.lifecycle_stage != "deleted":
            return found.experiment_id
        return client.create_experiment(name=self._experiment_name,
                                        artifact_location=self._artifact_location)

    @property
    def run_id(self) -> str:
        """The MLflow run this logger writes to (created on first use)."""
        self.experiment  # noqa: B018 - creates the run
        return self._run_id  # type: ignore[return-value]

    @property
    def experiment_id(self) -> str:
        """The MLflow experiment's id (created on first use)."""
        self.experiment  # noqa: B018 - creates the experiment
        return self._experiment_id  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """The experiment id (the directory level of checkpoints, as in Lightning)."""
        return self.experiment_id

    @property
    def version(self) -> str:
        """The run id."""
        return self.run_id

    @property
    def save_dir(self) -> str | None:
        """The local store's directory (None for a remote tracking server)."""
        if self._tracking_uri.startswith(_FILE_URI):
            return self._tracking_uri[len(_FILE_URI):]
        return None

    # --- logging (driver) -----------------------------------------------------------------------
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any,
                        **kwargs: Any) -> None:
        """Log ``params`` flattened (``{"a": {"b": 1}}`` as ``a/b``) as run parameters, values
        cut to MLflow's 250 characters."""
        from mlflow.entities import Param

        flat = _flatten_dict(_convert_params(params))
        entries = [Param(key=k, value=str(v)[:_MAX_PARAM_LENGTH]) for k, v in flat.items()]
        for start in range(0, len(entries), _MAX_PARAMS_PER_BATCH):
            self.experiment.log_batch(run_id=self.run_id,
                                      params=entries[start:start + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric ``metrics`` at ``step``; strings are dropped and names cleaned of the
        characters MLflow refuses."""
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        entries = []
        for key, value in _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            if isinstance(value, str):
                warnings.warn(f"MLFlowLogger: dropped the string metric {key}={value!r}.",
                              RuntimeWarning, stacklevel=2)
                continue
            clean = _BAD_METRIC_CHARS.sub("", key)
            if clean != key:
                warnings.warn(f"MLFlowLogger: MLflow allows only '_', '/', '.', ' ' and '-' "
                              f"besides letters and digits; {key!r} is logged as {clean!r}.",
                              RuntimeWarning, stacklevel=2)
            number = value.item() if hasattr(value, "item") else value
            entries.append(Metric(key=clean, value=float(number), timestamp=timestamp_ms,
                                  step=step or 0))
        if entries:
            self.experiment.log_batch(run_id=self.run_id, metrics=entries)

    # --- checkpoints as artifacts (driver) -------------------------------------------------------
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """``ModelCheckpoint`` saved (rank 0, forwarded to the driver): with ``log_model="all"``
        (or True and ``save_top_k=-1``) upload the new checkpoints now; with True remember the
        callback's state for ``finalize``."""
        for upload in self._uploads.after_save(checkpoint_callback):
            self._log_checkpoint(upload)

    def _log_checkpoint(self, upload: Upload) -> None:
        import yaml  # ships with ray

        folder = "/".join(p for p in (self._checkpoint_path_prefix.strip("/"), upload.stem) if p)
        with upload.local_copy() as local:
            if os.path.isdir(local):  # a sharded checkpoint: its directory of shards
                self.experiment.log_artifacts(self.run_id, local,
                                              f"{folder}/{os.path.basename(local)}")
            else:
                self.experiment.log_artifact(self.run_id, local, folder)
        with tempfile.TemporaryDirectory(prefix="ray_lit-mlflow-") as notes:
            with open(os.path.join(notes, "metadata.yaml"), "w") as f:
                yaml.safe_dump(upload.metadata, f, default_flow_style=False)
            with open(os.path.join(notes, "aliases.txt"), "w") as f:
                f.write(str(list(upload.aliases)))
            self.experiment.log_artifacts(self.run_id, notes, folder)

    def finalize(self, status: str = "success") -> None:
        """Upload the checkpoints ``log_model=True`` waits for, then mark the run ``FINISHED``
        / ``FAILED`` / ``KILLED``; a later stage (``test`` after ``fit``) may still log to
        it."""
        super().finalize(status)
        for upload in self._uploads.at_end():
            self._log_checkpoint(upload)
        if self._client is None:
            return  # nothing was logged: no run to close
        self._client.set_terminated(self._run_id, _STATUS.get(status, status.upper()))

    def __getstate__(self) -> dict[str, Any]:
        # the client holds connections; a copy re-opens it on first use, on the same run
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def __repr__(self) -> str:
        return f"MLFlowLogger(experiment_name={self._experiment_name!r}, " \
               f"tracking_uri={self._tracking_uri!r}, run_id={self._run_id!r})"
