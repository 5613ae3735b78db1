"""MNIST and Fashion-MNIST from their IDX files on disk (see :mod:`difflab.data.idx`).

Both sets use the same four file names, gzip-compressed or not::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]   (60,000 images)
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]    (10,000 images)

Search order (first folder holding the split's image file wins):

- fashion-mnist: ``root/fashion-mnist``, ``root`` if ``root`` is given; else
  ``$DIFFLAB_DATA/fashion-mnist``, ``$DIFFLAB_DATA``, ``/usr/share/datasets/fashion-mnist``
  (Debian package ``dataset-fashion-mnist``).
- mnist: ``root/mnist``, ``root`` if given; else ``$DIFFLAB_DATA/mnist``,
  ``~/.cache/difflab/mnist``. ``$DIFFLAB_DATA`` itself is not searched for MNIST because
  Fashion-MNIST files carry the same names. When nothing is found and the network works, the
  files are downloaded (MD5-checked) to ``root/mnist`` or ``$DIFFLAB_DATA/mnist`` or
  ``~/.cache/difflab/mnist``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from difflab.data import download as dl
from difflab.data.builtin import DIGIT_CLASSES
from difflab.data.dataset import ImageDataset, from_uint8
from difflab.data.idx import read_idx_images, read_idx_labels
from difflab.errors import DataError

log = logging.getLogger(__name__)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = (*IDX_FILES["train"], *IDX_FILES["test"])
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# The torchvision mirror of LeCun's files, with their published MD5s.
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` or ``folder/stem``, whichever exists (gzip first)."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_split(folder: Path, split: str, name: str, class_names: list[str]) -> ImageDataset:
    """Read one split's image and label files from ``folder`` and check they agree."""
    img_stem, lbl_stem = IDX_FILES[split]
    img_path = find_idx_file(folder, img_stem)
    lbl_path = find_idx_file(folder, lbl_stem)
    if img_path is None or lbl_path is None:
        missing = img_stem if img_path is None else lbl_stem
        raise DataError(f"{folder}: {missing}[.gz] is missing ({name} {split} split)")
    labels = read_idx_labels(lbl_path)
    k = len(class_names)
    if len(labels) and int(labels.max()) >= k:
        bad = int(np.argmax(labels >= k))
        raise DataError(f"{lbl_path}: label {labels[bad]} at index {bad} is outside 0..{k - 1}")
    pixels = read_idx_images(img_path)  # (N, rows, cols) uint8
    if len(pixels) != len(labels):
        raise DataError(
            f"{img_path}: holds {len(pixels):,} images but {lbl_path.name} holds "
            f"{len(labels):,} labels"
        )
    images = from_uint8(torch.from_numpy(pixels).unsqueeze(1))  # (N, 1, rows, cols)
    del pixels  # the uint8 buffer goes; only the float copy stays
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=list(class_names),
        name=name,
        split=split,
    )


def _search(folders: list[Path], split: str) -> Path | None:
    for folder in folders:
        if find_idx_file(folder, IDX_FILES[split][0]) is not None:
            return folder
    return None


def _env_data() -> Path | None:
    env = os.environ.get("DIFFLAB_DATA")
    return Path(env).expanduser() if env else None


def _file_list() -> str:
    return ", ".join(f + ".gz" for f in ALL_FILES)


def load_fashion_mnist(split: str, root: Path | None = None) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): 28x28 gray, 10 clothing classes."""
    if root is not None:
        folders = [root / "fashion-mnist", root]
    else:
        env = _env_data()
        folders = [env / "fashion-mnist", env] if env else []
        folders.append(FASHION_SYSTEM_DIR)
    folder = _search(folders, split)
    if folder is None:
        searched = ", ".join(str(f) for f in folders)
        raise DataError(
            f"fashion-mnist not found (searched {searched}): install the Debian package "
            f"dataset-fashion-mnist, or put {_file_list()} (or the names without .gz) in "
            f"{folders[0]}"
        )
    return load_idx_split(folder, split, "fashion-mnist", FASHION_CLASSES)


def load_mnist(split: str, root: Path | None = None) -> ImageDataset:
    """MNIST (LeCun et al. 1998): 28x28 gray digits, 60,000 train / 10,000 test."""
    if root is not None:
        folders = [root / "mnist", root]
    else:
        env = _env_data()
        folders = ([env / "mnist"] if env else []) + [Path.home() / ".cache" / "difflab" / "mnist"]
    folder = _search(folders, split)
    if folder is None:
        folder = folders[0] if root is not None else dl.data_home() / "mnist"
        if not dl.network_available(MNIST_URL):
            searched = ", ".join(str(f) for f in folders)
            raise DataError(
                f"mnist not found (searched {searched}) and no network to download it: put "
                f"{_file_list()} (or the names without .gz) in {folder}"
            )
        for fname, md5 in MNIST_MD5.items():
            if not (folder / fname).is_file():
                dl.download(MNIST_URL + fname, folder / fname, md5)
    return load_idx_split(folder, split, "mnist", DIGIT_CLASSES)
