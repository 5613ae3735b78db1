"""bf16 weight copies kept between steps, float32 masters in the optimizer.

Under bf16 autocast every training step casts each float32 convolution and linear weight (and
bias) to bf16 in the forward, and each bf16 gradient back to float32 in the backward: in the
compiled DDPM-CIFAR-10 step that is ≈ 370 tiny kernels, a few µs each on a GPU
(benchmarks/RESULTS.md, "Eleventh session"). :class:`BF16Weights` instead keeps those weights in
bf16 inside the module — autocast passes bf16 tensors through — while the optimizer, the
gradient clipping, the non-finite guard, the EMA and the checkpoints work on float32 masters.
Two multi-tensor copies per step move the gradients up and the updated weights down. The
rounding is the same both ways as autocast's casts (round to nearest even), so training is the
same, bit for bit (``tests/test_training_options.py``).

Parameters of :class:`difflab.nn.Upsample` stay float32: its folded kernel sums taps of the
float32 weight before autocast rounds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_LOW = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


class BF16Weights:
    def __init__(self, module: nn.Module) -> None:
        from difflab.nn import Upsample

        keep = {id(p) for m in module.modules() if isinstance(m, Upsample)
                for p in m.parameters()}
        self.module = module
        found = [p for m in module.modules() if isinstance(m, _LOW)
                 for p in m.parameters(recurse=False)
                 if p.requires_grad and p.dtype == torch.float32 and id(p) not in keep]
        self.params = list({id(p): p for p in found}.values())  # a shared weight once
        with torch.no_grad():
            self.masters = [nn.Parameter(p.detach().clone()) for p in self.params]
            self.low16 = [p.data.to(torch.bfloat16) for p in self.params]  # strides kept
            for p, w in zip(self.params, self.low16):
                p.data = w
        by_id = dict(zip((id(p) for p in self.params), self.masters))
        # the module's parameters in their order, masters in place of the bf16 ones: what the
        # optimizer, the clipping and the EMA see (an optimizer state saved with or without
        # bf16 weights loads into the other)
        self.float_params = [by_id.get(id(p), p) for p in module.parameters()]

    @torch.no_grad()
    def grads_up(self) -> None:
        """The bf16 gradients into the masters' float32 ``.grad`` (one multi-tensor copy); the
        module's bf16 gradients are cleared for the next step."""
        pairs = [(m, p.grad) for m, p in zip(self.masters, self.params) if p.grad is not None]
        for m, _ in pairs:
            if m.grad is None:
                m.grad = torch.empty_like(m)
        if pairs:
            torch._foreach_copy_([m.grad for m, _ in pairs], [g for _, g in pairs])
        for m, p in zip(self.masters, self.params):
            if p.grad is None:
                m.grad = None
            p.grad = None

    @torch.no_grad()
    def weights_down(self) -> None:
        """The masters, rounded to bf16, into the module (one multi-tensor copy)."""
        torch._foreach_copy_(self.low16, self.masters)

    @contextmanager
    def masters_in(self) -> Iterator[nn.Module]:
        """The module with its float32 masters in place of the bf16 weights (to save, load or
        sample from it); the bf16 weights, the same storage, are back afterwards."""
        self.restore()
        try:
            yield self.module
        finally:
            for p, w in zip(self.params, self.low16):
                p.data = w

    def restore(self) -> None:
        """Leave the module float32 for good (the masters' values), at the end of training."""
        for p, m in zip(self.params, self.masters):
            p.data = m.data
