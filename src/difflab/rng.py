"""Per-row random draws that do not depend on how a global batch is split across processes.

Data-parallel training (``accelerate launch``, ``torchrun``) splits a global batch of B rows
into P slices of B/P, one per process, and averages the gradients. That update equals the
single-process update on the same B rows only if every row sees the same noise, timestep,
label drop, … as it would in one process. So the training loop gives the objective a
:class:`ShardedGenerator`: seeded *identically* on every process, it knows which rows of the
global batch this process computes. :func:`batch_randn` & co. draw for the whole global batch
and keep this process's rows; every process advances its generator by the same amount, so they
stay in lock-step. With a plain ``torch.Generator`` (or a sharded one in a single process) they
are exactly ``torch.randn`` & co., so one-process runs keep their numbers.

The leading dimension of ``shape`` is always the batch-row dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class BatchShard(NamedTuple):
    """Rows ``[start, stop)`` of a global batch of ``size`` rows (this process's slice)."""

    start: int
    stop: int
    size: int


class ShardedGenerator(torch.Generator):
    """A ``torch.Generator`` that also carries the :class:`BatchShard` of this process.

    ``shard=None`` means "this process computes the whole batch" (one process).
    """

    def __new__(cls, device: str | torch.device = "cpu", shard: BatchShard | None = None):
        return super().__new__(cls, device)

    def __init__(self, device: str | torch.device = "cpu", shard: BatchShard | None = None):
        self.shard = shard


def _global_rows(shape: Sequence[int], generator: torch.Generator | None
                 ) -> tuple[tuple[int, ...], slice | None]:
    """(shape to draw, rows to keep) for a per-row draw of ``shape`` from ``generator``."""
    shape = tuple(int(s) for s in shape)
    shard = getattr(generator, "shard", None)
    if shard is None:
        return shape, None
    if not shape or shape[0] != shard.stop - shard.start:
        raise ValueError(f"per-row draw of shape {shape} on a process that holds rows "
                         f"{shard.start}:{shard.stop} of a global batch of {shard.size}")
    return (shard.size, *shape[1:]), slice(shard.start, shard.stop)


def batch_randn(shape: Sequence[int], generator: torch.Generator | None, *,
                device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
    """ε ~ N(0, I) of ``shape`` (B, ...): this process's rows of the global batch's draw."""
    full, rows = _global_rows(shape, generator)
    x = torch.randn(full, generator=generator, device=device, dtype=dtype)
    return x if rows is None else x[rows]


def batch_rand(shape: Sequence[int], generator: torch.Generator | None, *,
               device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
    """u ~ U[0, 1) of ``shape`` (B, ...): this process's rows of the global batch's draw."""
    full, rows = _global_rows(shape, generator)
    x = torch.rand(full, generator=generator, device=device, dtype=dtype)
    return x if rows is None else x[rows]


def batch_randint(low: int, high: int, shape: Sequence[int],
                  generator: torch.Generator | None, *,
                  device: torch.device | str | None = None) -> Tensor:
    """Integers uniform in [low, high) of ``shape`` (B, ...): this process's rows."""
    full, rows = _global_rows(shape, generator)
    x = torch.randint(low, high, full, generator=generator, device=device)
    return x if rows is None else x[rows]
