"""Small tensor helpers shared by every scheduler (kept here once, never copied).

- :func:`append_dims` broadcasts a per-sample coefficient ``(B,)`` against ``(B, C, H, W)``.
- :func:`randn` draws Gaussian noise exactly as diffusers' ``randn_tensor`` does, so that a
  seeded ``torch.Generator`` gives the same numbers in both libraries.
- :func:`threshold_sample` is Imagen's dynamic thresholding of a predicted x̂₀.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generator = torch.Generator | Sequence[torch.Generator] | None


def append_dims(x: Tensor, target_ndim: int) -> Tensor:
    """Append trailing singleton dims to ``x`` until it has ``target_ndim`` dims.

    ``x: (B,)`` → ``(B, 1, 1, 1)`` for ``target_ndim=4``.
    """
    missing = target_ndim - x.ndim
    if missing < 0:
        raise ValueError(f"append_dims: input has {x.ndim} dims, more than target {target_ndim}")
    return x.reshape(*x.shape, *([1] * missing))


def randn(shape: Sequence[int], *, generator: Generator, device: torch.device | str,
          dtype: torch.dtype) -> Tensor:
    """Standard normal noise of ``shape`` on ``device``.

    A CPU generator draws on the CPU and the result is moved (so CPU-seeded runs are identical on
    every device); a list of generators draws one batch item from each (per-sample seeds).
    """
    device = torch.device(device)
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    draw_device = device
    if generator is not None:
        gen = generator if isinstance(generator, torch.Generator) else generator[0]
        if gen.device.type != device.type:
            if gen.device.type != "cpu":
                raise ValueError(f"cannot draw a {device} tensor from a {gen.device} generator")
            draw_device = torch.device("cpu")
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    parts = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype)
             for g in generator]
    return torch.cat(parts).to(device)


def threshold_sample(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", §2.3).

    Per sample, s = the ``ratio`` quantile of |x̂₀|, clamped to [1, max_value]; x̂₀ is clipped to
    [−s, s] and divided by s. With s clamped at 1 this is plain clipping to [−1, 1].
    ``x0: (B, ...)``.
    """
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)  # (B, D)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32+
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)[:, None]  # (B, 1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(x0.shape).to(dtype)
