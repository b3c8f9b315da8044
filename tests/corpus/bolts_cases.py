"""bolts 0.2.2's models, each with tiny generated data, run the same way on any Lightning.

A case builds one bolts model exactly as bolts ships it (only small sizes are chosen through its
own constructor arguments) and generated loaders (no downloads). ``run_case`` trains it with
``import pytorch_lightning as pl`` as it resolves in the calling process: real
pytorch-lightning 0.9.0 (``real_lightning09.py``) or ray_lit (``ray_lit.compat``), in process or
on Ray workers, and reports what the tests compare: the metric keys, a loss on a fixed batch
before and after training, whether a checkpoint reloads to equal weights, the test keys.

The ``pl_bolts`` package must be importable (its folder on ``sys.path``) and
``legacy_torch.install()`` must have run.
"""

from __future__ import annotations

import copy as copy_module
import importlib
import math
import os
import pathlib
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

SEED = 1234


def _smooth_images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Images in [0, 1] made of a few smooth blobs (learnable in a few steps, unlike noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


class TwoViews(Dataset):
    """``((view_1, view_2), label)`` pairs, as bolts' self-supervised transforms yield them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.first = images
        self.second = (images + 0.05 * torch.randn(images.shape, generator=g)).clamp(0, 1)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Any:
        return (self.first[i], self.second[i]), self.labels[i]


def _patches(images: torch.Tensor, size: int = 8, step: int = 4) -> torch.Tensor:
    """``(n, 49, c, 8, 8)`` overlapping patches of 32x32 images, as CPC's transforms cut them."""
    cut = images.unfold(2, size, step).unfold(3, size, step)  # n, c, 7, 7, size, size
    n, c = cut.shape[:2]
    return cut.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, c, size, size).contiguous()


def _labels(images: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """Learnable labels: the rank of each image's brightness, in ``classes`` equal bins."""
    ranks = images.mean(dim=(1, 2, 3)).argsort().argsort()
    return ranks * classes // len(images)


def image_loaders(channels: int, size: int, n_train: int = 8, n_val: int = 4,
                  batch_size: int = 4) -> tuple[DataLoader, DataLoader]:
    """``(image, label)`` loaders."""
    def loader(n: int, seed: int) -> DataLoader:
        images = _smooth_images(n, channels, size, seed)
        return DataLoader(TensorDataset(images, _labels(images)), batch_size=batch_size)
    return loader(n_train, 0), loader(n_val, 1)


def two_view_loaders(size: int = 32, n_train: int = 8, n_val: int = 8,
                     batch_size: int = 4) -> tuple[DataLoader, DataLoader]:
    """``((view_1, view_2), label)`` loaders (``drop_last``: 8 rows leave each of 2 Ray workers
    one full batch)."""
    def loader(n: int, seed: int) -> DataLoader:
        images = _smooth_images(n, 3, size, seed)
        return DataLoader(TwoViews(images, _labels(images), seed), batch_size=batch_size,
                          drop_last=True)
    return loader(n_train, 0), loader(n_val, 1)


def patch_loaders(n_train: int = 8, n_val: int = 4,
                  batch_size: int = 2) -> tuple[DataLoader, DataLoader]:
    """``(patches, label)`` loaders for CPC."""
    def loader(n: int, seed: int) -> DataLoader:
        images = _smooth_images(n, 3, 32, seed)
        return DataLoader(TensorDataset(_patches(images), _labels(images)),
                          batch_size=batch_size, drop_last=True)
    return loader(n_train, 0), loader(n_val, 1)


def write_tiny_mnist(root: pathlib.Path, n_train: int = 64, n_test: int = 32) -> None:
    """A generated MNIST in torchvision's on-disk layout: ``MNIST(root, download=True)`` finds
    it and fetches nothing."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 255, (n, 28, 28))),
                            ("labels-idx1", rng.integers(0, 10, n))):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(
                d.to_bytes(4, "big") for d in array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())


@dataclass
class Built:
    """One case, ready to train."""

    model: Any
    train: DataLoader
    val: DataLoader
    test: DataLoader | None
    probe: Callable[[Any], torch.Tensor]  # the model's own loss on a fixed batch
    reload_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer_options: dict[str, Any] = field(default_factory=dict)


def _first(loader: DataLoader) -> Any:
    return next(iter(loader))


def generated_datamodule(name: str, train: DataLoader, val: DataLoader,
                         num_classes: int = 10) -> Any:
    """A ``LightningDataModule`` serving ``train`` / ``val``, for the models that keep their
    datamodule (0.9's ``trainer.fit(model)`` then calls its ``prepare_data``: bolts' own CIFAR /
    FashionMNIST modules would download there). ``name`` is what MocoV2 reads."""
    import pytorch_lightning as pl

    class Generated(pl.LightningDataModule):
        def prepare_data(self) -> None:
            pass

        def train_dataloader(self) -> DataLoader:
            return train

        def val_dataloader(self) -> DataLoader:
            return val

    module = Generated()
    module.name, module.num_classes = name, num_classes
    return module


def _ae(module: str, cls: str) -> Callable[[pathlib.Path], Built]:
    def build(root: pathlib.Path) -> Built:
        model = getattr(importlib.import_module(module), cls)(input_height=32, latent_dim=16,
                                                              lr=1e-3)
        train, val = image_loaders(3, 32)
        batch = _first(val)
        return Built(model, train, val, None, lambda m: m.step(batch, 0)[0])
    return build


def _gan(root: pathlib.Path) -> Built:
    from pl_bolts.models.gans.basic.basic_gan_module import GAN

    model = GAN(input_channels=1, input_height=28, input_width=28, latent_dim=16,
                learning_rate=2e-3)
    train, val = image_loaders(1, 28)
    x = _first(train)[0]

    def probe(m: Any) -> torch.Tensor:
        # the discriminator's loss on real images (the adversarial totals need not fall)
        real = m.discriminator(x.view(len(x), -1))
        return F.binary_cross_entropy(real, torch.ones_like(real))
    return Built(model, train, val, None, probe)


def _lit_mnist(root: pathlib.Path) -> Built:
    from pl_bolts.models.mnist_module import LitMNIST

    write_tiny_mnist(root)
    model = LitMNIST(hidden_dim=64, learning_rate=2e-3, batch_size=8, num_workers=0,
                     data_dir=str(root))
    train, val = image_loaders(1, 28, n_train=32, n_val=16, batch_size=8)
    x, y = _first(train)
    return Built(model, train, val, val, lambda m: F.cross_entropy(m(x), y))


def _byol(root: pathlib.Path) -> Built:
    from pl_bolts.models.self_supervised.byol.byol_module import BYOL

    model = BYOL(num_classes=10, learning_rate=1e-3, input_height=32, batch_size=4,
                 warmup_epochs=1, max_epochs=3)
    train, val = two_view_loaders()
    batch = _first(train)
    # BYOL's target-network momentum follows global_step / trainer.max_steps: it needs max_steps
    return Built(model, train, val, None, lambda m: m.shared_step(batch, 0)[2],
                 trainer_options={"max_steps": 6})


def _moco(root: pathlib.Path) -> Built:
    from pl_bolts.models.self_supervised.moco.moco2_module import MocoV2

    train, val = two_view_loaders()
    model = MocoV2(base_encoder="resnet18", emb_dim=16, num_negatives=16, batch_size=4,
                   num_workers=0, learning_rate=0.05,
                   datamodule=generated_datamodule("cifar10", train, val))
    (img_1, img_2), _ = _first(val)

    def probe(m: Any) -> torch.Tensor:
        # the InfoNCE loss of the query encoder against its own keys (no queue, no momentum
        # update: a pure function of the weights)
        q = F.normalize(m.encoder_q(img_1), dim=1)
        k = F.normalize(m.encoder_q(img_2), dim=1)
        return F.cross_entropy(q @ k.T / 0.07, torch.arange(len(q)))
    return Built(model, train, val, None, probe, {"datamodule": None})


def _simclr(root: pathlib.Path) -> Built:
    from pl_bolts.models.self_supervised.simclr.simclr_module import SimCLR

    model = SimCLR(batch_size=4, num_samples=8, warmup_epochs=1, lr=1e-3)
    train, val = two_view_loaders()
    batch = _first(train)
    return Built(model, train, val, None, lambda m: m.shared_step(batch, 0))


def _amdim(root: pathlib.Path) -> Built:
    from pl_bolts.models.self_supervised.amdim.amdim_module import AMDIM

    model = AMDIM(image_height=32, encoder_feature_dim=32, embedding_fx_dim=64,
                  conv_block_depth=1, batch_size=4, learning_rate=1e-3)
    train, val = two_view_loaders()
    (img_1, img_2), _ = _first(train)

    def probe(m: Any) -> torch.Tensor:
        features = m(img_1, img_2)
        loss, regulariser = m.contrastive_task(features[:3], features[3:])
        return loss.sum() + regulariser
    # a module-valued hyperparameter: ray_lit asks for it on reload rather than pickle it
    task = importlib.import_module("pl_bolts.losses.self_supervised_learning")
    return Built(model, train, val, None, probe,
                 {"contrastive_task": task.FeatureMapContrastiveTask("01, 02, 11")})


def _cpc(root: pathlib.Path) -> Built:
    from pl_bolts.models.self_supervised.cpc.cpc_module import CPCV2

    train, val = patch_loaders()
    model = CPCV2(datamodule=generated_datamodule("cifar10", train, val), encoder="resnet18",
                  num_workers=0, batch_size=2, learning_rate=1e-3, data_dir=str(root))
    batch = _first(train)
    return Built(model, train, val, None, lambda m: m.shared_step(batch),
                 {"datamodule": None})


def _finetuner(root: pathlib.Path) -> Built:
    from pl_bolts.models.self_supervised.ssl_finetuner import SSLFineTuner

    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = SSLFineTuner(backbone, in_features=8, num_classes=10, hidden_dim=16)
    train, val = image_loaders(3, 32)
    batch = _first(train)
    # SSLFineTuner saves no hyperparameters: a reload is given them all again
    return Built(model, train, val, val, lambda m: m.shared_step(batch)[0],
                 {"backbone": backbone, "in_features": 8, "num_classes": 10, "hidden_dim": 16})


def _image_gpt_builder(classify: bool) -> Callable[[pathlib.Path], Built]:
    return lambda root: _image_gpt(root, classify)


def _image_gpt(root: pathlib.Path, classify: bool) -> Built:
    from pl_bolts.models.vision.image_gpt.igpt_module import ImageGPT

    train, val = image_loaders(1, 28)
    model = ImageGPT(datamodule=generated_datamodule("fashion_mnist", train, val), embed_dim=16,
                     heads=2, layers=1, pixels=28, vocab_size=16, num_classes=10, classify=classify,
                     batch_size=4, learning_rate=1e-2, steps=20, num_workers=0,
                     data_dir=str(root))
    batch = _first(train)

    def probe(m: Any) -> torch.Tensor:
        return m.validation_step(batch, 0)["val_loss"]
    return Built(model, train, val, val, probe, {"datamodule": None})


CASES: dict[str, Callable[[pathlib.Path], Built]] = {  # the cheapest first
    "LitMNIST": _lit_mnist,
    "GAN": _gan,
    "SSLFineTuner": _finetuner,
    "ImageGPT": _image_gpt_builder(classify=False),
    "ImageGPT-classify": _image_gpt_builder(classify=True),
    "MocoV2": _moco,
    "AMDIM": _amdim,
    "CPCV2": _cpc,
    "AE": _ae("pl_bolts.models.autoencoders.basic_ae.basic_ae_module", "AE"),
    "VAE": _ae("pl_bolts.models.autoencoders.basic_vae.basic_vae_module", "VAE"),
    "BYOL": _byol,
    "SimCLR": _simclr,
}


def _probe(built: Built, model: Any) -> float:
    torch.manual_seed(SEED)  # the VAE samples, the GAN draws z: the same draws before and after
    # on a copy in training mode: batch-norm running statistics of a dozen steps are not yet
    # usable (eval mode would measure them, not the training), and the run's model stays as is
    copy = copy_module.deepcopy(model)
    copy.train()
    with torch.no_grad():
        return float(built.probe(copy))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def run_case(name: str, root: pathlib.Path, epochs: int = 3,
             **trainer_options: Any) -> dict[str, Any]:
    """Train case ``name`` with ``pytorch_lightning`` as it resolves here; report the outcome.

    Called by the driver (the test process, or the real-0.9 subprocess); with ray_lit on Ray
    workers, ``trainer_options`` (or ``ray_lit.compat.install``) carry the worker count.
    """
    import pytorch_lightning as pl

    report: dict[str, Any] = {"case": name}
    try:
        pl.seed_everything(SEED)
        root.mkdir(parents=True, exist_ok=True)
        built = CASES[name](root)
        report["loss_before"] = _probe(built, built.model)
        trainer = pl.Trainer(max_epochs=epochs, default_root_dir=str(root),
                             progress_bar_refresh_rate=0, weights_summary=None,
                             num_sanity_val_steps=0,
                             **{**built.trainer_options, **trainer_options})
        trainer.fit(built.model, built.train, built.val)
        report["loss_after"] = _probe(built, built.model)
        report["metric_keys"] = sorted(trainer.callback_metrics)
        report["logged_keys"] = sorted(set(getattr(trainer, "logged_metrics", {})) - {"epoch"})
        report["progress_bar_keys"] = sorted(getattr(trainer, "progress_bar_metrics", {}))
        report["steps"] = int(trainer.global_step)
        # ray_lit's worker count (real 0.9 has no ``config``: one process)
        report["workers"] = int(getattr(getattr(trainer, "config", None), "num_workers", 0) or 0)
        if built.test is not None:
            results = trainer.test(built.model, test_dataloaders=built.test)
            report["test_keys"] = sorted(results[0]) if results else []
        path = str(root / "final.ckpt")
        # weights only (0.9 has the flag too): after a Ray fit the driver's Trainer holds the
        # trained module but no optimizer or precision state to write
        trainer.save_checkpoint(path, weights_only=True)
        reloaded = type(built.model).load_from_checkpoint(path, **built.reload_kwargs)
        report["reload_equal"] = _same_weights(reloaded, built.model)
        report["finite"] = math.isfinite(report["loss_after"])
    except Exception as err:  # the report says what failed, on which Lightning
        report["error"] = f"{type(err).__name__}: {err}"[:500]
        report["traceback"] = traceback.format_exc()[-3000:]
    return report


def pl_bolts_root() -> str:
    """The folder holding ``pl_bolts`` on ``sys.path`` (for worker ``PYTHONPATH``)."""
    import pl_bolts

    return os.path.dirname(os.path.dirname(pl_bolts.__file__))
