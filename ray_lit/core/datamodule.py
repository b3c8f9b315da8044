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

    name: str = ""

    def __init__(self, train_transforms: Any = None, val_transforms: Any = None,
                 test_transforms: Any = None, dims: Any = None, *args: Any,
                 **kwargs: Any) -> None:
        # 0.9's constructor: the transforms (and the sample shape, ``dims``) a subclass may
        # pass up; subclasses calling ``super().__init__()`` with nothing keep working
        self.trainer: Any = None
        self._train_transforms = train_transforms
        self._val_transforms = val_transforms
        self._test_transforms = test_transforms
        self._dims = dims
        self._has_prepared_data = False
        self._has_setup: dict[str, bool] = {}

    # --- 0.9 data description -----------------------------------------------------------------
    @property
    def train_transforms(self) -> Any:
        """Transforms of the training data (0.9; set through the constructor or assigned)."""
        return self.__dict__.get("_train_transforms")

    @train_transforms.setter
    def train_transforms(self, value: Any) -> None:
        self._train_transforms = value

    @property
    def val_transforms(self) -> Any:
        return self.__dict__.get("_val_transforms")

    @val_transforms.setter
    def val_transforms(self, value: Any) -> None:
        self._val_transforms = value

    @property
    def test_transforms(self) -> Any:
        return self.__dict__.get("_test_transforms")

    @test_transforms.setter
    def test_transforms(self, value: Any) -> None:
        self._test_transforms = value

    @property
    def dims(self) -> Any:
        """The shape of one sample (0.9), e.g. ``(1, 28, 28)``; None when not described."""
        return self.__dict__.get("_dims")

    @dims.setter
    def dims(self, value: Any) -> None:
        self._dims = value

    def size(self, dim: int | None = None) -> Any:
        """``dims``, or its entry ``dim`` (0.9 ``dm.size()``)."""
        if dim is None:
            return self.dims
        return self.dims[dim]

    # --- the command line (0.9) ---------------------------------------------------------------
    @classmethod
    def add_argparse_args(cls, parent_parser: Any) -> Any:
        """A parser with ``parent_parser``'s options plus one per ``__init__`` argument of
        ``cls`` that argparse can parse (str, int, float, bool)."""
        from ray_lit.core.cli_args import add_signature_args

        return add_signature_args(parent_parser, cls.__init__, cls.__name__,
                                  skip=("train_transforms", "val_transforms", "test_transforms",
                                        "dims"))

    @classmethod
    def from_argparse_args(cls, args: Any, **kwargs: Any) -> LightningDataModule:
        """``cls`` built from the entries of ``args`` its ``__init__`` accepts; ``kwargs``
        override. Here ``num_workers`` is the DataLoader setting it always was."""
        from ray_lit.core.cli_args import pick_kwargs

        return cls(**pick_kwargs(args, cls.__init__, **kwargs))

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

    def predict_dataloader(self) -> Any:
        return None

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int = 0) -> Any:
        return move_to_device(batch, device)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...
