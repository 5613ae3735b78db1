"""Exponential moving average of weights (Polyak averaging), kept on the model's device.

θ_ema ← d·θ_ema + (1 − d)·θ with the warm-up d_k = min(d, (1 + k)/(10 + k)) so that short runs
are not dominated by the random initialisation (as in Tensorflow's ExponentialMovingAverage).
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
        self.num_updates = 0  # the steps taken (with ``weight``: read back by the caller)
        # with ``weight``: the updates made, counted on the device (a skipped step does not
        # advance the warm-up), float64 so that the decay rounds as the host's does
        self._made: torch.Tensor | None = None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        k = self.num_updates
        return min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def update(self, model: nn.Module, weight: torch.Tensor | None = None,
               params: list[torch.Tensor] | None = None) -> None:
        """One EMA step; ``weight`` (a 0/1 device tensor) turns it off without a host sync;
        ``params`` (the model's parameters in order) stands in for ``model.parameters()``, e.g.
        float32 masters where the module holds bf16 copies (difflab.training.precision)."""
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in (model.parameters() if params is None else params)]
        if weight is None:
            d = self.current_decay()
            torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
            self._made = None  # (the host count is the truth again)
        else:  # the warm-up from the device count of updates made: a skip does not advance it
            if self._made is None:
                self._made = torch.tensor(float(self.num_updates), dtype=torch.float64,
                                          device=weight.device)
            k = self._made
            d = torch.clamp((1 + k) / (10 + k), max=self.decay) if self.warmup else self.decay
            w = (weight.to(torch.float64) * (1.0 - d)).to(ema_p[0].dtype)
            torch._foreach_lerp_(ema_p, src_p, [w] * len(ema_p))
            self._made += weight.to(torch.float64)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()
