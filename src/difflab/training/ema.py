"""Exponential moving average of weights (Polyak averaging), kept on the model's device.

θ_ema ← d·θ_ema + (1 − d)·θ with the warm-up d_k = min(d, (1 + k)/(10 + k)) so that short runs
are not dominated by the random initialisation (as in Tensorflow's ExponentialMovingAverage).

The copy's parameters are views of one flat buffer, in their own layouts (channels-last kernels
stay channels-last). A step whose weight is a device tensor (the GPU's sync-free guard) is then
one ``lerp_`` over that buffer and one concatenation of the model's parameters, where
``torch._foreach_lerp_`` with tensor weights falls back to one kernel per parameter (328 for the
DDPM-CIFAR-10 U-Net, each a host launch); per element the arithmetic is the same ``lerp``, so
both give the same bits.

What a step touches (the copy's parameters, the source's, the pairs of buffers, the source's
parameters as memory-order views) is looked up once and kept while the same tensors come in:
a step checks identities and data pointers instead of walking the modules again (on a GPU the
host's time per step bounds small models; benchmarks/RESULTS.md has the host times).
A parameter whose ``.data`` is replaced (``model.to(...)``, a new layout) has a new pointer and
is looked up again; a buffer is read from its module at each step (replaced ones are followed),
but one registered after the first step is not.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._flat = _flatten_parameters(self.model)  # None: not flattenable, per tensor
        self._slots = [(m, name) for m in self.model.modules() for name, t in
                       m._parameters.items() if t is not None]  # (module, name) per parameter
        self._plan: _Plan | None = None
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
        ema_p = [m._parameters[name] for m, name in self._slots]  # replaced ones too
        src_p = list(model.parameters()) if params is None else params
        plan = self._plan_for(model, ema_p, src_p)
        if weight is None:
            d = self.current_decay()
            torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        else:  # the warm-up from the device count of updates made: a skip does not advance it
            if made is None:
                raise ValueError("EMA.update: a device weight needs the device count `made`")
            k = made
            d = torch.clamp((1 + k) / (10 + k), max=self.decay) if self.warmup else self.decay
            w = (weight.to(torch.float64) * (1.0 - d)).to(ema_p[0].dtype)
            views = plan.flat_views(self, ema_p, src_p)
            if views is not None:
                self._flat.lerp_(torch.cat(views), w)
            else:
                torch._foreach_lerp_(ema_p, src_p, [w] * len(ema_p))
        for m_ema, m, name in plan.buffers:
            m_ema._buffers[name].copy_(m._buffers[name])
        self.num_updates += 1

    def _plan_for(self, model: nn.Module, ema_p: list[torch.Tensor],
                  src_p: list[torch.Tensor]) -> _Plan:
        """The kept lookups for a step from ``model`` with these parameters, made anew when
        another model or other parameter objects come in."""
        plan = self._plan
        if (plan is None or plan.model is not model or len(plan.src) != len(src_p)
                or len(plan.ema) != len(ema_p) or not all(map(operator.is_, plan.src, src_p))
                or not all(map(operator.is_, plan.ema, ema_p))):
            buffers = [(m_ema, m, name) for m_ema, m in zip(self.model.modules(), model.modules())
                       for name, b in m_ema._buffers.items()
                       if b is not None and m._buffers.get(name) is not None]
            plan = self._plan = _Plan(model, list(src_p), list(ema_p), buffers)
        return plan

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


@dataclass
class _Plan:
    """What :meth:`EMA.update` looked up for one source model (see the module's docstring)."""

    model: nn.Module
    src: list[torch.Tensor]  # the source's parameter objects (a step reads their current data)
    ema: list[torch.Tensor]  # the copy's
    buffers: list[tuple[nn.Module, nn.Module, str]]  # (copy's module, source's module, name)
    pointers: tuple[int, ...] | None = None  # the data pointers the flat check was made for
    views: list[torch.Tensor] | None = None  # the source in memory order; None: per tensor

    def flat_views(self, ema: EMA, ema_p: list[torch.Tensor],
                   src_p: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The source's parameters as memory-order views when the copy's flat buffer can take
        them in one ``lerp_`` (checked again whenever a data pointer moved), else None. The
        kept views hold their storage, so a moved parameter cannot reuse its old address."""
        pointers = tuple(map(torch.Tensor.data_ptr, ema_p)) + \
            tuple(map(torch.Tensor.data_ptr, src_p))
        if pointers != self.pointers:
            self.views = [_memory_order(p.detach()) for p in src_p] \
                if ema._flat_matches(ema_p, src_p) else None
            self.pointers = pointers
        return self.views


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
