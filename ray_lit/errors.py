"""The exceptions users see. Every message names the offending thing and the fix."""

from __future__ import annotations


class MisconfigurationException(Exception):
    """Bad input: an option, a hook's return value or a module that cannot run.

    Raised on the driver before any step runs (and before workers start where possible).
    """


class PreemptionStop(RuntimeError):
    """The run stopped after the checkpoint a SIGTERM to the driver asked for.

    Raised from ``fit`` on the driver (never ``SystemExit``: a notebook or a Tune trial goes
    on). Run the same script again, with the same ``storage_path`` and ``run_name``, to
    continue from that checkpoint; a script may map it to an exit code.

    Attributes:
        step: the optimizer step every rank checkpointed at, where known.
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class TrainingFailedError(RuntimeError):
    """A distributed run failed more often than ``max_failures`` allows.

    Attributes:
        rank: world rank of the worker whose failure ended the run (None if not rank-specific).
        node: the Ray node id or IP of that worker, where known.
        original_traceback: the formatted traceback from the worker.
    """

    def __init__(
        self,
        message: str,
        rank: int | None = None,
        node: str | None = None,
        original_traceback: str | None = None,
    ) -> None:
        self.rank = rank
        self.node = node
        self.original_traceback = original_traceback
        text = message
        if rank is not None:
            text += f"\n  rank: {rank}"
        if node is not None:
            text += f"\n  node: {node}"
        if original_traceback:
            text += f"\n  original traceback:\n{original_traceback}"
        super().__init__(text)

    def __reduce__(self):
        return (
            _rebuild_training_failed,
            (self.args[0], self.rank, self.node, self.original_traceback),
        )


def _rebuild_training_failed(text, rank, node, tb):
    err = TrainingFailedError.__new__(TrainingFailedError)
    RuntimeError.__init__(err, text)
    err.rank, err.node, err.original_traceback = rank, node, tb
    return err
