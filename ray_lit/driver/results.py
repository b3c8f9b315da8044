"""Rank 0's final state applied to the user's module and Trainer (driver side).

The worker encodes it (``worker.job.final_state``); this is the only decoder.
"""

from __future__ import annotations

from typing import Any

import torch

from ray_lit.messages import FinalState
from ray_lit.worker.job import callback_key


def apply_final_state(trainer: Any, module: Any, datamodule: Any, state: FinalState,
                       fitted: bool = True) -> None:
    """Rank 0's weights into the user's module; the run's state onto the driver's Trainer."""
    from ray_lit.callbacks.progress import ProgressBar

    configure = getattr(module, "configure_model", None)
    if configure is not None:
        configure()  # 2.x: the driver's module holds the layers it builds, trained weights in
    with torch.no_grad():
        # layers configure_model built on the meta device take the weights as they are
        module.load_state_dict(state.state_dict,
                               assign=any(isinstance(t, torch.Tensor) and t.is_meta
                                          for t in module.state_dict().values()))
    module.trainer = trainer
    trainer.lightning_module = module
    from ray_lit.loop.host import LocalHost

    # the driver's view of the group that ran: world_size as the workers saw it
    trainer._host = LocalHost(False)
    trainer._host.world_size = trainer.world_size_history[-1] if \
        trainer.world_size_history else 1
    trainer.datamodule = datamodule
    trainer.callback_metrics = state.callback_metrics
    trainer.logged_metrics = state.logged_metrics
    trainer._pbar_raw = dict(state.pbar)
    trainer.interrupted = state.interrupted
    if fitted:
        trainer._progress.load_state_dict(state.progress)
        trainer.should_stop = state.should_stop
        trainer.num_training_batches = state.num_training_batches
        trainer.num_val_batches = state.num_val_batches
    else:
        trainer.num_test_batches = state.num_test_batches
    # matched by key (the driver's tag, else ``state_key``), never by position: a worker's
    # list differs from the driver's when ``configure_callbacks`` replaced or added callbacks
    # (REVIEW 5.1)
    from ray_lit.loop.stages import merge_configured_callbacks

    trainer.callbacks = merge_configured_callbacks(trainer.callbacks, module)
    remote = state.callbacks
    for callback in trainer.callbacks:
        if isinstance(callback, ProgressBar):
            continue
        remote_state = remote.get(callback_key(callback))
        if remote_state is not None:
            callback.__dict__.update(remote_state)
