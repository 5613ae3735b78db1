"""The spatial transformer of latent diffusion: image tokens attend to themselves and to text.

Rombach et al. 2022 (LDM), §3.3: the U-Net's feature map h (B, C, H, W) is read as H·W tokens
and passed through transformer blocks (Vaswani et al. 2017) whose *cross*-attention takes its
keys and values from the text encoder's output τ_θ(y) (B, M, D):

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V,  Q = W_Q·φ(h),  K = W_K·τ_θ(y),  V = W_V·τ_θ(y)

    Transformer2D:  h → GroupNorm → proj_in → [BasicTransformerBlock] × n → proj_out → + h
    block:          x = x + attn1(LN(x))            self-attention over the H·W tokens
                    x = x + attn2(LN(x), context)   cross-attention to the text tokens
                    x = x + ff(LN(x))               GEGLU feed-forward (Shazeer 2020), 4× wide

Module and parameter names are diffusers' (``norm``, ``proj_in``,
``transformer_blocks.{i}.{norm1,attn1,norm2,attn2,norm3,ff.net.0.proj,ff.net.2}``, ``proj_out``;
``to_q``/``to_k``/``to_v``/``to_out.0``), which are also the original LDM names.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nn.blocks import attention
from difflab.nn.fused import group_norm_silu


class Attention(nn.Module):
    """Multi-head attention of x (B, N, C) over ``context`` (B, M, D), or over x itself.

    Q, K, V projections have no bias (as LDM); the output projection has one. With ``upcast``
    the attention itself runs in float32 (SD 2.1's fp16 overflow fix).
    """

    def __init__(self, query_dim: int, *, heads: int, head_dim: int,
                 context_dim: int | None = None, dropout: float = 0.0,
                 upcast: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, M, d)
        v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, M, d)
        if self.upcast:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = attention(q, k, v)  # softmax(QKᵀ/√d) V: (B, heads, N, d)
        out = out.transpose(1, 2).flatten(2)  # (B, N, heads·d)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """GEGLU(x) = (x W + b) ⊙ GELU(x V + c) (Shazeer 2020, eq. 5); W and V are one ``proj``."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4·dim, dropout, linear back: ``net.0.proj``, ``net.2`` (diffusers' names)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(dropout),
                                  nn.Linear(mult * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention, feed-forward, each residual.

    x: (B, N, C), context: (B, M, D) → (B, N, C).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, *,
                 dropout: float = 0.0, upcast: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, dropout=dropout,
                               upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim,
                               dropout=dropout, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """h (B, C, H, W), context (B, M, D) → (B, C, H, W): the LDM "SpatialTransformer".

    ``proj_in``/``proj_out`` are 1×1 convolutions (SD 1.x) or, with ``use_linear_projection``,
    linear maps on the tokens (SD 2.x) — the same map, stored with a different weight shape.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, *, num_layers: int = 1,
                 groups: int = 32, use_linear_projection: bool = False, dropout: float = 0.0,
                 upcast: bool = False) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"Transformer2D: {channels} channels not divisible by {heads} heads")
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if use_linear_projection else _conv1x1
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim,
                                  dropout=dropout, upcast=upcast)
            for _ in range(num_layers))
        self.proj_out = proj(channels, channels)

    def forward(self, h: Tensor, context: Tensor) -> Tensor:
        b, c, height, width = h.shape
        x = group_norm_silu(self.norm, h, silu=False)
        if not self.use_linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, height * width, c)  # (B, HW, C)
        if self.use_linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x)
        x = x.reshape(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.use_linear_projection:
            x = self.proj_out(x.contiguous())
        return x + h


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1)


__all__ = ["GEGLU", "Attention", "BasicTransformerBlock", "FeedForward", "Transformer2D"]
