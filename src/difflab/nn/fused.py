"""GroupNorm (+ SiLU) for channels-last CPU tensors, in a small C++ kernel built on first use.

PyTorch's CPU GroupNorm is fast on NCHW tensors and several times slower on channels-last
ones — bf16 (64, 64, 28, 28): ~20 ms forward instead of ~1 ms —, while oneDNN's convolutions
are fastest channels-last. ``csrc/group_norm_nhwc.cpp`` computes GroupNorm, optionally fused
with the SiLU that follows it in every ResNet block, directly on the channels-last buffer
(float32 statistics; float32 or bf16 storage), so a CPU U-Net can stay channels-last under bf16
autocast too: the `small` U-Net then trains 269 img/s instead of 250 (NCHW), 1.33× diffusers'
(benchmarks/RESULTS.md). :func:`group_norm_silu` uses it for bf16 tensors only — in float32
it was no faster than PyTorch's channels-last GroupNorm within a whole training step.

The kernel is compiled with ``torch.utils.cpp_extension`` the first time it is needed (~30 s,
cached under ``~/.cache/torch_extensions``). Without a C++ compiler or ninja — or with
``DIFFLAB_NO_CPP_EXTENSION=1`` — :func:`group_norm_silu` falls back to PyTorch's ops (same
numbers up to rounding) and :func:`fused_group_norm_available` is False, so the training loop
keeps CPU bf16 in NCHW as before. The kernel is registered as two PyTorch operators
(``difflab::group_norm_silu_nhwc`` and its backward) with shape-only versions, so
``torch.compile`` keeps it as one call in the compiled graph.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_SOURCE = Path(__file__).parent / "csrc" / "group_norm_nhwc.cpp"
_lock = threading.Lock()
_state: dict[str, Any] = {}


def _extension() -> Any | None:
    """The compiled kernel module, or None where it cannot be built (reason kept in _state)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def _build() -> Any | None:
    if os.environ.get("DIFFLAB_NO_CPP_EXTENSION", "") not in ("", "0"):
        _state["reason"] = "disabled by DIFFLAB_NO_CPP_EXTENSION"
        return None
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
        # -march=native: one build per CPU type (a shared home must not hand a binary built
        # for another CPU to this one)
        cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" /
                                    "torch_extensions")) / f"difflab_group_norm_nhwc_{_cpu_tag()}"
        if not cache.exists():
            print("difflab: compiling the channels-last GroupNorm kernel (once, ~30 s)",
                  file=sys.stderr)
        cache.mkdir(parents=True, exist_ok=True)
        return load("difflab_group_norm_nhwc", [str(_SOURCE)], build_directory=str(cache),
                    extra_cflags=["-O3", "-march=native", "-ffast-math"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: fall back, say why once
        last_line = (str(e).strip().splitlines() or [""])[-1]
        _state["reason"] = f"{type(e).__name__}: {last_line}"
        warnings.warn("difflab: the channels-last GroupNorm kernel could not be built "
                      f"({_state['reason']}); using PyTorch's GroupNorm", stacklevel=3)
        return None


def _cpu_tag() -> str:
    import hashlib
    import platform

    from difflab.perf import cpu_flags

    key = " ".join([platform.machine(), *cpu_flags()])
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def fused_group_norm_available() -> bool:
    """Whether the C++ kernel is (or can be) built here."""
    return _extension() is not None


def _kernel_ready() -> bool:
    # torch.compile traces this: it must not build the kernel there (the loop asks for it
    # before compiling, through fused_group_norm_available); a plain dict lookup it can guard on
    if torch.compiler.is_compiling():
        return _state.get("module") is not None
    return _extension() is not None


def channels_last_only(x: torch.Tensor) -> bool:
    """A (N, C, H, W) tensor stored channels-last and not also readable as NCHW (one channel or
    one pixel is both)."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous())


def _applies(x: torch.Tensor, norm: nn.GroupNorm) -> bool:
    return (x.device.type == "cpu" and norm.affine
            and x.dtype == torch.bfloat16  # float32: no faster than PyTorch's (RESULTS.md)
            and channels_last_only(x)  # PyTorch's NCHW kernel is fast
            and x.shape[2] * x.shape[3] > 1
            and _kernel_ready())


# The kernel as PyTorch operators (with shape-only "fake" versions and an autograd formula), so
# that torch.compile keeps it as one opaque call instead of breaking the graph at every block.
@torch.library.custom_op("difflab::group_norm_silu_nhwc", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = _extension().forward(x, weight, bias, groups, eps, silu)
    return y, mean, rstd


@_forward_op.register_fake
def _(x, weight, bias, groups, eps, silu):
    stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.channels_last), stats, torch.empty_like(stats)


@torch.library.custom_op("difflab::group_norm_silu_nhwc_backward", mutates_args=())
def _backward_op(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor, groups: int,
                 silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _extension().backward(grad, x, mean, rstd, weight, bias, groups, silu)
    return dx, dw, db


@_backward_op.register_fake
def _(grad, x, mean, rstd, weight, bias, groups, silu):
    return (torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(weight),
            torch.empty_like(bias))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, groups, _, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.groups, ctx.silu = groups, silu


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    x, mean, rstd, w, b = ctx.saved_tensors
    dx, dw, db = _backward_op(grad, x, mean, rstd, w, b, ctx.groups, ctx.silu)
    return dx, dw, db, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def fused_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          groups: int, eps: float, silu: bool) -> torch.Tensor:
    """The kernel itself on a channels-last CPU tensor (float32 or bf16): ``silu(norm(x))`` or
    ``norm(x)``, differentiable in x, weight and bias (kept float32 inside)."""
    return _forward_op(x, weight.float().contiguous(), bias.float().contiguous(), groups, eps,
                       silu)[0]


# CUDA autocast runs group_norm in float32 (it is on autocast's float32 list): a bf16 activation
# is widened, normalised and *written* in float32, goes through SiLU and dropout in float32 and
# is cast back to bf16 by the next convolution — about twice the memory traffic of the bf16
# path, in a step that is bound by memory traffic (benchmarks/RESULTS.md, "GPU"). With this
# switch on, GroupNorm keeps the activation's half-precision dtype on a GPU, as autocast does on
# a CPU; PyTorch's CUDA kernel still accumulates its statistics in float32. Off until measured
# on a GPU (benchmarks/gpu.sh, part mfu: unet_train.py's "-gn16" peers).
LOW_PRECISION_GPU_GROUP_NORM = False


def _low_precision_applies(x: torch.Tensor, norm: nn.GroupNorm) -> bool:
    return (LOW_PRECISION_GPU_GROUP_NORM and x.device.type == "cuda" and norm.affine
            and x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled("cuda"))


def low_precision_group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` computed and returned in x's (half-precision) dtype, autocast or not; the
    affine parameters are cast to it (differentiably: gradients reach the float32 weights)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.group_norm(x, norm.num_groups, norm.weight.to(x.dtype), norm.bias.to(x.dtype),
                            norm.eps)


# Under torch.compile, PyTorch's GroupNorm is decomposed into smaller operators, and the
# decomposition of its backward views the gradient as (N, C, H·W) and (N, G, C/G, H·W). In the
# traced graph those are views of a channels-last tensor, but inductor freezes a buffer whose
# layout it may still choose to contiguous (NCHW) strides when such a view reads it: the
# float32 gradient is written out transposed, read back twice, and the input gradient comes
# out NCHW, to be turned back for the next convolution's backward. Traced on a CPU along a
# GPU's code path, the DDPM-CIFAR-10 U-Net's compiled step had 32 NCHW float32 activation
# buffers in its backward and 8 in its forward (benchmarks/layout_check.py --inductor;
# benchmarks/RESULTS.md, "GPU"); the compiled H100 profile's slowest fused kernels, named
# "…clone…", ran at about a sixth of the memory bandwidth, as transpositions do. The autograd
# function below computes the same GroupNorm (+ SiLU) with reductions over (H, W) and
# per-channel broadcasts only, which keep any layout: no NCHW buffer from GroupNorm, and 13 %
# fewer bytes moved by the compiled step's fused kernels (15.8 vs 18.2 GB at batch 128, counted
# on a CPU by inductor's GPU rules; 14.9 with realize_reads_threshold=6). It applies while
# compiling, to channels-last inputs on the device types listed here: CUDA (in the "ops" form
# below; with realize_reads_threshold=6 and the folded upsampling the compiled step of the
# DDPM-CIFAR-10 preset ran at 31 % of an H100's bf16 matmul rate instead of 21 %, gradients
# within eager bf16's own rounding of float32; RESULTS.md, "Thirteenth session"), not the CPU
# (inductor's C++ kernels transpose cheaply: it gains nothing there).
COMPILED_CHANNELS_LAST_GROUP_NORM: frozenset[str] = frozenset({"cuda"})

# How that GroupNorm is differentiated: "ops", the forward in plain
# differentiable operators, whose backward AOTAutograd derives; "function", the autograd
# function below with its own backward (10 bytes per element, 3.5 % faster compiled on an H100
# — but there, in torch 2.11, its compiled gradients came out 75 % off, the last ResNet
# block's tensors lost whole, with inductor's mix-order reductions off too; eager, and compiled
# on a CPU, it is right: RESULTS.md, "Twelfth" and "Thirteenth session"; tests/test_cuda.py).
# "sums" (the default since the sixteenth session): the "ops" form with the statistics of
# bf16 inputs from per-channel sums (:func:`_group_var_mean_by_channel_sums`): counted on a
# CPU by inductor's GPU rules for the DDPM-CIFAR-10 step at batch 128 (with folded upsampling,
# bf16 weights, realize_reads=6), 649 instead of 755 fused kernels and 16.1 instead of 17.1 GB
# (RESULTS.md, "Fourteenth session"); timed on an H100, the compiled CUDA-graph step 7.5 %
# faster than "ops" in the same run (7,323 vs 6,813 img/s with bf16 weights, 34.4 % of the
# bf16 matmul rate), gradients as far from float32 as the "ops" form's (RESULTS.md,
# "Sixteenth session").
# Eager code that needs the layout-keeping GroupNorm (:func:`_pytorch_backward_would_crash`)
# uses the form set here as well.
CHANNELS_LAST_GROUP_NORM_FORM = "sums"


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """``silu(group_norm(x))`` (or without the SiLU) on a (N, C, H, W) tensor of any layout;
    statistics and arithmetic in float32 (float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                eps: float, silu: bool, out_dtype: torch.dtype) -> torch.Tensor:
        xf, mean, rstd, scale, shift = _normalisation(x, weight, bias, groups, eps)
        z = xf * scale + shift
        ctx.save_for_backward(x, weight, mean, rstd, scale, shift)
        ctx.silu = silu
        return (F.silu(z) if silu else z).to(out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, rstd, scale, shift = ctx.saved_tensors
        n, c, h, w = x.shape
        groups = mean.shape[1]
        scale, shift = _stored(scale), _stored(shift)
        xf = x.to(scale.dtype)
        dz = grad.to(xf.dtype)
        if ctx.silu:  # z = x·scale + shift recomputed rather than saved
            dz = torch.ops.aten.silu_backward(dz, xf * scale + shift)
        # the two sums GroupNorm's backward needs, per (sample, channel) over H, W
        sum_dz = dz.sum((2, 3))  # (N, C)
        sum_dz_x = (dz * xf).sum((2, 3))
        mean_c, rstd_c = (t.repeat_interleave(c // groups, 1) for t in (mean, rstd))
        wf = weight.to(xf.dtype)
        d_weight = ((sum_dz_x - mean_c * sum_dz) * rstd_c).sum(0)
        d_bias = sum_dz.sum(0)
        # dx = rstd·γ·dz + a·x + b per (sample, channel): the per-group sums of γ·dz and γ·dz·x
        # give a and b (dx = rstd·(γdz − mean(γdz) − x̂·mean(γdz·x̂)) over the group)
        g_dz = (sum_dz * wf).view(n, groups, -1).sum(2)
        g_dz_x = (sum_dz_x * wf).view(n, groups, -1).sum(2)
        m = c // groups * h * w
        a = (g_dz * mean - g_dz_x) * rstd.pow(3) / m  # (N, G)
        b = -a * mean - g_dz * rstd / m
        a, b = (t.repeat_interleave(c // groups, 1)[:, :, None, None] for t in (a, b))
        dx = dz * scale + xf * a + b
        return (dx.to(x.dtype), d_weight.to(weight.dtype), d_bias.to(weight.dtype),
                None, None, None, None)


def _stored(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, 1, 1), the same values, as the output of a reduction, which inductor stores:
    z = x·scale + shift then reads 3 buffers instead of the 5 that scale and shift are made of
    (x, mean, rstd, γ, β), and inductor recomputes a reused elementwise result only up to 4
    reads (``realize_reads_threshold``) — above that it stores z and sigmoid(z) in float32,
    full size (benchmarks/RESULTS.md, "Tenth session"). The mean of 16 equal values is exact."""
    return t.expand(*t.shape[:2], 16, 1).mean(2, keepdim=True)


def _normalisation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                   eps: float, by_channel_sums: bool = False,
                   offset: torch.Tensor | None = None):
    """``x`` in float32 (float64 stays), its (N, G) mean and 1/std, and GroupNorm as
    ``x·scale + shift`` with (N, C, 1, 1) ``scale`` and ``shift``; the statistics of a bf16
    ``x`` by :func:`_group_var_mean_by_channel_sums` if ``by_channel_sums``. ``offset``, (C,)
    or (N, C): GroupNorm of ``x + offset`` (per channel), as ``x·scale + shift`` still — from
    the sums the offset goes into the statistics and the shift, and ``x + offset`` is never
    made; otherwise it is added to ``x`` first."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    sums = by_channel_sums and x.dtype == torch.bfloat16
    if offset is not None and not sums:
        xf, offset = xf + offset.to(xf.dtype)[..., None, None], None
    if sums:
        var, mean = _group_var_mean_by_channel_sums(xf, groups, offset)
    else:  # splitting C into (G, C/G) is a view in any layout
        var, mean = torch.var_mean(xf.unflatten(1, (groups, -1)), dim=(2, 3, 4), correction=0)
    rstd = torch.rsqrt(var + eps)  # (N, G)
    scale, shift = _per_channel(mean, rstd, weight, bias)
    if offset is not None:  # (x + d)·scale + shift = x·scale + (shift + d·scale)
        shift = shift + offset.to(scale.dtype)[..., None, None] * scale
    return xf, mean, rstd, scale, shift


def _group_var_mean_by_channel_sums(xf: torch.Tensor, groups: int,
                                    offset: torch.Tensor | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, G) variance and mean of ``xf`` (N, C, H, W) as E[x²] − E[x]² and E[x] from the sums
    of x and x² per (sample, channel) over (H, W): reductions of one pass over ``xf`` that keep
    its layout, autograd's backward of them a per-channel ``a·x + b``. In float32 E[x²] − E[x]²
    loses ~1e-6·(mean/std)² of the variance to cancellation: no more than rounding the input to
    bf16 already moved it (~1.3e-6·(mean/std)², half an ulp of 2⁻⁸ relative, uniform), so
    :func:`_normalisation` uses it for bf16 inputs only. ``offset`` (C,) or (N, C): the
    statistics of ``xf + offset`` per channel, from the same sums (Σ(x+d) = Σx + HW·d,
    Σ(x+d)² = Σx² + 2d·Σx + HW·d²)."""
    n, c, h, w = xf.shape
    m = c // groups * h * w
    s1, s2 = xf.sum((2, 3)), xf.square().sum((2, 3))  # (N, C)
    if offset is not None:
        d = offset.to(s1.dtype)
        s1, s2 = s1 + h * w * d, s2 + d * (2 * s1 + h * w * d)
    s1 = s1.unflatten(1, (groups, -1)).sum(2)  # (N, G)
    s2 = s2.unflatten(1, (groups, -1)).sum(2)
    mean = s1 / m
    # (clamped: cancellation must never make a near-constant group's variance negative, and
    # its rsqrt NaN)
    return (s2 / m - mean * mean).clamp_min(0), mean


def _per_channel(mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, G) statistics and (C,) affine → GroupNorm as ``x·scale + shift``, (N, C, 1, 1) each."""
    cpg = weight.shape[0] // mean.shape[1]
    scale = rstd.repeat_interleave(cpg, 1) * weight.to(rstd.dtype)
    shift = bias.to(rstd.dtype) - mean.repeat_interleave(cpg, 1) * scale
    return scale[:, :, None, None], shift[:, :, None, None]


def channels_last_group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor,
                                  silu: bool = True) -> torch.Tensor:
    """``silu(norm(x))`` (or ``norm(x)``) through :class:`_ChannelsLastGroupNorm`, in the dtype
    PyTorch's GroupNorm returns: float32 under CUDA autocast (unless
    :data:`LOW_PRECISION_GPU_GROUP_NORM`), the input's dtype otherwise."""
    out_dtype = autocast_group_norm_dtype(x)
    if CHANNELS_LAST_GROUP_NORM_FORM in ("ops", "sums"):
        return _group_norm_by_ops(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu,
                                  out_dtype, CHANNELS_LAST_GROUP_NORM_FORM == "sums")
    return _ChannelsLastGroupNorm.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps,
                                        silu, out_dtype)


def _group_norm_by_ops(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                       eps: float, silu: bool, out_dtype: torch.dtype,
                       by_channel_sums: bool = False,
                       offset: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`_ChannelsLastGroupNorm`'s forward, differentiated by autograd: reductions over
    (C/G, H, W) of a view (or over (H, W) per channel, ``by_channel_sums``) and per-channel
    broadcasts, which keep any layout (of ``x + offset``: :func:`_normalisation`)."""
    xf, _, _, scale, shift = _normalisation(x, weight, bias, groups, eps, by_channel_sums,
                                            offset)
    z = xf * scale + shift
    return (F.silu(z) if silu else z).to(out_dtype)


def autocast_group_norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype PyTorch's GroupNorm returns for ``x`` here: float32 for a half-precision input
    under autocast on a GPU (group_norm is on CUDA autocast's float32 list), unless
    :data:`LOW_PRECISION_GPU_GROUP_NORM`; the input's dtype otherwise (CPU autocast keeps it)."""
    if (x.dtype in (torch.bfloat16, torch.float16) and x.device.type != "cpu"
            and torch.is_autocast_enabled(x.device.type) and not LOW_PRECISION_GPU_GROUP_NORM):
        return torch.float32
    return x.dtype


# Whether a residual block hands its first convolution's bias and time projection (constants
# per sample and channel) to the next GroupNorm instead of adding them to the convolution's
# output (:func:`takes_offset`): in the "sums" form they go into the statistics and the shift
# (:func:`_normalisation`), which saves a pass over that output. Counted on a CPU by
# inductor's GPU rules (DDPM-CIFAR-10 step, batch 128): 22 fewer extern kernels, 10 more
# small fused ones, 0.3 GB less (RESULTS.md, "Sixteenth session"); opt-in until timed on a
# GPU (benchmarks' -gnoff).
GROUP_NORM_TAKES_OFFSET = False


def takes_offset(x: torch.Tensor, norm: nn.GroupNorm) -> bool:
    """Whether :func:`group_norm_silu_offset` would take an offset without adding it to its
    input (a compiled channels-last model on a device of
    :data:`COMPILED_CHANNELS_LAST_GROUP_NORM`, the "sums" form): ``x`` is any tensor of the
    input's device, layout and spatial size (a block asks before its convolution runs)."""
    return (GROUP_NORM_TAKES_OFFSET and CHANNELS_LAST_GROUP_NORM_FORM == "sums"
            and _channels_last_applies(x, norm))


def group_norm_silu_offset(norm: nn.GroupNorm, x: torch.Tensor,
                           offset: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x + offset))`` for a per-channel ``offset`` (C,) or (N, C), where
    :func:`takes_offset` said so, without making ``x + offset``."""
    return _group_norm_by_ops(x, norm.weight, norm.bias, norm.num_groups, norm.eps, True,
                              autocast_group_norm_dtype(x), True, offset)


def _channels_last_applies(x: torch.Tensor, norm: nn.GroupNorm) -> bool:
    return (x.device.type in COMPILED_CHANNELS_LAST_GROUP_NORM and norm.affine
            and torch.compiler.is_compiling() and channels_last_only(x)
            and x.shape[2] * x.shape[3] > 1)


def _pytorch_backward_would_crash(x: torch.Tensor, norm: nn.GroupNorm) -> bool:
    """PyTorch's CPU GroupNorm backward (2.13) dies with a segmentation fault on a channels-last
    input that needs no gradient while the norm's weight does — a block whose input comes
    from frozen layers or straight from data (tests/test_fused_group_norm.py)."""
    return (x.device.type == "cpu" and norm.affine and not x.requires_grad
            and norm.weight.requires_grad and torch.is_grad_enabled() and channels_last_only(x))


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = True) -> torch.Tensor:
    """``silu(norm(x))`` (or ``norm(x)`` with ``silu=False``), in one fused pass for a
    channels-last CPU tensor when the kernel is available; through the layout-keeping
    autograd function when compiling where :data:`COMPILED_CHANNELS_LAST_GROUP_NORM` says so,
    and where PyTorch's CPU backward would crash; else with PyTorch's ops. Under autocast the
    input keeps its dtype, as ``F.group_norm`` does on CPU (and on a GPU with
    :data:`LOW_PRECISION_GPU_GROUP_NORM`)."""
    if _applies(x, norm):
        return fused_group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
    if _channels_last_applies(x, norm) or _pytorch_backward_would_crash(x, norm):
        return channels_last_group_norm_silu(norm, x, silu)
    if _low_precision_applies(x, norm):
        y = low_precision_group_norm(norm, x)
    else:
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(y, inplace=not y.requires_grad) if silu else y


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same state-dict names) that runs through
    :func:`group_norm_silu`: the channels-last kernel on a CPU under bf16, the layout-keeping
    form where switched on, and no crash where PyTorch's CPU backward would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(self, x, silu=False)
