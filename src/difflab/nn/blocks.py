"""Shared U-Net building blocks: residual block, self-attention, down/up-sampling.

Module and parameter names follow diffusers' (``norm1``, ``conv1``, ``time_emb_proj``,
``to_q``/``to_k``/``to_v``/``to_out.0``, ``downsamplers.0.conv`` ...) so that foreign weights
map onto difflab modules by name (see ``difflab.interop``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nn import fused
from difflab.nn.fused import channels_last_only, group_norm_silu


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → dropout → conv, + skip.

    x: (B, C_in, H, W), temb: (B, E) or None → (B, C_out, H, W). Ho et al. 2020, App. B.
    ``temb_proj`` (B, C_out), when given, stands for ``time_emb_proj(silu(temb))``: the U-Nets
    compute every block's projection in one matrix product (:func:`time_projections`).
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

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None, *,
                temb_proj: torch.Tensor | None = None) -> torch.Tensor:
        # The adds go into the fresh conv outputs (a convolution's backward does not read its
        # output): no new activation buffers, ~5% faster fp32 training steps on CPU.
        a = group_norm_silu(self.norm1, x)
        if temb_proj is None and self.time_emb_proj is not None and temb is not None:
            temb_proj = self.time_emb_proj(F.silu(temb))
        if self.conv1.bias is not None and fused.takes_offset(a, self.norm2):
            # compiled, channels-last, sums form: the bias and the time projection go into the
            # GroupNorm's statistics and shift instead of a pass over the convolution's output
            offset = self.conv1.bias if temb_proj is None else temb_proj + self.conv1.bias
            h = fused.group_norm_silu_offset(
                self.norm2, self.conv1._conv_forward(a, self.conv1.weight, None), offset)
        else:
            h = self.conv1(a)
            if temb_proj is not None:
                h = _add_into(h, temb_proj[:, :, None, None])
            h = group_norm_silu(self.norm2, h)
        h = self.conv2(self.dropout(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = _add_into(h, skip)
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


# Device types whose U-Nets project the time embedding for all blocks in one product: CUDA,
# where it removes 63 of a DDPM-CIFAR-10 training step's small matrix-product kernels
# (benchmarks/RESULTS.md, "Fourteenth session"); elsewhere one SiLU and one product per block
# as before (on this project's CPU the two are alike within noise, and CPU results stay bit for
# bit as they were). Benchmarks: -tpsplit / -tpgroup (benchmarks/_common.py).
GROUPED_TIME_PROJECTIONS: frozenset[str] = frozenset({"cuda"})


def time_projections(blocks: Sequence[ResnetBlock], temb: torch.Tensor) -> list[torch.Tensor]:
    """Each block's ``time_emb_proj(silu(temb))`` (B, C_out), in the blocks' order: on the device
    types in :data:`GROUPED_TIME_PROJECTIONS` from one matrix product with the projections'
    weights stacked — the same numbers (up to the matrix product's rounding) in one product, one
    SiLU and, backward, two products, instead of one SiLU and three small products per block (22
    blocks in the DDPM-CIFAR-10 U-Net, 66 small kernels of a GPU training step)."""
    projs = [b.time_emb_proj for b in blocks]
    if any(p is None for p in projs):
        raise ValueError("time_projections: every block needs a time_emb_proj")
    act = F.silu(temb)
    if temb.device.type not in GROUPED_TIME_PROJECTIONS:
        return [p(act) for p in projs]
    weight = torch.cat([p.weight for p in projs])
    bias = torch.cat([p.bias for p in projs])
    return list(F.linear(act, weight, bias).split([p.out_features for p in projs], 1))


# Device types on which a convolution whose channel counts are not multiples of 8 runs with
# them zero-padded to multiples of 8 (:func:`padded_conv`): an RGB U-Net's first and last
# convolutions (3 channels), a latent U-Net's (4), the autoencoder's and CLIP's image tower's
# on images and latents. On an H100 cuDNN runs those slowly: with 3 bf16 channels a pixel is
# 6 bytes, off the 16-byte alignment of its fast kernels, and the last convolution's input
# gradient took 0.34 ms (2.7 TFLOP/s) of a 17.5 ms DDPM-CIFAR-10 step (benchmarks/RESULTS.md,
# "Eighteenth session"). None by default until timed on a GPU (benchmarks: -pad8).
PADDED_NARROW_CONVOLUTIONS: frozenset[str] = frozenset()


def padded_conv(conv: nn.Conv2d, x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """``conv(x)``; on the device types in :data:`PADDED_NARROW_CONVOLUTIONS`, with input and
    output channels zero-padded to multiples of ``multiple`` (zero input channels meet zero
    weights; the extra outputs are computed and dropped), the same numbers up to the
    convolution's rounding. The module and its parameters keep their shapes (checkpoints and
    foreign weights are unchanged); the gradients of the padding are sliced off. The output is
    dense, in the input's layout."""
    cin, cout = conv.in_channels, conv.out_channels
    pad_in, pad_out = -cin % multiple, -cout % multiple
    if x.device.type not in PADDED_NARROW_CONVOLUTIONS or conv.groups != 1 or \
            not (pad_in or pad_out):
        return conv(x)
    channels_last = channels_last_only(x)
    weight, bias = conv.weight, conv.bias
    if pad_in:
        x = F.pad(x, (0, 0, 0, 0, 0, pad_in))
        weight = F.pad(weight, (0, 0, 0, 0, 0, pad_in))
    if pad_out:
        weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, pad_out))
        bias = None if bias is None else F.pad(bias, (0, pad_out))
    if channels_last:  # (kept: F.pad may lay its output out NCHW)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    y = conv._conv_forward(x, weight, bias)
    if not pad_out:
        return y
    # the kept channels as a dense tensor in the input's layout (a small copy: cout < 8)
    return y[:, :cout].contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` (a buffer nothing else holds) when that keeps
    the result's dtype; otherwise out of place so that type promotion still happens."""
    if fresh.dtype == torch.promote_types(fresh.dtype, other.dtype):
        return fresh.add_(other)
    return fresh + other


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
        # The four projections are per-token linears; they run as 1×1 convolutions on the
        # (B, C, H, W) map, which on CPU go through oneDNN (≈2× MKL's sgemm rate on AMD) and
        # on a channels_last map read the tokens in place. Same weights, same names.
        wqkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])[:, :, None, None]
        bqkv = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        qkv = F.conv2d(group_norm_silu(self.group_norm, x, silu=False), wqkv, bqkv)  # (B, 3C, H, W)
        qkv = qkv.contiguous(memory_format=torch.channels_last)  # tokens with unit-stride rows
        q, k, v = qkv.flatten(2).transpose(1, 2).unflatten(-1, (3, self.heads, -1)) \
            .permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, d)
        out = attention(q, k, v)  # (B, heads, HW, d)
        out = out.transpose(1, 2).reshape(b, h * w, c).transpose(1, 2).unflatten(2, (h, w))
        out = F.conv2d(out, self.to_out[0].weight[:, :, None, None], self.to_out[0].bias)
        if not x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous()  # keep an NCHW model NCHW
        out = _add_into(out, x)
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V via SDPA; on CPU under bf16 it runs in float32, since the CPU bf16
    flash-attention backward is ~6× slower than float32 at U-Net sizes (benchmarks/RESULTS.md)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


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
    """Nearest ×2 then 3×3 conv: (B, C, H, W) → (B, C, 2H, 2W) (or to ``size``).

    On CPU the pair runs as one stride-2 transposed convolution with a 4×4 kernel: each output
    pixel of "repeat, then 3×3 conv" sees only 2×2 distinct input pixels, so along each axis
    the 3 taps w₀, w₁, w₂ fold into 4 taps K = (w₂, w₁+w₂, w₀+w₁, w₀) (``_FOLD``). Same function
    (equal up to float rounding), 16 instead of 36 multiply-adds per input pixel and channel
    pair, and no 4× upsampled copy: ~2× faster forward + backward (benchmarks/RESULTS.md).
    """

    # Device types that run the folded form: always (the CPU), and inside torch.compile only
    # (CUDA: part of the compiled step timed on an H100 with right gradients, 31 % of the bf16
    # matmul rate; benchmarks/RESULTS.md, "Thirteenth session"; eager CUDA keeps the plain
    # pair, not timed alone). Settable per instance (benchmarks/_common.py's -fold, -nofold).
    fold_on: frozenset[str] = frozenset({"cpu"})
    fold_compiled_on: frozenset[str] = frozenset({"cuda"})

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        doubled = size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
        if doubled and self.folds(x.device.type):
            return F.conv_transpose2d(x, folded_upsample_kernel(self.conv.weight),
                                      self.conv.bias, stride=2, padding=1)
        if doubled:
            x = upsample_nearest2x(x)
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)

    def folds(self, device_type: str) -> bool:
        """Whether a ×2 upsampling on ``device_type`` runs folded here (now: compiling or not)."""
        return device_type in self.fold_on or (device_type in self.fold_compiled_on
                                               and torch.compiler.is_compiling())


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if channels_last_only(x) else torch.contiguous_format


# Gradients in the layout of the activations. A convolution's backward (cuDNN's, oneDNN's) needs
# its incoming gradient dense and in its input's memory format; where it is not, PyTorch copies
# it inside the convolution backward, once per convolution that reads it. Two places of a U-Net
# hand out such gradients: the skip concatenation (its backward slices channels out of a
# channels-last gradient: strided, not dense) and nearest upsampling (its backward is a scatter
# into a fresh NCHW buffer). Under torch.compile the traced strides decide the layouts inductor
# gives the convolution backward's inputs, so a dense channels-last gradient traced here is
# written by the fused kernel that produces it, with no copy at all (benchmarks/RESULTS.md).
class _DenseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.memory_format = _memory_format(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=ctx.memory_format)


def dense_gradient(x: torch.Tensor) -> torch.Tensor:
    """Identity whose backward hands ``x``'s producer a dense gradient in ``x``'s memory format.

    For the up path of a U-Net: ``torch.cat([dense_gradient(h), skip], 1)``. ``h`` feeds only
    the concatenation, so its gradient (a channel slice) goes straight into the backward of the
    convolutions that made it; the skip's slice is summed with the gradient of its other use,
    which makes a dense tensor anyway, so it is left alone (a copy there would be wasted)."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        return x
    return _DenseGradient.apply(x)


class _UpsampleNearest2x(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # each input pixel's gradient is the sum over its 2×2 copies: a 2×2 sum pool, which
        # keeps the gradient's memory format (the default backward scatters into NCHW)
        return F.avg_pool2d(grad, 2, divisor_override=1)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour ×2 upsampling of (B, C, H, W) whose backward keeps the layout."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return _UpsampleNearest2x.apply(x)


_FOLD = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))  # K = A·w per axis


def folded_upsample_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3×3 conv weight (C_out, C_in, 3, 3) → the 4×4 ``conv_transpose2d`` weight (C_in, C_out,
    4, 4) of "nearest ×2, then that conv" (stride 2, padding 1): K = A·W·Aᵀ per channel pair."""
    a = torch.tensor(_FOLD, dtype=weight.dtype, device=weight.device)
    return torch.einsum("ak,oikl,bl->ioab", a, weight, a)
