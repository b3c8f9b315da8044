"""The messages that cross the process boundary between the driver and its workers.

Each schema is written once, here: the driver builds a ``Job`` and reads ``WorkerStatus``,
``LeftBehind`` and ``FinalState``; the worker builds those and reads the ``Job``; the fakes of
``ray_lit.testing`` speak the same types. Frozen dataclasses: a message is a value, never a
channel, and changing one means building a new one (``dataclasses.replace``).

Large values (a resume checkpoint, evaluation weights, a peer snapshot) travel as a Ray
``ObjectRef`` put once by the driver, never by value inside a message sent to every worker.

Who sends what:

- driver -> every rank: ``RunSpec`` (once per stage, in the object store: what each rank
  builds its Trainer from) and ``Job`` (with ``Worker.run``), carrying a ``Restore`` on later
  attempts;
- every rank -> driver: ``WorkerStatus`` (the answer to each poll), whose ``handed_over`` holds
  ``PartWritten`` (a checkpoint part is in storage) and ``SnapshotPart`` (a rank's own part of
  an in-memory snapshot);
- every surviving rank -> driver: ``LeftBehind`` (the answer to ``Worker.abort``);
- rank 0 -> driver: ``FinalState`` (inside the last ``WorkerStatus``, pickled);
- every rank -> driver (``trainer.predict``): ``PredictionChunk`` (each batch's output, a few
  per ``WorkerStatus``, as the rank predicts).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckpointSpec", "FinalState", "FromPeers", "FromStorage", "Job", "LeftBehind",
           "PartWritten", "PredictionChunk", "RankStacks", "Restore", "RunSpec", "SnapshotPart",
           "WorkerFailure", "WorkerState", "WorkerStatus", "resolve"]


class WorkerState(str, enum.Enum):
    """Where a worker's loop is. ``PREEMPTED``: it stopped at the step the driver asked for,
    after that step's checkpoint; ``ABORTED``: the driver gave the attempt up."""

    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    PREEMPTED = "preempted"
    ABORTED = "aborted"


@dataclass(frozen=True)
class CheckpointSpec:
    """How the workers take fault-tolerance checkpoints (each builds its own writer from it).

    Attributes:
        run_uri: the run's directory (local path or URI); parts go under ``checkpoints/``.
        every_n_steps: a checkpoint every N optimizer steps (besides epoch ends), or None.
        snapshot_every_n_steps: an in-memory peer snapshot every N steps, or None.
    """

    run_uri: str
    every_n_steps: int | None = None
    snapshot_every_n_steps: int | None = None


@dataclass(frozen=True)
class FromStorage:
    """Restore from a committed checkpoint: rank 0's full part, and each rank's own part
    (for its RNG) by world rank."""

    rank0_uri: str
    parts: dict[int, str]


@dataclass(frozen=True)
class FromPeers:
    """Restore from a survivor's in-memory snapshot.

    Attributes:
        ref: an ObjectRef to the replicated part the survivor exported (or the bytes).
        parts: every rank's own part of that snapshot (checkpoint bytes), by world rank.
        reason: why this snapshot was chosen (printed on the driver).
    """

    ref: Any
    parts: dict[int, bytes]
    reason: str = ""


Restore = FromStorage | FromPeers


@dataclass(frozen=True)
class RunSpec:
    """The driver's Trainer as the workers get it: an allow-list, not a copy.

    Each rank builds its own Trainer from it (``Trainer._from_run_spec``); what is not here
    does not cross (the driver's loop state, its loaders, controller, progress bar, loggers).

    Attributes:
        trainer_class: the user's Trainer class (a subclass keeps its methods on the workers).
        config: the validated options (``TrainerConfig``), without ``callbacks`` and
            ``logger``: those travel as the two fields below.
        default_root_dir: absolute, or a URI.
        callbacks: the driver's callbacks without the progress bar, each tagged with the key
            its state comes back under (``FinalState.callbacks``).
        loggers: one ``LoggerProxy`` per driver logger (rank 0's calls reach the real one).
        run_dir: the run directory of the last ``fit``, or None.
        progress: the driver's fit counters (``Progress.state_dict``): epoch and step of the
            last fit, which a later ``validate``/``test`` logs at.
        num_restarts: restarts so far (``trainer.num_restarts``).
        world_size_history: the world sizes the run went through.
        tested_ckpt_path: the checkpoint the last ``test`` used.
        extras: attributes a Trainer subclass or the user set on the Trainer that the base
            Trainer does not have (they travel as they are).
    """

    trainer_class: type
    config: Any
    default_root_dir: str
    callbacks: tuple[Any, ...] = ()
    loggers: tuple[Any, ...] = ()
    run_dir: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    num_restarts: int = 0
    world_size_history: tuple[int, ...] = ()
    tested_ckpt_path: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One attempt's instructions, the same for every rank.

    Attributes:
        stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
        seed: the global seed to set first (``seed_everything``), or None.
        sampler_seed: the distributed sampler's shuffling seed.
        use_gpu: one CUDA device per worker.
        accelerator: the Trainer's accelerator (``"tpu"`` selects the XLA device).
        attempt: 0 for the first attempt, then 1, 2, ...
        fence: unique to this attempt of this driver's run: the checkpoint parts it writes carry
            it, and a commit takes parts of one fence only.
        accumulate: the elastic accumulation plan for this world size, or None (the config's).
        checkpointing: how fault-tolerance checkpoints are taken, or None (evaluation).
        restore: where a later attempt continues from, or None.
        checkpoint: an ObjectRef to the checkpoint ``fit(ckpt_path=...)`` resumes from.
        resume_latest: the first attempt continues from the latest commit (``resume="auto"``).
        weights: an ObjectRef to the weights ``validate``/``test``/``predict`` use (a
            checkpoint).
        return_predictions: ``predict`` only: stream every batch output to the driver
            (``PredictionChunk``); False: the prediction writers are the only output.
    """

    stage: str
    seed: int | None = None
    sampler_seed: int = 0
    use_gpu: bool = False
    accelerator: str | None = None
    attempt: int = 0
    fence: str = ""
    accumulate: int | None = None
    checkpointing: CheckpointSpec | None = None
    restore: Restore | None = None
    checkpoint: Any = None
    resume_latest: bool = False
    weights: Any = None
    return_predictions: bool = True


@dataclass(frozen=True)
class PartWritten:
    """A rank's part of fault-tolerance checkpoint ``name`` is in storage (``meta``: what the
    manifest records of it, e.g. epoch and step; ``fence``: the attempt that wrote it, part of
    the file's name)."""

    name: str
    rank: int
    world_size: int
    meta: Any = None
    fence: str = ""


@dataclass(frozen=True)
class SnapshotPart:
    """A rank's own part (RNG, loop and sampler position; rank 0 also buffers, schedulers,
    callbacks) of the in-memory snapshot ``key = (attempt, global_step)``, as bytes."""

    key: tuple[int, int]
    rank: int
    world_size: int
    data: bytes = b""


HandedOver = PartWritten | SnapshotPart


@dataclass(frozen=True)
class PredictionChunk:
    """One batch output of ``trainer.predict`` on its way to the driver.

    Attributes:
        rank: the world rank that predicted it.
        dataloader_idx: which predict dataloader.
        batch_idx: the batch's index on that rank (what its hooks saw).
        indices: the dataset indices of the batch's samples (empty when unknown).
        payload: the output, moved to CPU and pickled (``cloudpickle``).
        position: the batch's place in the user's loader (all ranks together), or None when
            ray_lit did not shard the loader (the driver then orders by rank, then batch).
    """

    rank: int
    dataloader_idx: int
    batch_idx: int
    indices: tuple[int, ...]
    payload: bytes
    position: int | None = None


@dataclass(frozen=True)
class WorkerFailure:
    """Why a rank's loop failed: its traceback, and the exception pickled when it could be."""

    traceback: str
    exception: bytes | None = None


@dataclass(frozen=True)
class WorkerStatus:
    """One rank's answer to a poll.

    Attributes:
        state: where the loop is.
        events: rank 0's recorded metric/progress events since the last poll (others: none).
        handed_over: checkpoint parts written and snapshot parts taken since the last poll.
        idle_s: seconds since the rank's batch counter last moved.
        global_step: the rank's optimizer step.
        steps: batches run in this attempt (0 until the first one).
        sigterm: the rank's process got SIGTERM (its node is being reclaimed).
        slowest_step_s: the longest a batch of this attempt took (seconds, as polls see it).
        long_phase: the user marked a long phase (``ray_lit.long_phase``): not a hang.
        failure: set when ``state`` is FAILED.
        result: rank 0's pickled ``FinalState`` when ``state`` is DONE.
        predictions: ``predict``: batch outputs since the last poll, oldest first (a bounded
            number of bytes per poll; the rest follow with the next polls).
    """

    state: WorkerState
    events: list[Any] = field(default_factory=list)
    handed_over: tuple[HandedOver, ...] = ()
    idle_s: float = 0.0
    global_step: int = 0
    steps: int = 0
    sigterm: bool = False
    slowest_step_s: float = 0.0
    long_phase: bool = False
    failure: WorkerFailure | None = None
    result: Any = None
    predictions: tuple[PredictionChunk, ...] = ()


@dataclass(frozen=True)
class RankStacks:
    """One rank's threads and stacks, taken while the driver diagnoses a hang.

    Attributes:
        rank: the world rank.
        text: every thread's stack, formatted.
        in_collective: the loop thread waits in a collective (a victim, not the culprit).
        where: the loop thread's innermost frame in user code (``File ..., line ..., in ...``).
    """

    rank: int
    text: str
    in_collective: bool
    where: str


@dataclass(frozen=True)
class LeftBehind:
    """What a surviving rank leaves for the driver when it leaves a failed attempt.

    Attributes:
        handed_over: parts the driver was not yet handed (the part written while leaving).
        snapshots: the keys of the in-memory snapshots this worker holds.
        stuck: its loop did not end in time (stuck in a collective): it is replaced once any
            snapshot it holds is exported.
        shards: per sharded (FSDP) snapshot key, the world ranks whose shards this worker
            holds (``PeerSnapshot.held_ranks``); the driver restores from the survivors that
            together hold every rank. Empty for replicated snapshots, each of which holds the
            whole state.
    """

    handed_over: tuple[HandedOver, ...] = ()
    snapshots: tuple[tuple[int, int], ...] = ()
    stuck: bool = False
    shards: tuple[tuple[tuple[int, int], tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class FinalState:
    """Rank 0's view of the run, applied to the driver's module and Trainer.

    ``callbacks`` maps each callback's key (the tag the driver gave the callbacks it shipped,
    else its ``state_key``) to the picklable part of its ``__dict__``: matched by key on the
    driver, never by position. ``results``: one dict of
    floats per dataloader (``validate``/``test``); for ``predict``, each predict dataloader's
    batch count over all ranks (None for a loader ray_lit did not shard), which the driver
    checks the chunks it received against.
    """

    state_dict: dict[str, Any]
    hparams: Any
    callback_metrics: dict[str, Any]
    logged_metrics: dict[str, Any]
    pbar: dict[str, Any]
    progress: dict[str, Any]
    should_stop: bool
    callbacks: dict[str, dict[str, Any]]
    num_training_batches: Any
    num_val_batches: Any
    num_test_batches: Any
    results: Any
    interrupted: bool


def resolve(value: Any, timeout_s: float = 300.0) -> Any:
    """``value``, fetched from the object store when it is an ObjectRef (worker side)."""
    if type(value).__name__ == "ObjectRef":
        import ray

        return ray.get(value, timeout=timeout_s)
    return value
