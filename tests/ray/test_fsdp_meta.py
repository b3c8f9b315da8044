"""Meta-device initialisation under ``strategy="fsdp"`` (issue 16, item 2).

``configure_model`` builds the layers under ``torch.device("meta")``; ``FSDPStrategy`` shards
them while they are meta, allocates each rank's shards (``to_empty``) and materialises one
module at a time with its ``reset_parameters()``, keeping rank 0's values. What is checked:

* no rank ever holds more than its shards plus one layer's full tensors (the probe below
  counts the bytes of every materialised parameter at each ``reset_parameters``), and between
  steps each rank holds about 1/2 of the parameters;
* "matches an eagerly built model with the same seed" is defined as: the same
  ``configure_model`` run on the CPU after the same ``seed_everything`` (each layer's
  ``reset_parameters`` draws from the global RNG, in construction order). The meta run then
  starts from exactly the eager run's initial weights, so the trained weights are
  ``torch.equal``;
* the driver's module (its ``configure_model`` builds meta layers too) holds the full trained
  weights after ``fit``.
"""

from __future__ import annotations

import sys

import cloudpickle
import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.errors import MisconfigurationException

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WIDTH, DEPTH = 32, 8


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Probe(nn.Linear):
    """An ``nn.Linear`` that reports each ``reset_parameters`` to its LightningModule."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        report = self.__dict__.get("_report")
        if report is not None:
            report()


class MetaNet(pl.LightningModule):
    def __init__(self, meta: bool) -> None:
        super().__init__()
        self.meta = meta
        self.net: nn.Module | None = None
        self.peak = 0  # the most parameter elements this rank held at one time while building

    def _report(self) -> None:
        self.peak = max(self.peak, sum(_local(p).numel() for p in self.parameters()
                                       if not _local(p).is_meta))

    def configure_model(self) -> None:
        if self.net is not None:
            return
        device = torch.device("meta") if self.meta else torch.device("cpu")
        with device:
            layers: list[nn.Module] = []
            for _ in range(DEPTH):
                layers += [Probe(WIDTH, WIDTH), nn.Tanh()]
            self.net = nn.Sequential(*layers, Probe(WIDTH, 1))
        for layer in self.net:
            if isinstance(layer, Probe):
                layer.__dict__["_report"] = self._report

    def training_step(self, batch, batch_idx):
        total = sum(p.numel() for p in self.parameters())
        self.log("held_fraction", sum(_local(p).numel() for p in self.parameters()) / total)
        self.log("peak_fraction", self.peak / total)
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 4))


class MetaWithoutReset(MetaNet):
    def configure_model(self) -> None:
        if self.net is None:
            with torch.device("meta"):
                self.net = nn.Sequential(NoReset())


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, WIDTH, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True) / WIDTH), batch_size=8)


def _fit(meta: bool, num_workers: int, tmp_path, cls=MetaNet):
    pl.seed_everything(21)
    model = cls(meta)
    trainer = pl.Trainer(num_workers=num_workers, strategy="fsdp", max_epochs=2,
                         default_root_dir=str(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         enable_checkpointing=False, logger=False, max_failures=0)
    trainer.fit(model, _data())
    return model, trainer


def _assert_equal_weights(a: nn.Module, b: nn.Module) -> None:
    for key, value in a.state_dict().items():
        assert not value.is_meta, key
        assert torch.equal(value, b.state_dict()[key]), key


def test_meta_layers_are_built_per_shard_and_train_like_eager_ones(ray_cluster,
                                                                   tmp_path) -> None:
    meta, meta_trainer = _fit(True, 2, tmp_path)
    eager, eager_trainer = _fit(False, 2, tmp_path)
    assert meta_trainer.global_step == eager_trainer.global_step == 8
    # 8 square layers and a head: rank 0 held its half of the shards plus one layer at most
    held = float(meta_trainer.callback_metrics["held_fraction"])
    peak = float(meta_trainer.callback_metrics["peak_fraction"])
    assert 0.45 < held < 0.55
    one_layer = (WIDTH * WIDTH + WIDTH) / sum(p.numel() for p in meta.parameters())
    assert peak <= held + one_layer + 1e-6 and peak < 0.7
    _assert_equal_weights(meta, eager)


def test_meta_layers_in_one_process_match_eager_ones(tmp_path) -> None:
    meta, _ = _fit(True, 0, tmp_path)
    eager, _ = _fit(False, 0, tmp_path)
    _assert_equal_weights(meta, eager)


def test_a_meta_module_without_reset_parameters_is_refused(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match=r"\['NoReset'\].*reset_parameters"):
        _fit(True, 0, tmp_path, cls=MetaWithoutReset)
