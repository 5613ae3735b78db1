"""A user's folder of PNG/JPEG images as an :class:`ImageDataset`.

Layouts (sorted file order, so loading is deterministic):

- ``folder/*.png`` -- one class, named after the folder; every label is 0.
- ``folder/<class>/**/*.png`` -- one class per sub-folder holding images (sorted names).
- ``folder/train/...`` and ``folder/test/...`` -- either layout inside each; class names are
  the union over both, so labels agree between splits. A folder without ``train/`` / ``test/``
  sub-folders has only a ``train`` split.

Files whose suffix is not .png/.jpg/.jpeg, and hidden files, are skipped and counted
(``ImageDataset.skipped_files``); an image file that cannot be decoded is an error naming it.

Pixels: with ``image_size`` every image is resized (shorter side, bicubic) and center-cropped to
``image_size x image_size``; without it all images must share one size. ``channels`` (1 or 3)
converts every image; without it the first image decides, and a file of the other kind
(grayscale vs color) is an error naming it. Transparent pixels are composited on white; 16-bit
grayscale is scaled to 8-bit range; JPEG EXIF orientation is applied.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from difflab.data.dataset import SPLITS, ImageDataset, scale_pixels_
from difflab.errors import DataError
from difflab.perf import memory_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}  # 16-bit PNG grayscale
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_EXIF_ORIENTATION = 0x0112
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, EOFError)


# ----------------------------------------------------------------------------- finding files


def _walk(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` (recursive, sorted) and the number of other files."""
    images, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                images.append(Path(dirpath) / name)
            else:
                skipped += 1
    return images, skipped


def _has_image(folder: Path) -> bool:
    for _, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not n.startswith(".") and n.lower().endswith(IMAGE_SUFFIXES) for n in filenames):
            return True
    return False


def _class_dirs(folder: Path) -> list[str]:
    """Sub-folders of ``folder`` that hold at least one image, sorted; [] for a flat folder."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [p.name for p in subdirs if _has_image(p)]


def _collect(folder: Path, class_names: list[str]) -> tuple[list[tuple[Path, int]], int]:
    """(path, label) pairs under ``folder`` for the given class layout, and the skip count."""
    if not class_names:  # flat: every image is class 0
        files, skipped = _walk(folder)
        return [(p, 0) for p in files], skipped
    items, skipped = [], 0
    present = set(_class_dirs(folder))
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and entry.name in present:
            continue
        if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
            if not entry.name.startswith("."):
                raise DataError(
                    f"{entry}: a loose image beside class sub-folders of {folder}; move it into "
                    "one of them"
                )
        skipped += _walk(entry)[1] if entry.is_dir() else 1
    for label, name in enumerate(class_names):
        if name in present:
            files, n = _walk(folder / name)
            items += [(p, label) for p in files]
            skipped += n
    return items, skipped


def scan_folder(folder: Path, split: str) -> tuple[list[tuple[Path, int]], list[str], int]:
    """(path, label) pairs, class names and the skipped-file count for one split."""
    if not folder.exists():
        raise DataError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file, not a folder of images")
    split_dirs = [folder / s for s in SPLITS if (folder / s).is_dir()]
    if split_dirs:
        source = folder / split
        if not source.is_dir():
            raise DataError(f"{folder}: has no '{split}' sub-folder for the {split} split")
        layouts = {d.name: _class_dirs(d) for d in split_dirs}
        if len({bool(v) for v in layouts.values()}) > 1:
            raise DataError(
                f"{folder}: one of train/ and test/ has class sub-folders and the other does not"
            )
        class_names = sorted({c for v in layouts.values() for c in v})
    else:
        if split != "train":
            raise DataError(
                f"{folder}: has no test split; put images in {folder}/train and "
                f"{folder}/test to make one"
            )
        source = folder
        class_names = _class_dirs(folder)
    items, skipped = _collect(source, class_names)
    if not items:
        if skipped:
            raise DataError(f"{source}: no PNG/JPEG images found ({skipped} other file(s) skipped)")
        raise DataError(f"{source}: folder is empty (no PNG/JPEG images)")
    return items, class_names or [folder.resolve().name], skipped


# ----------------------------------------------------------------------------- decoding


def _is_gray(mode: str) -> bool:
    return mode in _GRAY_MODES


def _kind(mode: str) -> str:
    return f"grayscale ({mode})" if _is_gray(mode) else f"color ({mode})"


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """((width, height) after EXIF orientation, mode), reading only the file header."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.format == "JPEG" and im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                w, h = h, w  # rotated by 90 degrees when decoded
            return (w, h), im.mode
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused, too many pixels ({e})") from None
    except _READ_ERRORS as e:
        raise DataError(f"{path}: not a readable PNG/JPEG image ({_one_line(e)})") from None


def _resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _decode(path: Path, channels: int, image_size: int | None) -> np.ndarray:
    """(C, H, W) float32 pixel values in [0, 255] for one file."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            if image_size is not None:  # decode at a reduced scale: much faster, same result
                im.draft("L" if channels == 1 else "RGB", (image_size, image_size))
            im = ImageOps.exif_transpose(im)
        if im.mode in _HIGH_BIT_MODES:  # not through RGBA: that would cut it to 8 bits
            scale = 255.0 / 65535.0 if im.mode.startswith("I") else 1.0
            raw = np.asarray(im)
            a = raw.astype(np.float32) * scale
            if isinstance(im.info.get("transparency"), int):  # tRNS: one transparent level
                a[raw == im.info["transparency"]] = 255.0  # → the white background
            im = Image.fromarray(a, mode="F")
        else:
            if im.mode in _ALPHA_MODES or "transparency" in im.info:
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
                                           rgba)
            im = im.convert("L" if channels == 1 else "RGB")
        if image_size is not None:
            im = _resize_center_crop(im, image_size)
        a = np.asarray(im, dtype=np.float32)
    if a.ndim == 2:
        a = a[None] if channels == 1 else np.repeat(a[None], 3, axis=0)  # (C, H, W)
    else:
        a = a.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return a


def load_folder(
    path: str | Path,
    split: str = "train",
    *,
    image_size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Read every PNG/JPEG image of one split of ``path`` (see the module doc for layouts)."""
    folder = Path(path).expanduser()
    items, class_names, skipped = scan_folder(folder, split)
    if skipped:
        log.warning("%s: skipped %d non-image file(s)", folder, skipped)

    # pass 1: headers only -- sizes and modes, so the output can be allocated once
    headers = [_header(p) for p, _ in items]
    first_path, ((w0, h0), mode0) = items[0][0], headers[0]
    if channels is None:
        for (p, _), (_, mode) in zip(items, headers):
            if _is_gray(mode) != _is_gray(mode0):
                raise DataError(
                    f"{p}: is {_kind(mode)} but {first_path.name} is {_kind(mode0)}; "
                    "--channels 1 or 3 (channels=1 or 3) converts every image"
                )
        channels = 1 if _is_gray(mode0) else 3
    if image_size is None:
        for (p, _), ((w, h), _) in zip(items, headers):
            if (w, h) != (w0, h0):
                raise DataError(
                    f"{p}: is {w}x{h} but {first_path.name} is {w0}x{h0}; --image-size N "
                    "(image_size=N) resizes and center-crops every image"
                )
    height, width = (h0, w0) if image_size is None else (image_size, image_size)
    need, have = len(items) * channels * height * width * 4, memory_bytes()
    if have is not None and need > have:
        raise DataError(
            f"{folder}: {len(items):,} images of {channels}x{height}x{width} need "
            f"{need / 2**30:.1f} GiB as float32, more than this machine's {have / 2**30:.1f} GiB; "
            "pass a smaller image_size"
        )

    # pass 2: decode straight into the one float tensor
    images = torch.empty((len(items), channels, height, width), dtype=torch.float32)
    out = images.numpy()
    for i, (p, _) in enumerate(items):
        try:
            a = _decode(p, channels, image_size)
        except Image.DecompressionBombError as e:
            raise DataError(f"{p}: refused, too many pixels ({e})") from None
        except _READ_ERRORS as e:
            raise DataError(f"{p}: corrupt image ({_one_line(e)})") from None
        if a.shape != out.shape[1:]:
            raise DataError(f"{p}: decoded to shape {a.shape}, expected {out.shape[1:]}")
        out[i] = a
    images.clamp_(0.0, 255.0)  # bicubic can overshoot on float (16-bit) images
    return ImageDataset(
        images=scale_pixels_(images),
        labels=torch.tensor([label for _, label in items], dtype=torch.int64),
        class_names=class_names,
        name=folder.resolve().name,
        split=split,
        skipped_files=skipped,
        path=str(folder.resolve()),
    )


def _one_line(e: BaseException) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:200]
