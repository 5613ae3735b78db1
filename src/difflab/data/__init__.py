"""Data sets: one in-memory :class:`ImageDataset` per (spec, split).

``load_dataset(spec)`` takes a registered name (``DATASETS``: digits, mnist5k, fashion-mnist,
mnist, cifar10) or the path of a folder of PNG/JPEG images. A name wins over a same-named folder
in the working directory; write ``./digits`` for the folder.

Images are ``(N, C, H, W)`` float32 in ``[-1, 1]``; labels ``(N,)`` int64. Unlabeled data (a
flat folder) has one class and all labels 0. Every problem a user can cause -- missing or
corrupt files, an unknown name, a bad split -- is a one-line :class:`~difflab.errors.DataError`
naming the file; bad ``image_size`` / ``channels`` values are a
:class:`~difflab.errors.ConfigError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from difflab.data.builtin import load_digits, load_mnist5k
from difflab.data.captions import CaptionConfig, Captioner, captions_for
from difflab.data.cifar import load_cifar10
from difflab.data.dataset import (
    SPLITS,
    ImageDataset,
    check_image_args,
    conform,
    dataset_info,
    dataset_record,
    recorded_spec,
)
from difflab.data.folder import load_folder
from difflab.data.idx import read_idx, read_idx_images, read_idx_labels, write_idx
from difflab.data.mnist import load_fashion_mnist, load_mnist
from difflab.errors import DataError

Loader = Callable[[str, Path | None], ImageDataset]  # (split, root) -> data set

# name -> loader(split, root). Each returns the set at its native size and channels;
# load_dataset applies image_size / channels afterwards.
DATASETS: dict[str, Loader] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
}


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or Path(spec).exists()


def folder_without_test_split(spec: str | os.PathLike) -> bool:
    """An image folder with no ``test/`` sub-folder: its test images are held out of its
    training images (``difflab.runs.autoencoders.train_test_split``), or there are none."""
    folder = Path(spec)
    return folder.is_dir() and not (folder / "test").is_dir()


def load_dataset(
    spec: str | os.PathLike,
    split: str = "train",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    root: str | Path | None = None,
) -> ImageDataset:
    """Load one split of a named data set or of a folder of images.

    spec: a key of ``DATASETS`` (case-insensitive) or a folder path.
    split: ``"train"`` or ``"test"``.
    image_size: resize (shorter side) and center-crop to ``image_size x image_size``.
    channels: 1 (grayscale, BT.601 luma) or 3 (gray repeated); None keeps the native count.
    root: where to look for the files of a named set instead of the default places
    (ignored by the bundled ``digits`` / ``mnist5k`` and by folders).
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise DataError(f"data set must be a name or a folder path, got {spec!r}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {spec}; choose one of {', '.join(SPLITS)}")
    check_image_args(image_size, channels)
    loader = DATASETS.get(spec) or (None if _looks_like_path(spec) else DATASETS.get(spec.lower()))
    if loader is not None:
        root_path = Path(root).expanduser() if root is not None else None
        return conform(loader(split, root_path), image_size, channels)
    if _looks_like_path(spec):
        return load_folder(spec, split, image_size=image_size, channels=channels)
    raise DataError(
        f"unknown data set {spec!r}; known: {', '.join(DATASETS)}, or the path of a folder of "
        "PNG/JPEG images"
    )


__all__ = [
    "DATASETS",
    "CaptionConfig",
    "Captioner",
    "SPLITS",
    "ImageDataset",
    "captions_for",
    "dataset_info",
    "dataset_record",
    "folder_without_test_split",
    "load_dataset",
    "load_folder",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "recorded_spec",
    "write_idx",
]
