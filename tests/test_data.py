"""difflab.data: every reader on small real-format files built here, and every bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import difflab.data.mnist as mnist_mod
from difflab.data import (
    DATASETS,
    ImageDataset,
    dataset_info,
    load_dataset,
    read_idx,
    read_idx_images,
    read_idx_labels,
    write_idx,
)
from difflab.data.builtin import mnist5k_order
from difflab.data.dataset import convert_channels, resize_center_crop
from difflab.data.download import download
from difflab.errors import ConfigError, DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No network, no real ~/.cache or $DIFFLAB_DATA: every test sees only what it builds."""
    monkeypatch.setenv("DIFFLAB_OFFLINE", "1")
    monkeypatch.delenv("DIFFLAB_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def data_error(fn, *names) -> str:
    """Run ``fn``; assert it raises a one-line DataError mentioning every name; return it."""
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


# ============================================================================ IDX


def make_idx_set(folder: Path, n: int = 6, *, gz: bool = True, split: str = "train", seed=0):
    """Write one split of an MNIST-format set; return (pixels (n, 28, 28), labels (n,))."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    img, lbl = mnist_mod.IDX_FILES[split]
    ext = ".gz" if gz else ""
    write_idx(folder / (img + ext), pixels)
    write_idx(folder / (lbl + ext), labels)
    return pixels, labels


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 4), (2, 3, 4, 5)])
def test_idx_round_trip(tmp_path, suffix, shape):
    a = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    p = write_idx(tmp_path / f"x{suffix}", a)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    b = read_idx(p)
    assert b.dtype == np.uint8 and b.shape == shape and np.array_equal(a, b)
    assert b.flags.writeable


def test_idx_header_bytes(tmp_path):
    p = write_idx(tmp_path / "l", np.array([1, 2, 3], np.uint8))
    assert p.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])
    p = write_idx(tmp_path / "i", np.zeros((2, 1, 1), np.uint8))
    assert p.read_bytes()[:4] == b"\x00\x00\x08\x03"
    assert read_idx_images(p).shape == (2, 1, 1)


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    raw = write_idx(tmp_path / "raw", a)
    misnamed = raw.rename(tmp_path / "raw.gz")
    assert np.array_equal(read_idx(misnamed), a)
    (tmp_path / "gz").write_bytes(gzip.compress(misnamed.read_bytes()))
    assert np.array_equal(read_idx(tmp_path / "gz"), a)


def test_idx_wrong_magic(tmp_path):
    p = write_idx(tmp_path / "labels", np.zeros(4, np.uint8))
    data_error(lambda: read_idx_images(p), p, "wrong magic number 0x00000801", "0x00000803")
    q = write_idx(tmp_path / "images", np.zeros((1, 2, 2), np.uint8))
    data_error(lambda: read_idx_labels(q), q, "0x00000803", "expected 0x00000801")
    r = tmp_path / "png"
    r.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    data_error(lambda: read_idx(r), r, "bad magic number 0x89504E47")


def test_idx_unsupported_dtype(tmp_path):
    p = tmp_path / "f32"
    p.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4))
    data_error(lambda: read_idx(p), p, "unsupported IDX data type 0x0D")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_body(tmp_path, gz):
    good = write_idx(tmp_path / "good", np.zeros((10, 28, 28), np.uint8)).read_bytes()
    cut = good[: len(good) - 100]
    p = tmp_path / "cut"
    p.write_bytes(gzip.compress(cut) if gz else cut)
    msg = data_error(lambda: read_idx_images(p), p, "truncated", "10x28x28")
    assert "7,840" in msg


def test_idx_truncated_gzip_stream(tmp_path):
    p = write_idx(
        tmp_path / "x.gz", np.random.default_rng(0).integers(0, 256, (50, 28, 28), np.uint8)
    )
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])
    data_error(lambda: read_idx_images(p), p)


def test_idx_truncated_header(tmp_path):
    p = tmp_path / "short"
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    data_error(lambda: read_idx_images(p), p, "truncated IDX header")
    p.write_bytes(b"\x00")
    data_error(lambda: read_idx(p), p, "truncated IDX header")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_absurd_header_refused_before_allocating(tmp_path, gz):
    # 4e9 images of 28x28 (3e12 bytes) claimed in a 16-byte file
    header = bytes([0, 0, 8, 3]) + (4_000_000_000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    p = tmp_path / "huge"
    p.write_bytes(gzip.compress(header) if gz else header)
    data_error(lambda: read_idx_images(p), p, "4000000000x28x28", "limit")


def test_idx_large_claim_in_gzip_fails_without_allocating(tmp_path):
    # under the hard limit (1 GB claimed) but the stream holds 10 bytes: must fail fast
    header = bytes([0, 0, 8, 3]) + (1_000_000).to_bytes(4, "big") + (1000).to_bytes(4, "big")
    header += (1).to_bytes(4, "big") + bytes(10)
    p = tmp_path / "claim.gz"
    p.write_bytes(gzip.compress(header))
    data_error(lambda: read_idx_images(p), p, "truncated", "holds 10")


def test_idx_empty_and_bad_dims(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(bytes([0, 0, 8, 3]) + bytes(12))
    data_error(lambda: read_idx_images(p), p, "empty shape 0x0x0")
    p.write_bytes(bytes([0, 0, 8, 0]))
    data_error(lambda: read_idx(p), p, "0 dimensions")


def test_idx_trailing_bytes(tmp_path):
    for name in ("t", "t.gz"):
        p = write_idx(tmp_path / name, np.zeros(5, np.uint8))
        blob = gzip.decompress(p.read_bytes()) if name.endswith("gz") else p.read_bytes()
        blob += b"junk"
        p.write_bytes(gzip.compress(blob) if name.endswith("gz") else blob)
        data_error(lambda p=p: read_idx_labels(p), p, "unexpected")


def test_idx_missing_file_and_folder(tmp_path):
    data_error(lambda: read_idx(tmp_path / "nope"), tmp_path / "nope", "not found")
    data_error(lambda: read_idx(tmp_path), tmp_path, "folder")


def test_write_idx_refuses_non_uint8(tmp_path):
    with pytest.raises(ValueError):
        write_idx(tmp_path / "x", np.zeros(3, np.float32))


# ============================================================================ MNIST / Fashion


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_root(tmp_path, gz):
    pixels, labels = make_idx_set(tmp_path / "fashion-mnist", n=12, gz=gz, split="test")
    ds = load_dataset("fashion-mnist", "test", root=tmp_path)
    assert isinstance(ds, ImageDataset) and ds.split == "test" and ds.name == "fashion-mnist"
    assert ds.images.shape == (12, 1, 28, 28) and ds.images.dtype == torch.float32
    expected = torch.from_numpy(pixels).float().unsqueeze(1) / 127.5 - 1
    assert torch.equal(ds.images, expected)
    assert ds.labels.tolist() == labels.tolist() and ds.labels.dtype == torch.int64
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[-1] == "Ankle boot"
    assert ds.num_classes == 10 and ds.image_shape == (1, 28, 28)


def test_fashion_mnist_from_env(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "data" / "fashion-mnist", n=3)
    monkeypatch.setenv("DIFFLAB_DATA", str(tmp_path / "data"))
    assert len(load_dataset("fashion-mnist")) == 3


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "FASHION_SYSTEM_DIR", tmp_path / "none")
    monkeypatch.setenv("DIFFLAB_DATA", str(tmp_path / "data"))
    data_error(
        lambda: load_dataset("fashion-mnist"),
        "dataset-fashion-mnist",
        "train-images-idx3-ubyte.gz",
        tmp_path / "data" / "fashion-mnist",
    )


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason=f"{FASHION_DIR} absent (Debian package dataset-fashion-mnist not installed)",
)
def test_fashion_mnist_system_files():
    ds = load_dataset("fashion-mnist", "test")
    assert ds.images.shape == (10000, 1, 28, 28)
    info = dataset_info(ds)
    assert info["class_counts"]["Ankle boot"] == 1000 and set(info["class_counts"].values()) == {
        1000
    }
    assert info["min"] == -1.0 and info["max"] == 1.0
    # one copy: the tensor owns exactly its own storage (no larger buffer behind a view)
    assert ds.images.is_contiguous()
    assert ds.images.untyped_storage().nbytes() == ds.images.numel() * 4


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} absent")
def test_fashion_mnist_system_train():
    ds = load_dataset("fashion-mnist", "train")
    assert ds.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [6000] * 10


def test_mnist_from_env_and_root(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "data" / "mnist", n=4, gz=False, split="test")
    monkeypatch.setenv("DIFFLAB_DATA", str(tmp_path / "data"))
    ds = load_dataset("mnist", "test")
    assert len(ds) == 4 and ds.class_names == [str(i) for i in range(10)]
    assert len(load_dataset("MNIST", "test", root=tmp_path / "data")) == 4
    make_idx_set(tmp_path / "home" / ".cache" / "difflab" / "mnist", n=5)
    monkeypatch.delenv("DIFFLAB_DATA")
    assert len(load_dataset("mnist")) == 5


def test_mnist_missing_names_files_and_folder(tmp_path):
    msg = data_error(
        lambda: load_dataset("mnist"),
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        tmp_path / "home" / ".cache" / "difflab" / "mnist",
    )
    assert "no network" in msg


def test_mnist_download_path(tmp_path, monkeypatch):
    """The download branch, fed from file:// URLs with matching MD5s (no network involved)."""
    src = tmp_path / "mirror"
    make_idx_set(src, n=3, split="train")
    make_idx_set(src, n=2, split="test")
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in src.iterdir()}
    monkeypatch.setattr(mnist_mod, "MNIST_URL", src.as_uri() + "/")
    monkeypatch.setattr(mnist_mod, "MNIST_MD5", md5)
    monkeypatch.delenv("DIFFLAB_OFFLINE")
    ds = load_dataset("mnist", "test", root=tmp_path / "dl")
    assert len(ds) == 2 and (tmp_path / "dl" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_download_checks_md5(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    good = hashlib.md5(b"hello").hexdigest()
    assert download(f.as_uri(), tmp_path / "out" / "g", good).read_bytes() == b"hello"
    data_error(lambda: download(f.as_uri(), tmp_path / "bad", "0" * 32), "MD5", good)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.part").exists()
    data_error(lambda: download((tmp_path / "nope").as_uri(), tmp_path / "x", good), "failed")


def test_idx_count_mismatch(tmp_path):
    folder = tmp_path / "mnist"
    make_idx_set(folder, n=5)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    data_error(
        lambda: load_dataset("mnist", root=tmp_path),
        folder / "train-images-idx3-ubyte.gz",
        "5 images",
        "4 labels",
    )


def test_idx_label_out_of_range_and_missing_labels(tmp_path):
    folder = tmp_path / "mnist"
    make_idx_set(folder, n=5)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.array([0, 1, 12, 3, 4], np.uint8))
    data_error(lambda: load_dataset("mnist", root=tmp_path), "label 12 at index 2")
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    data_error(lambda: load_dataset("mnist", root=tmp_path), folder, "train-labels-idx1-ubyte")


def test_idx_labels_swapped_for_images(tmp_path):
    folder = tmp_path / "mnist"
    make_idx_set(folder, n=5, gz=False)
    img = folder / "train-images-idx3-ubyte"
    img.write_bytes((folder / "train-labels-idx1-ubyte").read_bytes())
    data_error(lambda: load_dataset("mnist", root=tmp_path), img, "wrong magic number")


# ============================================================================ CIFAR-10

_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, pickled by name


class _Py2Array:
    """Pickles an array the way Python 2 numpy wrote the CIFAR files: state bytes as a str."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def __reduce__(self):
        a = self.a
        state = (1, a.shape, a.dtype, False, a.tobytes().decode("latin1"))
        return (_NP_RECONSTRUCT, (np.ndarray, (0,), "b"), state)


def _dump(obj, fmt) -> bytes:
    if fmt == "py2":  # protocol 2, numpy 1.x global names, str payloads: the original files
        obj = {k: _Py2Array(v) if isinstance(v, np.ndarray) else v for k, v in obj.items()}
        blob = pickle.dumps(obj, protocol=2)
        mod = _NP_RECONSTRUCT.__module__.encode()  # numpy._core.multiarray on numpy 2
        return blob.replace(
            b"c" + mod + b"\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n"
        )
    return pickle.dumps(obj, protocol=fmt)


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]  # fmt: skip


def make_cifar(root: Path, per_batch: int = 4, fmt="py2", seed=0) -> Path:
    """A cifar-10-batches-py folder in the real format with ``per_batch`` images per batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    meta = {"num_cases_per_batch": per_batch, "label_names": CIFAR_NAMES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(_dump(meta, fmt))
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batch = {
            "batch_label": f"batch {i}",
            "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}_{k}.png" for k in range(per_batch)],
        }
        (folder / name).write_bytes(_dump(batch, fmt))
    return folder


def _load_plain(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="latin1")


@pytest.mark.parametrize("fmt", ["py2", 2, 4, 5])
def test_cifar_reads_real_format(tmp_path, fmt):
    folder = make_cifar(tmp_path, fmt=fmt)
    ds = load_dataset("cifar10", "train", root=tmp_path)
    assert ds.images.shape == (20, 3, 32, 32) and ds.class_names == CIFAR_NAMES
    b1 = _load_plain(folder / "data_batch_1")  # the plain (unsafe) reader agrees
    row = torch.from_numpy(b1["data"][1].astype(np.float32)) / 127.5 - 1
    assert torch.equal(ds.images[1, 0].flatten(), row[:1024])  # red plane first
    assert torch.equal(ds.images[1, 2].flatten(), row[2048:])
    assert ds.labels[:4].tolist() == b1["labels"]
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert len(test) == 4 and test.split == "test"


def test_cifar_found_under_env(tmp_path, monkeypatch):
    make_cifar(tmp_path / "data" / "cifar10")
    monkeypatch.setenv("DIFFLAB_DATA", str(tmp_path / "data"))
    assert len(load_dataset("cifar10", "test", channels=1, image_size=16)) == 4


class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("where", ["top", "data", "labels", "meta"])
@pytest.mark.parametrize("payload", ["os.system", "subprocess.call", "builtins.eval"])
def test_cifar_malicious_pickle_refused_and_not_run(tmp_path, where, payload):
    folder = make_cifar(tmp_path, fmt=4)
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    evil = {
        "os.system": _Evil(os.system, cmd),
        "subprocess.call": _Evil(subprocess.call, ["touch", str(marker)]),
        "builtins.eval": _Evil(eval, f"open({str(marker)!r}, 'w')"),
    }[payload]
    if where == "top":
        obj, target = evil, folder / "data_batch_1"
    elif where == "meta":
        obj, target = {"label_names": evil}, folder / "batches.meta"
    else:
        batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
        batch[where] = evil
        obj, target = batch, folder / "data_batch_1"
    target.write_bytes(pickle.dumps(obj, protocol=4))
    msg = data_error(lambda: load_dataset("cifar10", root=tmp_path), target, "refused")
    assert payload.split(".")[1] in msg
    assert not marker.exists()


def test_cifar_refuses_object_arrays_and_numpy_loaders(tmp_path):
    folder = make_cifar(tmp_path, fmt=4)
    target = folder / "test_batch"
    target.write_bytes(pickle.dumps({"data": np.array([1, "x"], dtype=object), "labels": []}, 4))
    data_error(lambda: load_dataset("cifar10", "test", root=tmp_path), target, "object")
    # a void dtype whose flags a pickle could forge into "holds objects"
    target.write_bytes(pickle.dumps({"data": np.zeros(2, dtype="V8"), "labels": []}, 4))
    data_error(lambda: load_dataset("cifar10", "test", root=tmp_path), target, "not allowed")
    target.write_bytes(pickle.dumps({"data": np.zeros(2, dtype="u1,u1"), "labels": []}, 5))
    data_error(lambda: load_dataset("cifar10", "test", root=tmp_path), target, "not allowed")
    target.write_bytes(pickle.dumps(_Evil(np.load, "/etc/passwd"), 4))
    data_error(lambda: load_dataset("cifar10", "test", root=tmp_path), target, "numpy.load")


def test_cifar_bad_shapes_and_labels(tmp_path):
    folder = make_cifar(tmp_path, fmt=4)
    t = folder / "test_batch"

    def load():
        return load_dataset("cifar10", "test", root=tmp_path)

    t.write_bytes(pickle.dumps({"data": np.zeros((4, 3000), np.uint8), "labels": [0] * 4}))
    data_error(load, t, "(4, 3000)", "(4, 3072)")
    t.write_bytes(pickle.dumps({"data": np.zeros((5, 3072), np.uint8), "labels": [0] * 5}))
    data_error(load, t, "(5, 3072)")
    t.write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}))
    data_error(load, t, "4 images but 3 labels")
    t.write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}))
    data_error(load, t, "label 10 at index 3")
    t.write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}))
    data_error(load, t, "float32")
    t.write_bytes(pickle.dumps([1, 2, 3]))
    data_error(load, t, "expected a pickled dict")


def test_cifar_corrupt_truncated_missing(tmp_path):
    folder = make_cifar(tmp_path, fmt="py2")
    t = folder / "test_batch"
    blob = t.read_bytes()
    t.write_bytes(blob[: len(blob) // 2])
    data_error(lambda: load_dataset("cifar10", "test", root=tmp_path), t, "not a valid")
    t.write_bytes(os.urandom(200))
    data_error(lambda: load_dataset("cifar10", "test", root=tmp_path), t)
    (folder / "data_batch_3").unlink()
    data_error(lambda: load_dataset("cifar10", root=tmp_path), folder / "data_batch_3", "not found")


def test_cifar_missing_says_where(tmp_path):
    data_error(
        lambda: load_dataset("cifar10"),
        "cifar-10-python.tar.gz",
        tmp_path / "home" / ".cache" / "difflab" / "cifar10" / "cifar-10-batches-py",
        "data_batch_1..5",
    )


# ============================================================================ folders


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _gray(value: int, size=(6, 6)) -> np.ndarray:
    return np.full(size, value, dtype=np.uint8)


def test_folder_flat_gray(tmp_path):
    folder = tmp_path / "faces"
    _png(folder / "a.png", _gray(0))
    _png(folder / "b.png", _gray(255))
    (folder / "notes.txt").write_text("hi")
    (folder / ".DS_Store").write_bytes(b"\0")
    ds = load_dataset(str(folder))
    assert ds.images.shape == (2, 1, 6, 6) and ds.class_names == ["faces"] and ds.name == "faces"
    assert ds.labels.tolist() == [0, 0] and ds.num_classes == 1
    assert ds.images[0].eq(-1).all() and ds.images[1].eq(1).all()
    assert ds.skipped_files == 2 and dataset_info(ds)["skipped_files"] == 2


def test_folder_classes_rgb_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in [("dog", 2), ("cat", 3)]:
        for i in range(n):
            img = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
            ext = "jpg" if i % 2 else "png"
            _png(tmp_path / "pets" / cls / f"{i}.{ext}", img)
    _png(tmp_path / "pets" / "cat" / "nested" / "deep.JPEG", np.zeros((10, 10, 3), np.uint8))
    (tmp_path / "pets" / "empty_dir").mkdir()
    ds = load_dataset(str(tmp_path / "pets"))
    assert ds.class_names == ["cat", "dog"] and ds.images.shape == (6, 3, 10, 10)
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert dataset_info(ds)["class_counts"] == {"cat": 4, "dog": 2}
    assert -1 <= ds.images.min() and ds.images.max() <= 1


def test_folder_train_test_layout(tmp_path):
    root = tmp_path / "set"
    _png(root / "train" / "a" / "1.png", _gray(10))
    _png(root / "train" / "b" / "1.png", _gray(20))
    _png(root / "test" / "b" / "1.png", _gray(30))
    _png(root / "test" / "c" / "1.png", _gray(40))
    train, test = load_dataset(str(root)), load_dataset(str(root), "test")
    assert train.class_names == test.class_names == ["a", "b", "c"]
    assert train.labels.tolist() == [0, 1] and test.labels.tolist() == [1, 2]


def test_folder_plain_has_no_test_split(tmp_path):
    _png(tmp_path / "f" / "a.png", _gray(1))
    data_error(lambda: load_dataset(str(tmp_path / "f"), "test"), tmp_path / "f", "test")
    (tmp_path / "g" / "train").mkdir(parents=True)
    _png(tmp_path / "g" / "train" / "a.png", _gray(1))
    data_error(lambda: load_dataset(str(tmp_path / "g"), "test"), "'test' sub-folder")


def test_folder_resize_center_crop(tmp_path):
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 255  # white middle third
    _png(tmp_path / "f" / "wide.png", wide)
    _png(tmp_path / "f" / "small.png", _gray(255, (5, 5)))
    ds = load_dataset(str(tmp_path / "f"), image_size=10)
    assert ds.images.shape == (2, 1, 10, 10)
    assert torch.allclose(ds.images, torch.ones_like(ds.images), atol=1e-6)


def test_folder_mixed_sizes_need_image_size(tmp_path):
    _png(tmp_path / "f" / "a.png", _gray(1, (8, 8)))
    b = _png(tmp_path / "f" / "b.png", _gray(1, (8, 9)))
    data_error(lambda: load_dataset(str(tmp_path / "f")), b, "9x8", "8x8", "image_size")


def test_folder_mixed_modes(tmp_path):
    _png(tmp_path / "f" / "a.png", _gray(200))
    c = _png(tmp_path / "f" / "b.png", np.full((6, 6, 3), 200, np.uint8))
    data_error(lambda: load_dataset(str(tmp_path / "f")), c, "color", "grayscale", "channels")
    rgb = load_dataset(str(tmp_path / "f"), channels=3)
    gray = load_dataset(str(tmp_path / "f"), channels=1)
    assert rgb.image_shape == (3, 6, 6) and gray.image_shape == (1, 6, 6)
    assert torch.allclose(gray.images, torch.full_like(gray.images, 200 / 127.5 - 1))


def test_folder_alpha_and_16bit(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white
    _png(tmp_path / "a" / "t.png", rgba)
    assert load_dataset(str(tmp_path / "a")).images.eq(1).all()
    deep = np.full((4, 4), 65535, np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "d.png").rename(tmp_path / "b" / "d.png")
    ds = load_dataset(str(tmp_path / "b"))
    assert ds.image_shape == (1, 4, 4) and torch.allclose(ds.images, torch.ones(1, 1, 4, 4))
    # 16-bit gray with a tRNS level: full 16-bit precision elsewhere, the level becomes white
    deep = np.array([[0, 32768], [65535, 1000]], np.uint16)
    (tmp_path / "c").mkdir()
    Image.fromarray(deep).save(tmp_path / "c" / "t.png", transparency=1000)
    assert Image.open(tmp_path / "c" / "t.png").info.get("transparency") == 1000
    got = load_dataset(str(tmp_path / "c")).images[0, 0]
    expected = torch.tensor([[0, 32768 / 65535], [1, 1]]) * 2 - 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_folder_corrupt_image_named(tmp_path):
    _png(tmp_path / "f" / "a.png", _gray(1))
    bad = tmp_path / "f" / "b.png"
    bad.write_bytes(b"not a png at all")
    data_error(lambda: load_dataset(str(tmp_path / "f")), bad, "not a readable")
    good = _png(
        tmp_path / "g" / "big.png", np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)
    )
    blob = good.read_bytes()
    good.write_bytes(blob[: len(blob) // 2])
    data_error(lambda: load_dataset(str(tmp_path / "g")), good)


def test_folder_empty_and_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    data_error(lambda: load_dataset(str(tmp_path / "empty")), tmp_path / "empty", "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    (tmp_path / "docs" / "b.csv").write_text("y")
    data_error(lambda: load_dataset(str(tmp_path / "docs")), "no PNG/JPEG", "2 other file(s)")


def test_folder_loose_image_beside_classes(tmp_path):
    _png(tmp_path / "f" / "cls" / "a.png", _gray(1))
    loose = _png(tmp_path / "f" / "stray.png", _gray(1))
    data_error(lambda: load_dataset(str(tmp_path / "f")), loose, "class sub-folders")


def test_folder_missing_or_file(tmp_path):
    data_error(lambda: load_dataset(str(tmp_path / "nope")), tmp_path / "nope", "no such folder")
    f = tmp_path / "x.png"
    f.write_bytes(b"")
    data_error(lambda: load_dataset(str(f)), f, "not a folder")


# ============================================================================ bundled sets


def test_digits():
    train, test = load_dataset("digits"), load_dataset("digits", "test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    for ds in (train, test):
        assert ds.images.min() == -1 and ds.images.max() == 1 and ds.images.dtype == torch.float32
        assert set(ds.labels.tolist()) == set(range(10)) and ds.class_names[3] == "3"
    assert torch.equal(load_dataset("digits").images, train.images)  # deterministic


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k"), load_dataset("mnist5k", "test")


def test_mnist5k(mnist5k):
    train, test = mnist5k
    assert train.images.shape == (4500, 1, 28, 28) and test.images.shape == (500, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [450] * 10
    assert torch.bincount(test.labels).tolist() == [50] * 10
    assert train.labels[:20].tolist() == list(range(10)) * 2  # interleaved: subsets balanced
    assert train.images.min() == -1 and train.images.max() == 1
    rows = {bytes(x.numpy()) for x in train.images.flatten(1)}
    assert not any(bytes(x.numpy()) in rows for x in test.images.flatten(1))  # disjoint


def test_mnist5k_order_is_a_partition():
    y = np.repeat(np.arange(3), [10, 20, 30])
    tr, te = mnist5k_order(y, "train"), mnist5k_order(y, "test")
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(60))
    assert np.bincount(y[te]).tolist() == [1, 2, 3]


def test_named_set_resized_and_recolored():
    ds = load_dataset("digits", "test", image_size=16, channels=3)
    assert ds.images.shape == (360, 3, 16, 16)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])


def test_convert_channels_and_resize():
    x = torch.rand(2, 3, 5, 7) * 2 - 1
    g = convert_channels(x, 1)
    assert torch.allclose(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    assert convert_channels(g, 3).shape == (2, 3, 5, 7)
    assert resize_center_crop(x, 5).shape == (2, 3, 5, 5)
    assert torch.equal(resize_center_crop(x[..., :5], 5), x[..., :5])


# ============================================================================ API


def test_registry_and_bad_specs(tmp_path, monkeypatch):
    assert set(DATASETS) == {"digits", "mnist5k", "fashion-mnist", "mnist", "cifar10"}
    msg = data_error(lambda: load_dataset("imagenet"), "'imagenet'", "digits", "cifar10")
    assert "folder" in msg
    data_error(lambda: load_dataset("digits", "val"), "'val'", "train", "test")
    with pytest.raises(ConfigError, match="channels"):
        load_dataset("digits", channels=2)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "digits" / "a.png", _gray(1))
    assert load_dataset("digits").name == "digits" and len(load_dataset("digits")) == 1437
    assert len(load_dataset("./digits")) == 1


def test_subset_and_info():
    ds = load_dataset("digits", "test")
    first = ds.subset(10)
    assert len(first) == 10 and first.images.data_ptr() == ds.images.data_ptr()  # a view
    a = ds.subset(50, generator=torch.Generator().manual_seed(0))
    b = ds.subset(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    data_error(lambda: ds.subset(361), "361", "360")
    data_error(lambda: ds.subset(0))
    info = dataset_info(ds)
    json.dumps(info)
    assert info["num_images"] == 360 and info["image_shape"] == [1, 8, 8]
    assert sum(info["class_counts"].values()) == 360 and info["class_names"][0] == "0"
    x, y = ds[3]
    assert x.shape == (1, 8, 8) and y.dtype == torch.int64


def test_dataset_validates_fields():
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.int64), ["a"], "x")
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), ["a"], "x")
