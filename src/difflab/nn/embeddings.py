"""Timestep embeddings (Vaswani et al. 2017 sinusoids, as used by DDPM, Ho et al. 2020 §B)."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    t: (B,) → (B, dim). Frequencies ω_k = max_period^(−k/(half − freq_shift)), k = 0..half−1;
    the embedding is [sin(t·ω), cos(t·ω)] (or [cos, sin] when ``flip_sin_to_cos``), the
    convention of diffusers' ``get_timestep_embedding`` so that SD weights see what they expect.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP lifting the sinusoidal embedding to the embedding width: linear → SiLU → linear."""

    def __init__(self, in_dim: int, emb_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, emb_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
