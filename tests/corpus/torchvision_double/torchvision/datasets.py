"""``MNIST(root, train=True, transform=None, target_transform=None, download=False)`` over the
idx files in ``root/MNIST/raw`` (the layout torchvision downloads into)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["MNIST"]


def _read_idx(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


class MNIST(Dataset):
    """Images as ``uint8`` arrays of shape (28, 28) (``ToTensor`` makes them tensors), labels
    as ints, like torchvision's MNIST with PIL images."""

    def __init__(self, root: str, train: bool = True, transform: Any = None,
                 target_transform: Any = None, download: bool = False) -> None:
        raw = os.path.join(os.fspath(root), "MNIST", "raw")
        prefix = "train" if train else "t10k"
        images = os.path.join(raw, f"{prefix}-images-idx3-ubyte")
        if not os.path.exists(images):
            raise RuntimeError(f"Dataset not found at {raw} (this test double never downloads)")
        self.data = torch.from_numpy(_read_idx(images).copy())
        self.targets = torch.from_numpy(
            _read_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte")).astype(np.int64))
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.data[index].numpy(), int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target
