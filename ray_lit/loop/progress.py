"""Loop counters: where the run is, as a ``state_dict`` that exact resume restores."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Progress:
    """Counters of the fit loop.

    ``epoch`` is the epoch in progress (0-based); ``batches_done`` counts the training batches
    finished in it, so a mid-epoch resume continues at batch ``batches_done``. ``global_step``
    counts optimizer steps (one per accumulation window, not per optimizer).
    """

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    total_batch_idx: int = 0
    batches_that_stepped: int = 0
    epoch_finished: bool = False

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.epoch or self.epoch_finished:
            self.batches_done = 0
        self.epoch = epoch
        self.epoch_finished = False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)
