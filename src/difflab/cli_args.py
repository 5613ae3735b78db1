"""argparse value types that reject bad numbers with a one-line message; shared flags."""

from __future__ import annotations

import argparse
import math


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
