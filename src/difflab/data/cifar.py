"""CIFAR-10 from the "python version" batches, read without executing anything.

The files (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html) are Python pickles in
``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch`` and
``batches.meta``. Each batch is a dict with ``data`` (N, 3072) uint8 -- 1024 red, 1024 green,
1024 blue values per row, row-major 32x32 -- and ``labels`` (N ints in 0..9); ``batches.meta``
holds ``label_names`` and ``num_cases_per_batch`` (10,000).

A pickle can call any importable function, so :class:`CifarUnpickler` resolves only the few
globals a numpy array needs, each replaced by a checked stand-in, and refuses every other name
with a :class:`DataError` *before* anything runs. Files are size-capped and parsed from memory,
so a hostile length field cannot trigger a huge read.

Search order: ``root``, ``root/cifar-10-batches-py``, ``root/cifar10/cifar-10-batches-py`` if
``root`` is given; else the same under ``$DIFFLAB_DATA`` (if set) and ``~/.cache/difflab``.
When nothing is found and the network works, the archive is downloaded (MD5-checked) and its
seven files extracted to ``<first place>/cifar10/cifar-10-batches-py``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.data import download as dl
from difflab.data.dataset import ImageDataset, scale_pixels_
from difflab.errors import DataError

log = logging.getLogger(__name__)

CIFAR_DIR = "cifar-10-batches-py"
BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
META = "batches.meta"
ROW = 3 * 32 * 32
MAX_PICKLE_BYTES = 1 << 28  # 256 MiB; a real batch is 31 MB
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


# ----------------------------------------------------------------------------- safe unpickling


def _ndarray_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """Stand-in for numpy's ``_reconstruct``: an empty plain ndarray that BUILD then fills.

    numpy pickles always pass shape (0,); the real data arrives through ``__setstate__``,
    whose byte string is bounded by the file size.
    """
    if subtype is not np.ndarray:
        raise DataError(f"array subtype {subtype!r} is not numpy.ndarray")
    if not isinstance(shape, tuple) or math.prod(int(s) for s in shape) > 1024:
        raise DataError(f"unexpected initial array shape {shape!r}")
    if isinstance(dtype, bytes):
        dtype = dtype.decode("latin1")
    return np.ndarray(shape, dtype=_dtype(dtype))


def _dtype(*args: Any) -> np.dtype:
    """Stand-in for ``numpy.dtype``: plain numeric dtypes only.

    No object, void or structured dtypes: a pickle's BUILD step can forge the flags of a void
    dtype into "holds Python objects" (numpy 2.x), and numpy would then read raw bytes as
    pointers. Builtin numeric dtypes ignore such state, so they are safe to hand out.
    """
    if not args or not isinstance(args[0], (str, np.dtype)):
        raise DataError(f"unexpected dtype arguments {args!r}")
    dt = np.dtype(*args)
    if dt.kind not in "biuf" or dt.fields is not None or dt.subdtype is not None:
        raise DataError(f"dtype {dt} is not allowed (only plain numeric arrays)")
    return dt


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """Stand-in for numpy's ``_frombuffer`` (pickle protocol 5), same semantics."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or order not in ("C", "F"):
        raise DataError("unexpected array buffer")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``, which Python 3 protocol-2 pickles use for bytes."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"unexpected encode({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin1")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,  # numpy 1.x / Python 2
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,  # numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and plain numpy arrays; refuses anything else."""

    def __init__(self, data: bytes, path: Path) -> None:
        # latin1: Python 2 ``str`` (the original files) decodes byte for byte, as numpy expects.
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.path}: refused: the pickle asks for {module}.{name}, which a CIFAR-10 "
                "file never contains (only dicts, lists and numpy arrays are allowed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.path}: refused: the pickle uses persistent ids")


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """Safely unpickle one CIFAR file into a dict with str keys."""
    try:
        size = path.stat().st_size
        if size > MAX_PICKLE_BYTES:
            raise DataError(f"{path}: {size:,} bytes, too large for a CIFAR-10 batch")
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
    try:
        obj = CifarUnpickler(data, path).load()
    except DataError as e:
        msg = str(e)
        raise DataError(msg if msg.startswith(str(path)) else f"{path}: refused: {msg}") from None
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, ValueError, ...
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"{path}: not a valid CIFAR-10 pickle ({reason})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


# ----------------------------------------------------------------------------- validation


def read_meta(path: Path) -> tuple[list[str], int]:
    """(label_names, num_cases_per_batch) from ``batches.meta``."""
    meta = read_cifar_pickle(path)
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: 'label_names' is missing or not a list")
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    if not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'label_names' must be strings")
    per_batch = meta.get("num_cases_per_batch", 10000)
    if isinstance(per_batch, bool) or not isinstance(per_batch, int) or per_batch <= 0:
        raise DataError(f"{path}: 'num_cases_per_batch' is {per_batch!r}, not a positive int")
    return names, per_batch


def read_batch(path: Path, rows: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``data`` (rows, 3072) uint8 and ``labels`` (rows,) int64 from one batch, validated."""
    batch = read_cifar_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: 'data' is missing or not a numpy array")
    if data.dtype != np.uint8 or data.shape != (rows, ROW):
        raise DataError(
            f"{path}: 'data' is {data.dtype} {data.shape}; expected uint8 ({rows}, {ROW})"
        )
    if not isinstance(labels, (list, np.ndarray)):
        raise DataError(f"{path}: 'labels' is missing or not a list")
    if len(labels) != rows:
        raise DataError(f"{path}: holds {rows:,} images but {len(labels):,} labels")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise DataError(f"{path}: 'labels' must be integers")
    y = np.asarray(labels, dtype=np.int64)
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        raise DataError(
            f"{path}: label {y[bad[0]]} at index {bad[0]} is outside 0..{num_classes - 1}"
        )
    return data, y


# ----------------------------------------------------------------------------- loading


def _candidates(root: Path | None) -> list[Path]:
    bases = [root] if root is not None else []
    if root is None:
        env = os.environ.get("DIFFLAB_DATA")
        bases += ([Path(env).expanduser()] if env else []) + [Path.home() / ".cache" / "difflab"]
    return [p for b in bases for p in (b, b / CIFAR_DIR, b / "cifar10" / CIFAR_DIR)]


def _download(dest: Path) -> Path:
    """Download the archive and extract exactly the seven known files into ``dest``."""
    archive = dl.download(CIFAR_URL, dest.parent / "cifar-10-python.tar.gz", CIFAR_MD5)
    wanted = {*BATCHES["train"], *BATCHES["test"], META}
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base in wanted and (f := tar.extractfile(member)):
                (dest / base).write_bytes(f.read())  # a fixed name: no path from the archive
    archive.unlink()
    return dest


def load_cifar10(split: str, root: Path | None = None) -> ImageDataset:
    """CIFAR-10: 32x32 RGB, 10 classes, 50,000 train / 10,000 test."""
    folders = _candidates(root)
    folder = next((f for f in folders if (f / META).is_file()), None)
    if folder is None:
        dest = (root if root is not None else dl.data_home()) / "cifar10" / CIFAR_DIR
        if not dl.network_available(CIFAR_URL):
            raise DataError(
                f"cifar10 not found (searched {', '.join(str(f) for f in folders)}) and no "
                f"network to download it: extract {CIFAR_URL} so that {dest} holds "
                f"data_batch_1..5, test_batch and {META}"
            )
        folder = _download(dest)
    class_names, per_batch = read_meta(folder / META)
    files = [folder / b for b in BATCHES[split]]
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: file not found (cifar10 {split} split)")
    images = torch.empty((per_batch * len(files), 3, 32, 32), dtype=torch.float32)
    labels = torch.empty(per_batch * len(files), dtype=torch.int64)
    for i, f in enumerate(files):
        data, y = read_batch(f, per_batch, len(class_names))
        sl = slice(i * per_batch, (i + 1) * per_batch)
        # numpy casts uint8 -> float32 straight into the preallocated tensor (R, G, B planes)
        images[sl].numpy()[:] = data.reshape(per_batch, 3, 32, 32)
        labels[sl] = torch.from_numpy(y)
        del data
    return ImageDataset(
        images=scale_pixels_(images),
        labels=labels,
        class_names=class_names,
        name="cifar10",
        split=split,
    )
