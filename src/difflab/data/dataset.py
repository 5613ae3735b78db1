"""The in-memory image data set every difflab model trains on, and the tensor-level transforms.

Conventions (all loaders follow them):

- ``images``: ``(N, C, H, W)`` float32 in ``[-1, 1]`` (pixel ``p`` in 0..255 maps to
  ``p / 127.5 - 1``), contiguous, one copy: loaders fill a preallocated float tensor straight
  from the decoded bytes and keep no uint8/numpy duplicate alive.
- ``labels``: ``(N,)`` int64 in ``[0, num_classes)``. A data set without labels (a plain folder
  of images) has exactly one class and every label is ``0``; there is no ``-1`` sentinel, so
  labels can always index an embedding table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from difflab.errors import ConfigError, DataError

SPLITS = ("train", "test")

# ITU-R BT.601 luma, the weights PIL's convert("L") uses; they sum to 1, so the same weights
# apply to pixels scaled to [-1, 1].
_LUMA = (0.299, 0.587, 0.114)


@dataclass(eq=False)
class ImageDataset:
    """Images and integer labels held in memory.

    images: (N, C, H, W) float32 in [-1, 1].
    labels: (N,) int64 in [0, num_classes); unlabeled sets have one class and label 0.
    """

    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64, class index into class_names
    class_names: list[str]  # one name per class; a plain folder has one, named after it
    name: str  # the spec it came from ("mnist5k") or the folder's name
    split: str = "train"  # "train" or "test"
    skipped_files: int = 0  # non-image files ignored while reading a folder
    path: str = ""  # a folder's absolute path (what a model's data.json records to reload it)

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if x.ndim != 4 or x.dtype != torch.float32:
            raise ValueError(f"images must be (N, C, H, W) float32, got {tuple(x.shape)} {x.dtype}")
        if y.ndim != 1 or y.dtype != torch.int64 or len(y) != len(x):
            raise ValueError(f"labels must be ({len(x)},) int64, got {tuple(y.shape)} {y.dtype}")
        if not self.class_names:
            raise ValueError("class_names must name at least one class")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One (image (C, H, W), label ()) pair."""
        return self.images[i], self.labels[i]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        _, c, h, w = self.images.shape
        return (c, h, w)

    def subset(self, n: int, generator: torch.Generator | None = None) -> ImageDataset:
        """The first ``n`` images (a view, no copy), or ``n`` drawn without replacement."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self):
            raise DataError(f"{self.name}: cannot take a subset of {n!r} images from {len(self)}")
        if generator is None:
            images, labels = self.images[:n], self.labels[:n]
        else:
            idx = torch.randperm(len(self), generator=generator)[:n]
            images, labels = self.images[idx], self.labels[idx]
        return dataclasses.replace(self, images=images, labels=labels)


def dataset_record(ds: ImageDataset) -> dict[str, Any]:
    """What a trained model's ``data.json`` records of its data, so that evaluation, the app
    and the benchmarks can reload it (:func:`recorded_spec`): name, classes, image shape, and
    for an image folder its absolute path (its bare name is no data set)."""
    path = getattr(ds, "path", "")
    return {"name": ds.name, "class_names": list(ds.class_names),
            "image_shape": list(ds.image_shape), **({"path": path} if path else {})}


def recorded_spec(record: dict[str, Any]) -> str | None:
    """The ``load_dataset`` spec of a :func:`dataset_record`: the folder's path, else the name."""
    return record.get("path") or record.get("name")


def dataset_info(ds: ImageDataset) -> dict:
    """A JSON-ready summary for ``difflab data info``: counts per class, shape, range."""
    counts = torch.bincount(ds.labels, minlength=ds.num_classes).tolist()
    x = ds.images
    return {
        "name": ds.name,
        "split": ds.split,
        "num_images": len(ds),
        "image_shape": list(ds.image_shape),
        "num_classes": ds.num_classes,
        "class_names": list(ds.class_names),
        "class_counts": dict(zip(ds.class_names, counts)),
        "min": float(x.min()) if len(ds) else None,
        "max": float(x.max()) if len(ds) else None,
        "mean": float(x.mean(dtype=torch.float64)) if len(ds) else None,
        "skipped_files": ds.skipped_files,
    }


# ----------------------------------------------------------------------------- conversions


def scale_pixels_(out: torch.Tensor) -> torch.Tensor:
    """Map float pixel values 0..255 held in ``out`` to [-1, 1] (p / 127.5 - 1), in place."""
    return out.div_(127.5).sub_(1.0)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1]: the one float copy a loader keeps."""
    return scale_pixels_(pixels.to(torch.float32))


def check_image_args(image_size: int | None, channels: int | None) -> None:
    """ConfigError unless image_size is None or a positive int and channels is None, 1 or 3."""
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size
    ):
        raise ConfigError(f"image_size={image_size!r} must be a positive integer or None")
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ConfigError(f"channels={channels!r} is not allowed; choose one of [1, 3] or None")


def resize_center_crop(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize the shorter side to ``size`` and center-crop to ``size x size``.

    images: (N, C, H, W) -> (N, C, size, size). Antialiased bilinear (a non-negative kernel, so
    no overshoot past [-1, 1]); processed in chunks so the peak is one output plus one chunk.
    """
    n, c, h, w = images.shape
    if h == w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = torch.empty((n, c, size, size), dtype=images.dtype)
    for i in range(0, n, chunk):
        x = images[i : i + chunk]
        if (nh, nw) != (h, w):
            x = F.interpolate(x, (nh, nw), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = x[..., top : top + size, left : left + size]
    return out.clamp_(-1.0, 1.0)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) with C in {1, 3} -> (N, channels, H, W): gray repeated, or RGB -> luma."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if c == 3 and channels == 1:
        luma = torch.tensor(_LUMA, dtype=images.dtype)
        return torch.einsum("nchw,c->nhw", images, luma).unsqueeze(1)  # (N, 1, H, W)
    raise ConfigError(f"cannot convert {c}-channel images to channels={channels}")


def conform(ds: ImageDataset, image_size: int | None, channels: int | None) -> ImageDataset:
    """Apply the user's ``image_size`` / ``channels`` to a loaded data set (no-op when None)."""
    images = ds.images
    if channels is not None:
        images = convert_channels(images, channels)
    if image_size is not None:
        images = resize_center_crop(images, image_size)
    if images is ds.images:
        return ds
    return dataclasses.replace(ds, images=images)
