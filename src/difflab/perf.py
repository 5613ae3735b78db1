"""Process-wide settings and machine facts: faster eager CPU execution (applied by the CLI),
mixed precision, repeatable GPU kernels, a device's memory."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Let glibc reuse freed activation buffers instead of unmapping them.

    By default glibc serves large blocks with fresh ``mmap`` calls and unmaps them on free, so
    every new activation tensor of a U-Net forward page-faults its memory in again. Keeping
    blocks up to 32 MiB (glibc's maximum) in the heap and not trimming it makes CPU sampling
    ~10–20% faster (``benchmarks/unet_infer.py``); the peak memory is the same, it is only
    returned to the system later. Returns whether the settings were applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    return mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's feature flags from Linux's ``/proc/cpuinfo`` (or the given text), in their
    listed order; empty where they cannot be read."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return value.split()  # every core lists the same flags
    return []


def cpu_has_bf16_dot_products(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX): only there does bf16
    autocast pay on CPU (oneDNN emulates it elsewhere, slower than float32). Reads the Linux
    ``/proc/cpuinfo`` flags (or the given text); False where they cannot be read."""
    return bool(set(cpu_flags(cpuinfo)) & {"avx512_bf16", "amx_bf16"})


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """``"auto"`` → the fastest precision measured to train as well: bf16 autocast on a CUDA
    device with bf16 and on a CPU with bf16 dot products (benchmarks/RESULTS.md: 1.4× the steps
    per second there, and a better 20-minute FID), float32 (``"no"``) elsewhere. Any other value
    is returned as given, except that fp16 (a GPU precision) is float32 on a CPU."""
    import torch

    if requested == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return "bf16" if device_type == "cpu" and cpu_has_bf16_dot_products() else "no"
    if requested == "fp16" and device_type != "cuda":
        return "no"
    return requested


def autocast(device_type: str, precision: str) -> object:
    """The autocast context of a resolved precision (``"no"``, ``"bf16"``, ``"fp16"``, as
    :func:`resolve_mixed_precision` returns it): float32 ops stay float32 with ``"no"``."""
    import torch

    dtypes = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be one of no, bf16, fp16; got {precision!r}")
    return torch.autocast(device_type, dtype=dtypes[precision], enabled=precision != "no")


@contextlib.contextmanager
def deterministic_kernels(on: bool = True) -> Iterator[None]:
    """Bitwise-repeatable kernels inside the block (``TrainConfig.deterministic``), then the
    process's own settings back.

    CPU training is repeatable anyway. On a GPU, cuDNN's fastest backward convolutions and the
    atomic-add kernels (embedding and upsampling gradients, index_add) sum in an order that
    changes from run to run, so the same seed gives weights that differ in the last bits after
    one step and drift apart after many. This asks PyTorch for its deterministic variants
    (``torch.use_deterministic_algorithms``: an operation that has none raises a RuntimeError
    naming it rather than running unrepeatably; in warn-only mode PyTorch would even keep the
    non-deterministic memory-efficient attention backward), turns cuDNN's algorithm search off
    and sets cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG``) unless the environment
    already names one. Slower on a GPU.
    """
    import torch

    if not on:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:4]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def memory_bytes(device: object = "cpu") -> int | None:
    """Memory of ``device`` (a torch.device or its name): a GPU's total memory, or the
    machine's physical RAM for the CPU (None where the system does not say)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (CUDA's own error, or a CPU allocator's message)."""
    import torch

    msg = str(e)
    return isinstance(e, torch.OutOfMemoryError) or any(
        s in msg for s in ("not enough memory", "out of memory", "can't allocate memory"))
