"""IDX files, the MNIST / Fashion-MNIST format: a validating reader and a writer.

Layout (LeCun et al., http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")::

    bytes 0-1   0x00 0x00
    byte  2     data type: 0x08 = unsigned byte (the only one these data sets use)
    byte  3     number of dimensions d
    4 * d       the size of each dimension, big-endian uint32
    ...         prod(sizes) values, row-major

Images are magic ``0x00000803`` ``(N, rows, cols)``; labels ``0x00000801`` ``(N,)``. Files may
be gzip-compressed (detected by content, not by name). Every header field is checked before
anything is allocated: a corrupt header claiming 10^12 images is an error, not a MemoryError.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from difflab.errors import DataError

IDX_UBYTE = 0x08
IMAGES_NDIM = 3  # magic 0x00000803
LABELS_NDIM = 1  # magic 0x00000801
MAX_NDIM = 8
# 16 GiB: the largest real IDX file (MNIST/Fashion train images) is 47 MB; anything claiming
# more than this is a corrupt header, refused before a byte is allocated.
MAX_IDX_BYTES = 1 << 34
_CHUNK = 1 << 20  # gzip is inflated 1 MiB at a time: memory tracks real data, peak ~1.1x
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or gzip) into a uint8 array of the declared shape.

    ndim: the expected number of dimensions (3 for images, 1 for labels), or None for any.
    Raises DataError naming the file for a missing file, a wrong magic number, an absurd or
    truncated header, a truncated body or trailing bytes.
    """
    path = Path(path)
    try:
        with path.open("rb") as raw:
            gz = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if gz:
                with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                    return _read_stream(f, path, ndim, size=None)
            return _read_stream(raw, path, ndim, size=path.stat().st_size)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an IDX file") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({_one_line(e)})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({_one_line(e)})") from None


def read_idx_images(path: str | Path) -> np.ndarray:
    """(N, rows, cols) uint8 from an IDX image file (magic 0x00000803)."""
    return read_idx(path, ndim=IMAGES_NDIM)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """(N,) uint8 from an IDX label file (magic 0x00000801)."""
    return read_idx(path, ndim=LABELS_NDIM)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file; gzip-compressed when the name ends in ``.gz``."""
    a = np.ascontiguousarray(array)
    if a.dtype != np.uint8:
        raise ValueError(f"write_idx writes uint8 arrays, got {a.dtype}")
    if not 1 <= a.ndim <= MAX_NDIM:
        raise ValueError(f"write_idx writes 1 to {MAX_NDIM} dimensions, got {a.ndim}")
    header = bytes([0, 0, IDX_UBYTE, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(header)
            f.write(a.tobytes())
    else:
        with path.open("wb") as f:
            f.write(header)
            f.write(a.tobytes())
    return path


# ----------------------------------------------------------------------------- internals


def _read_stream(f, path: Path, ndim: int | None, size: int | None) -> np.ndarray:
    """Parse the header, check it against ``size`` (raw files) and read the body."""
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(head)} of at least 8 bytes)")
    magic = int.from_bytes(head, "big")
    if head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: bad magic number 0x{magic:08X}; not an IDX file")
    if ndim is not None and (head[2], head[3]) != (IDX_UBYTE, ndim):
        what = "images" if ndim == IMAGES_NDIM else "labels" if ndim == LABELS_NDIM else "data"
        expected = (IDX_UBYTE << 8) | ndim
        raise DataError(
            f"{path}: wrong magic number 0x{magic:08X}; expected 0x{expected:08X} (IDX {what})"
        )
    if head[2] != IDX_UBYTE:
        raise DataError(
            f"{path}: unsupported IDX data type 0x{head[2]:02X}; "
            "only unsigned bytes (0x08) are read"
        )
    d = head[3]
    if not 1 <= d <= MAX_NDIM:
        raise DataError(f"{path}: IDX header declares {d} dimensions; expected 1 to {MAX_NDIM}")
    dims_raw = f.read(4 * d)
    if len(dims_raw) < 4 * d:
        raise DataError(f"{path}: truncated IDX header ({4 + len(dims_raw)} of {4 + 4 * d} bytes)")
    dims = struct.unpack(f">{d}I", dims_raw)
    shape = "x".join(str(n) for n in dims)
    if 0 in dims:
        raise DataError(f"{path}: IDX header declares an empty shape {shape}")
    total = math.prod(dims)
    if total > MAX_IDX_BYTES:
        raise DataError(
            f"{path}: IDX header declares shape {shape} ({total:,} bytes), over the "
            f"{MAX_IDX_BYTES:,}-byte limit; the header is corrupt"
        )
    header_len = 4 + 4 * d
    if size is not None:  # raw file: its length is known before reading a byte of it
        if size - header_len < total:
            raise DataError(
                f"{path}: truncated: header declares shape {shape} ({total:,} bytes of data) "
                f"but the file holds {size - header_len:,}"
            )
        if size - header_len > total:
            raise DataError(
                f"{path}: {size - header_len - total:,} unexpected bytes after the "
                f"{shape} data declared by the header"
            )
    if size is not None:
        buf = bytearray(total)  # the length was checked against the file above
        if f.readinto(buf) != total:
            raise DataError(f"{path}: file changed size while being read")
        return np.frombuffer(buf, dtype=np.uint8).reshape(dims)
    buf = bytearray()
    while len(buf) < total:  # a gzip stream's length is unknown: grow only as data arrives
        chunk = f.read(min(_CHUNK, total - len(buf)))
        if not chunk:
            raise DataError(
                f"{path}: truncated: header declares shape {shape} ({total:,} bytes of data) "
                f"but the file holds {len(buf):,}"
            )
        buf += chunk
    if f.read(1):
        raise DataError(f"{path}: unexpected bytes after the {shape} data declared by the header")
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]
