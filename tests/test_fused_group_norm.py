"""difflab.nn.fused: the channels-last GroupNorm (+ SiLU) kernel against float64 PyTorch, its
fallback, and the blocks that use it."""

import os
import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab.nn import fused
from difflab.nn.fused import fused_group_norm_silu, group_norm_silu

needs_kernel = pytest.mark.skipif(not fused.fused_group_norm_available(),
                                  reason=f"no C++ toolchain: {fused._state.get('reason')}")
KERNEL = "group_norm_silu_nhwc"  # in the name of its autograd node


def reference(x, w, b, groups, eps, silu):
    y = F.group_norm(x.double(), groups, w.double(), b.double(), eps)
    return F.silu(y) if silu else y


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1.2e-2)])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape, groups", [((3, 16, 5, 7), 4), ((2, 64, 8, 8), 32),
                                           ((4, 6, 3, 2), 3)])
def test_kernel_matches_float64_values_and_gradients(dtype, tol, silu, shape, groups):
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.7
    w = torch.randn(shape[1], generator=g) * 0.5 + 1
    b = torch.randn(shape[1], generator=g)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = x64.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    wq, bq = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = fused_group_norm_silu(x, wq, bq, groups, 1e-5, silu)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    dx, dw, db = torch.autograd.grad(y, (x, wq, bq), dy.to(dtype))

    xr = x.detach().double().requires_grad_()  # the same (rounded) input, in float64
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    yr = reference(xr, wr, br, groups, 1e-5, silu)
    ref = torch.autograd.grad(yr, (xr, wr, br), dy)
    for got, want in zip((y, dx, dw, db), (yr, *ref)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < tol


@needs_kernel
def test_blocks_use_the_kernel_for_channels_last_bf16_and_agree_with_nchw():
    norm = nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, 6, 6).bfloat16()
    xr = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = group_norm_silu(norm, xr)
    assert KERNEL in y.grad_fn.name() and y.dtype == torch.bfloat16
    nchw = group_norm_silu(norm, x.requires_grad_())  # PyTorch's ops
    assert KERNEL not in nchw.grad_fn.name()
    torch.testing.assert_close(y.float(), nchw.float(), rtol=2e-2, atol=2e-2)
    plain = group_norm_silu(norm, xr, silu=False)
    torch.testing.assert_close(plain.float(), norm(x).float(), rtol=2e-2, atol=2e-2)
    x32 = x.float().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert KERNEL not in group_norm_silu(norm, x32).grad_fn.name()  # fp32
    a = group_norm_silu(norm, xr.detach())
    assert torch.equal(a, group_norm_silu(norm, xr.detach()))  # deterministic


@needs_kernel
def test_unet_gives_the_same_output_and_gradients_in_both_layouts_under_bf16():
    from difflab.models.unet import UNet2DModel, UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                     layers_per_block=1, attention_levels=(False, True), norm_num_groups=4,
                     attention_head_dim=8)
    unet = UNet2DModel(cfg)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    outs, grads = [], []
    for layout in (torch.contiguous_format, torch.channels_last):
        unet = unet.to(memory_format=layout)
        unet.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x.contiguous(memory_format=layout), t).sample
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append(unet.conv_in.weight.grad.clone())
    torch.testing.assert_close(outs[1], outs[0], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(grads[1], grads[0], rtol=5e-2, atol=5e-3)


@needs_kernel
def test_torch_compile_keeps_the_kernel_as_one_call():
    """The kernel is a PyTorch operator with a fake (shape-only) version and an autograd
    formula: a compiled block keeps it in one graph (fullgraph=True fails on any graph break;
    it used to break at every block and hit dynamo's recompile limit) with the same numbers."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16))
    block = block.to(memory_format=torch.channels_last)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return group_norm_silu(block[1], block[0](x)).float().square().mean()

    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    eager = f(x)
    eager.backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # keeps the traced graph, runs it as it is
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(f, backend=backend, fullgraph=True)(x)
    compiled.backward()
    assert len(graphs) == 1 and "difflab.group_norm_silu_nhwc" in graphs[0]
    assert torch.equal(compiled, eager)
    for p, g in zip(block.parameters(), grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_group_norm_matches_float32_and_reaches_the_weights(dtype):
    """The GPU's opt-in half-precision GroupNorm (checked here on CPU tensors, same code): the
    output keeps the input's dtype, equals float32 GroupNorm up to that dtype's rounding, and
    the float32 affine parameters get the float32 gradients up to the same rounding."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, 16, 6, 6) * 3 + 1).to(dtype).requires_grad_()
    y = fused.low_precision_group_norm(norm, x)
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, norm.weight), dy)
    assert dw.dtype == torch.float32
    x32 = x.detach().float().requires_grad_()
    y32 = norm(x32)
    dx32, dw32 = torch.autograd.grad(y32, (x32, norm.weight), dy.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for got, want in ((y, y32), (dx, dx32), (dw, dw32)):
        assert ((got.float() - want).abs().max() / want.abs().max()) < tol
    # only for CUDA tensors under CUDA autocast, and only when switched on
    fused.LOW_PRECISION_GPU_GROUP_NORM = True
    try:
        assert not fused._low_precision_applies(x, norm)  # a CPU tensor
    finally:
        fused.LOW_PRECISION_GPU_GROUP_NORM = False


def test_without_the_kernel_everything_falls_back():
    # (seeded, and float32 round-off as the tolerance: the fallback computes in another order,
    # up to ~5e-7 apart, and allclose's default atol of 1e-8 failed near zero now and then)
    code = ("import torch; from torch import nn; from difflab.nn import fused;"
            "torch.manual_seed(0);"
            "n = nn.GroupNorm(2, 4); x = torch.randn(1, 4, 3, 3).contiguous("
            "memory_format=torch.channels_last);"
            "y = fused.group_norm_silu(n, x);"
            "print(fused.fused_group_norm_available(),"
            " bool((y - torch.nn.functional.silu(n(x))).abs().max() < 1e-5))")
    env = {**os.environ, "DIFFLAB_NO_CPP_EXTENSION": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True"]


# The layout-keeping GroupNorm that compiled channels-last models can use on a GPU
# (fused.COMPILED_CHANNELS_LAST_GROUP_NORM): the same function as PyTorch's, written so that
# inductor keeps every activation buffer channels-last.

@pytest.mark.parametrize("form", ["function", "ops", "sums"])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format],
                         ids=["channels_last", "nchw"])
def test_layout_keeping_group_norm_is_group_norm_in_float64(silu, layout, form):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 12, 5, 4, generator=g, dtype=torch.float64) * 2 + 0.7) \
        .contiguous(memory_format=layout).requires_grad_()
    w = (torch.randn(12, generator=g, dtype=torch.float64) * 0.5 + 1).requires_grad_()
    b = torch.randn(12, generator=g, dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        if form in ("ops", "sums"):  # autograd's own backward of the same forward
            return fused._group_norm_by_ops(x, w, b, 3, 1e-5, silu, torch.float64,
                                            form == "sums")
        return fused._ChannelsLastGroupNorm.apply(x, w, b, 3, 1e-5, silu, torch.float64)

    assert torch.autograd.gradcheck(f, (x, w, b))
    y = f(x, w, b)
    assert (y - reference(x, w, b, 3, 1e-5, silu)).abs().max() < 1e-12
    assert y.is_contiguous(memory_format=layout)


def test_statistics_by_channel_sums_are_var_mean_to_bf16s_own_rounding():
    """The "sums" form's statistics (E[x²] − E[x]² from per-channel sums): in float64 the same
    function as var_mean, gradients included; in float32 on bf16 inputs whose mean is r times
    their spread, off by less than rounding the input to bf16 moved the variance (the reason
    the form takes bf16 inputs only: float32 inputs keep var_mean)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 4, generator=g, dtype=torch.float64) + 3
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fused._group_var_mean_by_channel_sums(x, 3), (x,))
    for got, want in zip(fused._group_var_mean_by_channel_sums(x, 3),
                         torch.var_mean(x.unflatten(1, (3, -1)), dim=(2, 3, 4), correction=0)):
        assert (got - want).abs().max() < 1e-12
    for r in (1.0, 30.0, 300.0):
        exact = torch.randn(4, 64, 16, 16, generator=g, dtype=torch.float64) + r
        quantised = exact.to(torch.bfloat16)
        want_var = torch.var_mean(quantised.double().unflatten(1, (8, -1)), dim=(2, 3, 4),
                                  correction=0)[0]
        var, _ = fused._group_var_mean_by_channel_sums(quantised.float(), 8)
        rounding = (want_var - torch.var_mean(exact.unflatten(1, (8, -1)), dim=(2, 3, 4),
                                              correction=0)[0]).abs()
        err = (var.double() - want_var).abs()
        assert err.max() < 1e-6 * want_var.max() + 2 * rounding.max(), r
    # never negative where cancellation swamps the spread (a mean 2·10⁴ times it: E[x²] − E[x]²
    # comes out ±ulp(10⁶)-sized noise, half of it below zero), so the rsqrt that follows is
    # finite
    huge = 1e3 + 0.05 * torch.randn(4, 64, 16, 16, generator=g)
    var, _ = fused._group_var_mean_by_channel_sums(huge, 8)
    assert float(var.min()) >= 0
    # dispatch: bf16 inputs take the sums, float32 inputs var_mean
    norm = nn.GroupNorm(2, 4)
    calls = []
    real = fused._group_var_mean_by_channel_sums

    def spy(xf, groups, offset=None):
        calls.append(xf.dtype)
        return real(xf, groups, offset)

    with mock.patch.object(fused, "_group_var_mean_by_channel_sums", spy):
        for dtype in (torch.float32, torch.bfloat16):
            xin = torch.randn(2, 4, 3, 3).to(dtype)
            y = fused._group_norm_by_ops(xin, norm.weight, norm.bias, 2, 1e-5, False,
                                         torch.float32, True)
            assert (y - norm(xin.float())).abs().max() < 1e-4
    assert calls == [torch.float32]  # once: for the bf16 input, widened to float32


def test_layout_keeping_group_norm_returns_pytorchs_dtypes():
    norm = nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast keeps the input's
            got = fused.channels_last_group_norm_silu(norm, x.to(dtype))
            want = F.silu(norm(x.to(dtype)))
        assert got.dtype == want.dtype == dtype == fused.autocast_group_norm_dtype(x.to(dtype))
        assert (got.float() - want.float()).abs().max() < (1e-5 if dtype == torch.float32
                                                           else 2e-2)


@pytest.mark.parametrize("low_precision", [False, True])
def test_benchmarks_cuda_autocast_emulation_gives_cudas_group_norm_dtypes(monkeypatch,
                                                                          low_precision):
    """benchmarks/layout_check.py --gpu-path counts the bytes of a GPU's compiled step on a CPU:
    its patches must give GroupNorm CUDA autocast's float32 (bf16 with
    LOW_PRECISION_GPU_GROUP_NORM) on both GroupNorm paths, with the values unchanged."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import layout_check

    monkeypatch.setattr(fused, "_kernel_ready", lambda: False)
    monkeypatch.setattr(fused, "LOW_PRECISION_GPU_GROUP_NORM", low_precision)
    want_dtype = torch.bfloat16 if low_precision else torch.float32
    norm = nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    want = F.silu(norm(x))
    with ExitStack() as stack, torch.autocast("cpu", dtype=torch.bfloat16):
        for patch in layout_check.cuda_autocast_forms():
            stack.enter_context(patch)
        xb = x.to(torch.bfloat16)
        for got in (group_norm_silu(norm, xb), fused.channels_last_group_norm_silu(norm, xb)):
            assert got.dtype == want_dtype
            assert (got.float() - want).abs().max() < 5e-2


def _compiled_block_step(monkeypatch, devices, backend, bf16=False, channels=16, groups=4,
                         form="function"):
    """One compiled training step of a channels-last ResnetBlock (float32, or under bf16
    autocast) with the switch set to ``devices`` and the GroupNorm in ``form``; the block's
    output and gradients."""
    from difflab.nn.blocks import ResnetBlock

    monkeypatch.setattr(fused, "COMPILED_CHANNELS_LAST_GROUP_NORM", frozenset(devices))
    monkeypatch.setattr(fused, "CHANNELS_LAST_GROUP_NORM_FORM", form)
    torch.manual_seed(0)
    block = ResnetBlock(channels, channels, 8, groups=groups).to(memory_format=torch.channels_last)
    x = torch.randn(2, channels, 8, 8).contiguous(memory_format=torch.channels_last)
    temb = torch.randn(2, 8)
    torch._dynamo.reset()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = torch.compile(block, backend=backend, fullgraph=True)(x, temb)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    torch._dynamo.reset()
    return out.detach(), [p.grad for p in block.parameters()]


@pytest.mark.parametrize("form", ["function", "ops", "sums"])
def test_layout_keeping_group_norm_is_traced_only_when_switched_on_and_compiling(monkeypatch,
                                                                                form):
    graphs = []

    def backend(gm, _inputs):  # keeps dynamo's graph's operators, runs it as it is
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    plain = _compiled_block_step(monkeypatch, (), backend)
    kept = _compiled_block_step(monkeypatch, ("cpu",), backend, form=form)
    assert any("group_norm" in op for op in graphs[0])
    assert not any("group_norm" in op for op in graphs[1])
    assert ("autograd_function_apply" in graphs[1]) == (form == "function")
    for got, want in zip((kept[0], *kept[1]), (plain[0], *plain[1])):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # eager: PyTorch's GroupNorm whatever the switch says
    monkeypatch.setattr(fused, "COMPILED_CHANNELS_LAST_GROUP_NORM", frozenset({"cpu"}))
    x = torch.randn(1, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert "NativeGroupNorm" in type(group_norm_silu(nn.GroupNorm(2, 4), x).grad_fn
                                     .next_functions[0][0]).__name__


@pytest.mark.parametrize("form", ["function", "ops", "sums"])
def test_inductor_keeps_every_activation_buffer_channels_last(monkeypatch, form):
    """Why the switch exists: compiled by inductor along a GPU's code path (bf16 autocast,
    PyTorch's GroupNorm, no oneDNN), PyTorch's GroupNorm backward decomposition lays activation
    buffers out NCHW (its (N, C, H·W) views need them contiguous), i.e. it transposes
    channels-last activations back and forth; the layout-keeping GroupNorm's generated code
    has no NCHW activation buffer, forward or backward — with its own backward and with the
    one autograd derives from its forward ("ops")."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(fused, "_kernel_ready", lambda: False)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)

    layout_of = re.compile(r"empty_strided_cpu\(\(2, 64, 8, 8\), \(\d+, (\d+), \d+, (\d+)\)")

    def nchw_buffers(devices):
        _, codes = run_and_get_code(_compiled_block_step, monkeypatch, devices, "inductor",
                                    bf16=True, channels=64, groups=32, form=form)
        assert len(codes) == 2  # forward and backward
        layouts = [m.groups() for code in codes for m in layout_of.finditer(code)]
        assert layouts  # the pattern still matches inductor's code
        return sum(1 for channel_stride, w_stride in layouts if w_stride == "1"
                   and channel_stride != "1")

    assert nchw_buffers(()) > 0
    assert nchw_buffers(("cpu",)) == 0


def test_layout_keeping_backward_lets_inductor_recompute_z(monkeypatch):
    """The layout-keeping GroupNorm's backward gets its per-channel scale and shift as a
    reduction's output (``fused._stored``), so z = x·scale + shift reads 3 buffers and inductor
    recomputes it where it is used instead of storing it (and what is made of it) as float32
    activations. Compiled by inductor's GPU rules (benchmarks/layout_check.py's
    ``gpu_realize_rules``), the block's backward allocates fewer float32 activation buffers
    than with scale and shift passed on as they are."""
    from torch._inductor.utils import run_and_get_code

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import layout_check

    monkeypatch.setattr(fused, "_kernel_ready", lambda: False)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    float32_activation = re.compile(r"empty_strided_cpu\(\(2, 64, 8, 8\), \([^)]*\), "
                                    r"torch\.float32\)")

    def backward_float32_buffers():
        with layout_check.gpu_realize_rules():
            _, codes = run_and_get_code(_compiled_block_step, monkeypatch, ("cpu",), "inductor",
                                        bf16=True, channels=64, groups=32)
        return len(float32_activation.findall(codes[1]))

    stored = backward_float32_buffers()
    monkeypatch.setattr(fused, "_stored", lambda t: t)
    assert stored < backward_float32_buffers()


_FROZEN_FIRST_CONV = """  # a training step, printing whether any gradient is non-zero
import torch
from difflab.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflab.models.classifier import FeatureClassifier, FeatureClassifierConfig
from difflab.models.unet import UNet2DModel, UNetConfig
torch.manual_seed(0)
if "{model}" == "unet":
    m = UNet2DModel(UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                               attention_levels=(False, True), norm_num_groups=8,
                               attention_head_dim=32))
    first, f = m.conv_in, lambda x: m(x, torch.tensor([3, 500])).sample
elif "{model}" == "autoencoder_kl":
    m = AutoencoderKL(AutoencoderKLConfig(image_size=16, block_out_channels=(16, 32)))
    first, f = m.encoder.conv_in, lambda x: m.decode(m.encode(x).latent_dist.sample()).sample
else:  # the metrics' feature classifier: nn.Sequential with its GroupNorm modules
    m = FeatureClassifier(FeatureClassifierConfig())
    first, f = m.body[0], m
m = m.to(memory_format=torch.channels_last)
first.requires_grad_(False)
x = torch.randn(2, 1, 16, 16).contiguous(memory_format=torch.channels_last)
f(x).square().mean().backward()
print(sum(p.grad.abs().sum().item() for p in m.parameters() if p.grad is not None) > 0)
"""


@pytest.mark.parametrize("model", ["unet", "autoencoder_kl", "feature_classifier"])
def test_channels_last_networks_train_with_a_frozen_first_convolution(model):
    """The realistic form of the crash above: a channels-last float32 network whose first
    convolution is frozen (fine-tuning the rest) died in its first backward before this fix
    (benchmarks/crash_sweep.py: 6 of 48 cases, all of this kind); now the step runs and the
    trainable weights get gradients. The classifier's GroupNorm modules are
    difflab.nn.fused.GroupNorm for this."""
    proc = subprocess.run([sys.executable, "-c", _FROZEN_FIRST_CONV.format(model=model)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.split()[-1] == "True"


def test_statistics_by_channel_sums_take_a_per_channel_offset():
    """The sums form's statistics and affine of ``x + d`` for a per-channel d ((C,) or (N, C):
    a convolution's bias plus a time projection) from the sums of x: in float64 the same as
    adding d first, gradients to x and d included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 4, generator=g, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    for d in (torch.randn(6, generator=g, dtype=torch.float64) * 3,
              torch.randn(2, 6, generator=g, dtype=torch.float64) * 3):
        d.requires_grad_()
        got = fused._group_var_mean_by_channel_sums(x, 3, d)
        want = torch.var_mean((x + d[..., None, None]).unflatten(1, (3, -1)), dim=(2, 3, 4),
                              correction=0)
        for a, b in zip(got, want):
            assert (a - b).abs().max() < 1e-12
        assert torch.autograd.gradcheck(
            lambda x, d: fused._group_var_mean_by_channel_sums(x, 3, d), (x, d))
    # the whole GroupNorm + SiLU on bf16 inputs (the sums' case): the offset never added to x,
    # the result that of x + d to float32 rounding
    norm = nn.GroupNorm(3, 6).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    xb = torch.randn(2, 6, 5, 4, generator=g).to(torch.bfloat16)
    d = torch.randn(2, 6, generator=g)
    want = F.silu(norm(xb.double() + d.double()[..., None, None]))
    got = fused._group_norm_by_ops(xb, norm.weight.float(), norm.bias.float(), 3, norm.eps,
                                   True, torch.float32, True, d)
    assert (got.double() - want).abs().max() < 1e-5


def test_resnet_block_hands_bias_and_time_projection_to_the_group_norm(monkeypatch):
    """Compiled with the sums form, a ResnetBlock convolves without conv1's bias and gives
    bias + time projection to the next GroupNorm (GROUP_NORM_TAKES_OFFSET): the same block as
    with the offset added first — output and every gradient as close to float64's (bf16
    autocast) — conv1 run without its bias."""
    ops = []

    def backend(gm, _inputs):  # the convolutions without a bias
        ops.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"
                       and "conv2d" in str(n.target) and len(n.args) > 2 and n.args[2] is None))
        return gm.forward

    def run(takes):
        monkeypatch.setattr(fused, "GROUP_NORM_TAKES_OFFSET", takes)
        return _compiled_block_step(monkeypatch, ("cpu",), backend, bf16=True, form="sums")

    folded, added = run(True), run(False)
    monkeypatch.setattr(fused, "COMPILED_CHANNELS_LAST_GROUP_NORM", frozenset())
    from difflab.nn.blocks import ResnetBlock

    torch.manual_seed(0)  # _compiled_block_step's block and inputs, in float64
    block = ResnetBlock(16, 16, 8, groups=4).double()
    x = torch.randn(2, 16, 8, 8).double().requires_grad_()
    temb = torch.randn(2, 8).double()
    out = block(x, temb)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out).double()).sum().backward()
    exact = [out.detach(), *[p.grad for p in block.parameters()]]
    for got_f, got_a, want in zip((folded[0], *folded[1]), (added[0], *added[1]), exact):
        scale = want.abs().max()
        err_f = float((got_f.double() - want).abs().max() / scale)
        err_a = float((got_a.double() - want).abs().max() / scale)
        assert err_f < max(2 * err_a, 2e-2), (err_f, err_a)
    assert ops == [1, 0]  # conv1 without its bias, only where the GroupNorm takes it

