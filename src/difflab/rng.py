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

A loss that compares the rows of a batch with each other (CLIP's InfoNCE) also needs the other
processes' rows: :func:`batch_gather` all-gathers them, with gradients flowing back to the
process that computed each row.

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


# --------------------------------------------------------------------------------------------
# Whole-batch quantities: a loss that compares rows with each other (CLIP's InfoNCE) needs the
# other processes' rows too, not only draws.
# --------------------------------------------------------------------------------------------

def batch_shard(generator: torch.Generator | None) -> BatchShard | None:
    """This process's rows of the global batch, or None when it computes the whole batch."""
    return getattr(generator, "shard", None)


def batch_gather(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """x (b, ...) — this process's rows — → (B, ...), the rows of the whole global batch in
    global order; x itself in one process.

    Differentiable: the backward pass sums, for each row, the gradients that *every* process's
    loss sends to it (an all-reduce) and keeps this process's rows. So if process r's loss L_r
    is the global loss's terms of its own rows (L = mean_r L_r), DDP's mean of the gradients
    is ∇L.
    """
    shard = batch_shard(generator)
    if shard is None:
        return x
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"rows {shard.start}:{shard.stop} of a global batch of {shard.size} "
                           "but no torch.distributed process group to gather the others from")
    if len(x) != shard.stop - shard.start or shard.start != dist.get_rank() * len(x) or \
            shard.size != dist.get_world_size() * len(x):
        raise ValueError(f"gathering {len(x)} rows on process {dist.get_rank()} of "
                         f"{dist.get_world_size()}, which holds rows {shard.start}:{shard.stop} "
                         f"of a global batch of {shard.size}")
    return _GatherRows.apply(x, shard)


class _GatherRows(torch.autograd.Function):
    """all-gather forward; backward: all-reduce (sum) of the (B, ...) gradient, own rows kept."""

    @staticmethod
    def forward(ctx, x: Tensor, shard: BatchShard) -> Tensor:
        import torch.distributed as dist

        ctx.shard = shard
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format)
                 for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # Σ over processes of ∂L_r/∂(every row)
        return grad[ctx.shard.start:ctx.shard.stop], None
