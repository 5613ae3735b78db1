"""Shared U-Net building blocks: residual block, self-attention, down/up-sampling.

Module and parameter names follow diffusers' (``norm1``, ``conv1``, ``time_emb_proj``,
``to_q``/``to_k``/``to_v``/``to_out.0``, ``downsamplers.0.conv`` ...) so that foreign weights
map onto difflab modules by name (see ``difflab.interop``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → dropout → conv, + skip.

    x: (B, C_in, H, W), temb: (B, E) or None → (B, C_out, H, W). Ho et al. 2020, App. B.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None,
                 *, groups: int = 32, dropout: float = 0.0, eps: float = 1e-5,
                 output_scale_factor: float = 1.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_channels), in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(min(groups, out_channels), out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class SelfAttention(nn.Module):
    """Spatial self-attention with a residual: GroupNorm → multi-head SDPA over the H·W tokens.

    x: (B, C, H, W) → (B, C, H, W). Uses ``F.scaled_dot_product_attention`` (fused kernels).
    """

    def __init__(self, channels: int, *, head_dim: int | None = None, groups: int = 32,
                 eps: float = 1e-5, rescale_output_factor: float = 1.0) -> None:
        super().__init__()
        head_dim = head_dim or channels
        if channels % head_dim:
            raise ValueError(f"attention: channels {channels} not divisible by head_dim {head_dim}")
        self.heads = channels // head_dim
        self.group_norm = nn.GroupNorm(min(groups, channels), channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))  # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, HW, C)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return (out + x) / self.rescale_output_factor


class Downsample(nn.Module):
    """Stride-2 3×3 convolution: (B, C, H, W) → (B, C, H/2, W/2)."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:  # SD's VAE pads right/bottom only
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 then 3×3 conv: (B, C, H, W) → (B, C, 2H, 2W) (or to ``size``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
