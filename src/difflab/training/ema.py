"""Exponential moving average of weights (Polyak averaging), kept on the model's device.

θ_ema ← d·θ_ema + (1 − d)·θ with the warm-up d_k = min(d, (1 + k)/(10 + k)) so that short runs
are not dominated by the random initialisation (as in Tensorflow's ExponentialMovingAverage).

The copy's parameters are views of one flat buffer, in their own layouts (channels-last kernels
stay channels-last). A step whose weight is a device tensor (the GPU's sync-free guard) is then
one ``lerp_`` over that buffer and one concatenation of the model's parameters, where
``torch._foreach_lerp_`` with tensor weights falls back to one kernel per parameter (328 for the
DDPM-CIFAR-10 U-Net, each a host launch); per element the arithmetic is the same ``lerp``, so
both give the same bits.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._flat = _flatten_parameters(self.model)  # None: not flattenable, per tensor
        self.num_updates = 0  # the steps taken (with ``weight``: read back by the caller)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        k = self.num_updates
        return min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def update(self, model: nn.Module, weight: torch.Tensor | None = None,
               params: list[torch.Tensor] | None = None,
               made: torch.Tensor | None = None) -> None:
        """One EMA step; ``weight`` (a 0/1 device tensor) turns it off without a host sync, and
        ``made`` (needed with it: the caller's float64 device count of the updates made before
        this one, so that a skipped step does not advance the warm-up and the decay rounds as
        the host's does) stands in for :attr:`num_updates`; ``params`` (the model's parameters
        in order) stands in for ``model.parameters()``, e.g. float32 masters where the module
        holds bf16 copies (difflab.training.precision)."""
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in (model.parameters() if params is None else params)]
        if weight is None:
            d = self.current_decay()
            torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        else:  # the warm-up from the device count of updates made: a skip does not advance it
            if made is None:
                raise ValueError("EMA.update: a device weight needs the device count `made`")
            k = made
            d = torch.clamp((1 + k) / (10 + k), max=self.decay) if self.warmup else self.decay
            w = (weight.to(torch.float64) * (1.0 - d)).to(ema_p[0].dtype)
            if self._flat_matches(ema_p, src_p):
                self._flat.lerp_(torch.cat([_memory_order(p) for p in src_p]), w)
            else:
                torch._foreach_lerp_(ema_p, src_p, [w] * len(ema_p))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def _flat_matches(self, ema_p: list[torch.Tensor], src_p: list[torch.Tensor]) -> bool:
        """Whether the flat buffer still holds the copy's parameters and ``src_p`` lies in
        memory as they do (same shapes, strides and dtype), element for element."""
        if self._flat is None or len(ema_p) != len(src_p):
            return False
        base = self._flat.untyped_storage().data_ptr()
        return all(e.untyped_storage().data_ptr() == base and s.dtype == e.dtype
                   and s.shape == e.shape and s.stride() == e.stride()
                   for e, s in zip(ema_p, src_p))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


def _dense(t: torch.Tensor) -> bool:
    """No gaps, no overlaps, in the two layouts difflab uses."""
    return t.is_contiguous() or (t.dim() == 4
                                 and t.is_contiguous(memory_format=torch.channels_last))


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a 1-D view, in memory order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _flatten_parameters(model: nn.Module) -> torch.Tensor | None:
    """Make ``model``'s parameters views of one new flat buffer (same values, shapes, strides)
    and return it; None (nothing changed) unless they are dense and share dtype and device."""
    params = list(model.parameters())
    if not params or any(not _dense(p) or p.dtype != params[0].dtype
                         or p.device != params[0].device for p in params):
        return None
    flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                       device=params[0].device)
    offset = 0
    with torch.no_grad():
        for p in params:
            view = flat.as_strided(p.shape, p.stride(), offset)
            view.copy_(p)
            p.data = view
            offset += p.numel()
    return flat
