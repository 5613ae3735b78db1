"""argparse value types that reject bad numbers with a one-line message; shared flags."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def seed_int(s: str) -> int:
    """A random seed: an integer in [0, 2**63) (what torch.Generator.manual_seed takes)."""
    v = nonneg_int(s)
    if v >= 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**63, got {s!r}")
    return v


MAX_IMAGE_SIZE = 4096


def image_size_int(s: str) -> int:
    """An image side in pixels, 1 … 4096."""
    v = positive_int(s)
    if v > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"expected an image size up to {MAX_IMAGE_SIZE}, "
                                         f"got {s!r}")
    return v


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def positive_float(s: str) -> float:
    v = finite_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


def nonneg_float(s: str) -> float:
    v = finite_float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


def unit_float(s: str) -> float:
    v = finite_float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {s!r}")
    return v


# Autocast of the U-Net while sampling (`sample`, `eval`): see benchmarks/RESULTS.md for the
# measured speed and FID in each precision.
DEFAULT_SAMPLE_PRECISION = "no"


def add_sample_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16", "auto"],
                   default=DEFAULT_SAMPLE_PRECISION,
                   help="autocast of the U-Net's forward passes while sampling (auto = bf16 on "
                        "GPUs and on CPUs with bf16 dot products); the sampler's update stays "
                        f"float32 (default {DEFAULT_SAMPLE_PRECISION})")


def add_channels_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", type=int, choices=[1, 3],
                   help="convert every image to 1 (gray) or 3 (RGB) channels (default: as the "
                        "files are; needed for folders mixing gray and color images)")


# ------------------------------------------------------------------------- output paths
# Checked when the command line is read, so that a long run never ends in an unwritable place
# or on a file name the image writer refuses.

def _writable(path: Path, kind: str) -> Path:
    if path.exists() and path.is_dir() != (kind == "folder"):
        raise argparse.ArgumentTypeError(
            f"{path} is {'a folder' if path.is_dir() else 'a file'}; expected a {kind}")
    probe = path if kind == "folder" else path.parent
    while not probe.exists():  # the nearest existing ancestor must take new files
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {path}: {probe} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(
            f"cannot write {path}: {e.strerror or e} in {probe}") from None
    return path


def out_folder(s: str) -> Path:
    """A folder to write into (created if missing)."""
    return _writable(Path(s), "folder")


def out_file(s: str) -> Path:
    """A file to write (its folders created if missing)."""
    return _writable(Path(s), "file")


def out_image(s: str) -> Path:
    """An image file whose extension the image writer knows (.png, .jpg, …)."""
    from PIL import Image

    path = Path(s)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; expected an image file name")
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        what = f"{path.suffix!r} is not an image format" if path.suffix else "no extension"
        raise argparse.ArgumentTypeError(f"{s}: {what}; use .png (or .jpg, .webp)")
    return _writable(path, "file")
