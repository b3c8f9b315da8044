"""``make_grid``: a batch of images (B, C, H, W) laid out in rows of ``nrow``, with padding."""

from __future__ import annotations

import math

import torch

__all__ = ["make_grid"]


def make_grid(tensor: torch.Tensor, nrow: int = 8, padding: int = 2,
              pad_value: float = 0.0, **_: object) -> torch.Tensor:
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.size(1) == 1:  # one channel is shown as three, as torchvision does
        tensor = tensor.expand(-1, 3, -1, -1)
    count, channels, height, width = tensor.shape
    cols = min(nrow, count)
    rows = math.ceil(count / cols)
    cell_h, cell_w = height + padding, width + padding
    grid = tensor.new_full((channels, rows * cell_h + padding, cols * cell_w + padding),
                           pad_value)
    for k in range(count):
        r, c = divmod(k, cols)
        top, left = r * cell_h + padding, c * cell_w + padding
        grid[:, top:top + height, left:left + width] = tensor[k]
    return grid
