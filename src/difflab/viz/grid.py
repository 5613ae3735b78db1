"""Image grids: many small images tiled into one picture (PNG)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) floats in ``value_range`` → (N, H, W, C) uint8, clipped."""
    lo, hi = value_range
    x = (images.detach().float().cpu() - lo) / (hi - lo)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, *, padding: int = 2,
              value_range: tuple[float, float] = (-1.0, 1.0), pad_value: int = 255,
              scale: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images into one (rows·(H+p)+p, nrow·(W+p)+p, C) uint8 array.

    ``nrow`` is the number of images per row (default ≈ √N). ``scale`` enlarges each pixel
    (nearest neighbour) so 8×8 or 28×28 images stay crisp when viewed.
    """
    arr = to_uint8(images, value_range)
    n, h, w, c = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / nrow))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                   pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_image(array: np.ndarray, path: str | Path) -> Path:
    """Save an (H, W, C) uint8 array (C = 1 or 3) as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    img.save(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, **kw) -> Path:
    """``make_grid`` then ``save_image``; default scale makes small images at least ~56 px."""
    kw.setdefault("scale", max(1, 56 // images.shape[-1]))
    return save_image(make_grid(images, nrow, **kw), path)
