"""Shared helpers of the benchmark scripts: timing, machine ceilings, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: torch.device, *, iters: int,
            warmup: int = 2) -> float:
    """Seconds per call of ``fn`` (after ``warmup`` calls), timed with the device synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured dense matmul rate in FLOP/s: the machine's practical ceiling.

    On CPU the same n×n×n product is also timed as a 1×1 convolution, which PyTorch hands to
    oneDNN rather than to BLAS; the faster of the two counts (on AMD CPUs MKL's sgemm reaches
    only about half of what oneDNN does, so the BLAS rate alone would understate the ceiling).
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    iters = 20 if device.type == "cuda" else 10
    sec = time_fn(lambda: a @ b, device, iters=iters)
    if device.type == "cpu":
        x = a[None, :, :, None].contiguous(memory_format=torch.channels_last)  # (1, n, n, 1)
        w = b[:, :, None, None].contiguous()
        sec = min(sec, time_fn(lambda: torch.nn.functional.conv2d(x, w), device, iters=iters))
    return 2 * n ** 3 / sec


def machine() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_json(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, object]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)
