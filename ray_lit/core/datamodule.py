"""``LightningDataModule``: data preparation and loaders kept apart from the model."""

from __future__ import annotations

from typing import Any

from ray_lit.core.batch import move_to_device


class LightningDataModule:
    """Subclass and implement ``prepare_data``, ``setup(stage)`` and the ``*_dataloader`` hooks.

    ``prepare_data`` runs once per node (local rank 0) before workers set up; ``setup(stage)``
    runs in every process. The 0.9 flags ``has_prepared_data`` / ``has_setup_fit`` /
    ``has_setup_test`` record what already ran so the trainer does not repeat it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.trainer: Any = None
        self._has_prepared_data = False
        self._has_setup: dict[str, bool] = {}

    # --- call-once bookkeeping (0.9) ----------------------------------------------------------
    @property
    def has_prepared_data(self) -> bool:
        return getattr(self, "_has_prepared_data", False)

    @property
    def has_setup_fit(self) -> bool:
        return getattr(self, "_has_setup", {}).get("fit", False)

    @property
    def has_setup_validate(self) -> bool:
        return getattr(self, "_has_setup", {}).get("validate", False)

    @property
    def has_setup_test(self) -> bool:
        return getattr(self, "_has_setup", {}).get("test", False)

    def _run_prepare_data(self) -> None:
        if not self.has_prepared_data:
            self.prepare_data()
            self._has_prepared_data = True

    def _run_setup(self, stage: str) -> None:
        setup_done = getattr(self, "_has_setup", None)
        if setup_done is None:
            setup_done = self._has_setup = {}
        if setup_done.get(stage):
            return
        self.setup(stage)
        setup_done[stage] = True

    # --- hooks --------------------------------------------------------------------------------
    def prepare_data(self) -> None: ...
    def setup(self, stage: str | None = None) -> None: ...
    def teardown(self, stage: str | None = None) -> None: ...

    def train_dataloader(self) -> Any:
        return None

    def val_dataloader(self) -> Any:
        return None

    def test_dataloader(self) -> Any:
        return None

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int = 0) -> Any:
        return move_to_device(batch, device)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...
