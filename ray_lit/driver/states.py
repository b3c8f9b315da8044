"""The controller's states: one attempt after another, as a state machine.

::

    Starting ──▶ Running ──▶ Salvaging ──▶ Finished
       ▲            │            │  │
       │            ▼            │  └────▶ Errored
       │         Stopping ───────┘
       │       (at a step, for a         (the policy raises, or a planned
       │        departure, a resize       stop of the whole run)
       │        or a preemption)
       │
       ├──── Salvaging (a planned departure or resize: the next attempt continues
       │               from the checkpoint of the stop step)
       └──── Restarting ◀── Salvaging (a failure the policy restarts)

``Controller.step(state) -> state`` makes one transition; ``Running`` and ``Stopping`` go
back to themselves after each poll of the group. ``Controller.states`` records the sequence
of state kinds, which the controller's tests assert.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ray_lit.driver.policies import DepartureDecision, WorkerError


class StopCause(str, enum.Enum):
    """Why every rank checkpoints at one step and leaves its loop."""

    DEPARTURE = "departure"  # a node or process announced it goes (drain notice, SIGTERM)
    RESIZE = "resize"  # an elastic group grows at that checkpoint
    PREEMPTION = "preemption"  # the driver got SIGTERM: checkpoint, then stop the run


@dataclass(frozen=True)
class AttemptOutcome:
    """How an attempt ended (exactly one of the fields below says it)."""

    result: Any = None
    error: WorkerError | None = None
    exception: BaseException | None = None
    preempted: bool = False
    resize_to: int | None = None
    departed: DepartureDecision | None = None
    peer_symptom: bool = False  # failed in a collective because a peer went away


@dataclass(frozen=True)
class Starting:
    """A new attempt: choose where it continues from, size and form the group, start it."""

    terminal = False


@dataclass(frozen=True)
class Running:
    """The group trains; each step is one long poll of every rank.

    Attributes:
        group: the attempt's worker group.
        done: ``{rank: (WorkerState, result)}`` of the ranks whose loop ended (done, or
            stopped as asked).
    """

    group: Any
    done: dict[int, Any] = field(default_factory=dict)
    terminal = False


@dataclass(frozen=True)
class Stopping:
    """Every rank checkpoints at optimizer step ``at_step``, then leaves its loop.

    Attributes:
        group: the attempt's worker group.
        at_step: the step every rank stops at (two ahead of the furthest rank when asked).
        cause: why.
        departure: the departure decision, for ``DEPARTURE`` (and a preemption announced by
            a drain of the driver's own node).
        resize_to: the next world size, for ``RESIZE``.
        preempt: the run stops after this checkpoint (a SIGTERM to the driver, also one that
            arrived during a resize's stop).
        done: as in ``Running``.
    """

    group: Any
    at_step: int
    cause: StopCause
    departure: DepartureDecision | None = None
    resize_to: int | None = None
    preempt: bool = False
    done: dict[int, Any] = field(default_factory=dict)
    terminal = False


@dataclass(frozen=True)
class Salvaging:
    """The attempt is over: keep the live workers for the next one, or release the group."""

    group: Any
    outcome: AttemptOutcome
    terminal = False


@dataclass(frozen=True)
class Restarting:
    """A failure the policy restarts from: count it, say why, start a new attempt."""

    outcome: AttemptOutcome
    reason: str
    counts_as_failure: bool = True
    terminal = False


@dataclass(frozen=True)
class Finished:
    """Rank 0's result (pickled ``FinalState``)."""

    result: Any
    terminal = True


@dataclass(frozen=True)
class Errored:
    """The run ends with ``error`` (the user's exception, ``TrainingFailedError`` or
    ``PreemptionStop``)."""

    error: BaseException
    terminal = True


State = Starting | Running | Stopping | Salvaging | Restarting | Finished | Errored


def kind(state: State) -> str:
    """The state's name as the controller's history records it."""
    return type(state).__name__
