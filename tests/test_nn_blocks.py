"""The U-Net blocks' fast paths compute the textbook functions: checked in float64 against the
plain formulation (nearest ×2 + 3×3 conv; per-token linears + SDPA), values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from difflab.models.unet import UNet2DModel, UNetConfig
from difflab.nn import SelfAttention, Upsample, dense_gradient, upsample_nearest2x
from difflab.nn.blocks import folded_upsample_kernel

CL = torch.channels_last


def _grads(out: torch.Tensor, go: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, go))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_folded_upsample_equals_nearest_then_conv(layout):
    torch.manual_seed(0)
    up = Upsample(6).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    if layout == "channels_last":
        up, x = up.to(memory_format=CL), x.contiguous(memory_format=CL)
    x.requires_grad_(True)
    w, b = up.conv.weight, up.conv.bias
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    out = up(x)
    assert out.shape == (2, 6, 10, 14)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(ref)
    for g, g_ref in zip(_grads(out, go, x, w, b), _grads(ref, go, x, w, b)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_folded_kernel_is_the_per_axis_tap_sum():
    w = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    w[0, 0, :, 1] = torch.tensor([1.0, 10.0, 100.0])  # taps along y only (centre column)
    k = folded_upsample_kernel(w)[0, 0]
    # along y: (w₂, w₁+w₂, w₀+w₁, w₀); along x the centre tap lands in the two middle columns
    torch.testing.assert_close(k[:, 1], torch.tensor([100.0, 110.0, 11.0, 1.0], dtype=w.dtype))
    torch.testing.assert_close(k[:, 2], k[:, 1])
    assert k[:, 0].abs().sum() == 0 and k[:, 3].abs().sum() == 0


def test_upsample_to_an_odd_size_keeps_the_plain_path():
    torch.manual_seed(0)
    up = Upsample(4).double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    out = up(x, size=(7, 7))
    ref = up.conv(F.interpolate(x, size=(7, 7), mode="nearest"))
    assert out.shape == (1, 4, 7, 7)
    torch.testing.assert_close(out, ref)


def _plain_attention(m: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    tok = m.group_norm(x).flatten(2).transpose(1, 2)
    q, k, v = (p(tok).unflatten(-1, (m.heads, -1)).transpose(1, 2)
               for p in (m.to_q, m.to_k, m.to_v))
    att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
    out = m.to_out[0](att.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(b, c, h, w)
    return out + x


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_self_attention_equals_the_token_formulation(layout):
    torch.manual_seed(0)
    m = SelfAttention(16, head_dim=4, groups=4).double()
    for p in m.parameters():  # non-trivial norm affine and biases
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    if layout == "channels_last":
        m, x = m.to(memory_format=CL), x.contiguous(memory_format=CL)
    x.requires_grad_(True)
    out, ref = m(x), _plain_attention(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=CL if layout == "channels_last" else
                             torch.contiguous_format)
    go = torch.randn_like(ref)
    params = [m.to_q.weight, m.to_k.bias, m.to_v.weight, m.to_out[0].weight, m.group_norm.weight]
    for g, g_ref in zip(_grads(out, go, x, *params), _grads(ref, go, x, *params)):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_self_attention_under_cpu_bf16_autocast_is_close_and_differentiable():
    torch.manual_seed(0)
    m = SelfAttention(32, head_dim=8, groups=8)
    x = torch.randn(4, 32, 7, 7, requires_grad=True)
    ref = _plain_attention(m.double(), x.double()).float()
    m.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    out.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_fold_on_selects_the_path_per_instance():
    torch.manual_seed(0)
    up = Upsample(4).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    folded = up(x)
    up.fold_on = frozenset()  # this instance: plain nearest + conv on every device
    plain = up(x)
    assert Upsample.fold_on == frozenset({"cpu"})  # the class default is untouched
    torch.testing.assert_close(folded, plain, rtol=1e-12, atol=1e-12)
    with torch.profiler.profile() as prof:
        up(x)
    assert not any("conv_transpose" in e.key for e in prof.key_averages())


def test_fold_compiled_on_folds_only_inside_torch_compile():
    """CUDA folds the upsampling in compiled models only (``Upsample.fold_compiled_on``):
    checked here with the CPU put in its place — eager runs the plain pair, the traced graph
    the folded transposed convolution, with the same numbers."""
    torch.manual_seed(0)
    up = Upsample(4).double()
    up.fold_on, up.fold_compiled_on = frozenset(), frozenset({"cpu"})
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    assert not up.folds("cpu")
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(up, backend=backend, fullgraph=True)(x)
    assert len(graphs) == 1 and "conv_transpose2d" in graphs[0]
    torch.testing.assert_close(out, up(x), rtol=1e-12, atol=1e-12)
    assert Upsample.fold_compiled_on == frozenset({"cuda"})  # the class default is untouched


def _dense_in(t: torch.Tensor, fmt: torch.memory_format) -> bool:
    return t.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dense_gradient_is_the_identity_with_a_dense_gradient(layout):
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    b = torch.randn(2, 5, 4, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    out, ref = torch.cat([dense_gradient(a), b], dim=1), torch.cat([a, b], dim=1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    go = torch.randn_like(ref).contiguous(memory_format=fmt)
    (ga, gb), (ga_ref, gb_ref) = _grads(out, go, a, b), _grads(ref, go, a, b)
    torch.testing.assert_close(ga, ga_ref, rtol=0, atol=0)
    torch.testing.assert_close(gb, gb_ref, rtol=0, atol=0)
    # torch.cat's backward gives channel slices of the incoming gradient: not dense
    assert not _dense_in(ga_ref, fmt) and not _dense_in(gb, fmt)
    assert _dense_in(ga, fmt)
    assert torch.autograd.gradcheck(dense_gradient, (a,))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_upsample_nearest2x_is_interpolate_with_a_layout_keeping_backward(layout):
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    out, ref = upsample_nearest2x(x), F.interpolate(x, scale_factor=2.0, mode="nearest")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    go = torch.randn_like(ref).contiguous(memory_format=fmt)
    (g,), (g_ref,) = _grads(out, go, x), _grads(ref, go, x)
    torch.testing.assert_close(g, g_ref, rtol=1e-15, atol=1e-15)
    # the sum over each pixel's 2×2 copies, written out
    torch.testing.assert_close(g, go.unflatten(3, (5, 2)).unflatten(2, (4, 2)).sum((3, 5)))
    assert _dense_in(g, fmt)
    assert torch.autograd.gradcheck(upsample_nearest2x, (x,))
    with torch.no_grad():  # no autograd node where no gradient is wanted
        assert upsample_nearest2x(x).grad_fn is None and dense_gradient(x) is x


def _conv_backward_formats(graph: torch.fx.Graph) -> list[tuple[bool, bool]]:
    """(incoming gradient dense channels-last, input dense channels-last) per convolution
    backward of an AOT backward graph."""
    out = []
    for n in graph.nodes:
        if n.target is torch.ops.aten.convolution_backward.default:
            grad, inp = n.args[0].meta["val"], n.args[1].meta["val"]
            out.append((_dense_in(grad, CL), _dense_in(inp, CL)))
    return out


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "nearest"])
def test_unet_backward_hands_every_convolution_a_dense_channels_last_gradient(fold):
    """What torch.compile sees: in the traced backward graph, every convolution backward gets its
    incoming gradient dense in its input's (channels-last) layout, so no convolution backward
    copies it. The skip concatenation's (channel slices: strided) and the nearest upsampling's (a
    scatter into NCHW) were not: 25 of the 77 in the DDPM-CIFAR-10 preset."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.Graph] = []

    def keep_backward(gm, _inputs):
        graphs.append(gm.graph)
        return make_boxed_func(gm.forward)

    torch.manual_seed(0)
    cfg = UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
                     attention_levels=(False, True), norm_num_groups=8, attention_head_dim=32)
    model = UNet2DModel(cfg).to(memory_format=CL)
    if not fold:
        for m in model.modules():
            if isinstance(m, Upsample):
                m.fold_on = frozenset()
    x = torch.randn(2, 1, 16, 16).contiguous(memory_format=CL)
    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           bw_compiler=keep_backward)
    torch._dynamo.reset()
    out = torch.compile(model, backend=backend, fullgraph=True)(x, torch.tensor([3, 700])).sample
    (out * torch.randn_like(out)).sum().backward()
    torch._dynamo.reset()
    formats = _conv_backward_formats(graphs[-1])
    assert len(formats) == 47  # every convolution of this U-Net (a folded upsampler counts as one)
    assert all(inp for _, inp in formats)
    assert all(grad for grad, _ in formats), formats


def test_every_attention_runs_sdpa_in_float32_under_cpu_bf16(monkeypatch):
    """The U-Net's self-attention and the transformer's self/cross-attention all go through
    ``attention``: under CPU bf16 autocast SDPA sees float32 (its bf16 backward is ~6× slower
    there), and the result comes back in bf16."""
    from difflab.nn.transformer import Attention

    seen: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 5, 24)
    self_attn = Attention(32, heads=4, head_dim=8)
    cross_attn = Attention(32, heads=4, head_dim=8, context_dim=24)
    with torch.autocast("cpu", torch.bfloat16):
        outs = [self_attn(x), cross_attn(x, ctx),
                SelfAttention(32, head_dim=8)(x.reshape(2, 32, 4, 4))]
    assert seen == [torch.float32] * 3
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16  # (the U-Net's adds its fp32 input)
    with torch.no_grad():  # and the same numbers as float32 attention, to bf16 precision
        torch.testing.assert_close(outs[1].float(), cross_attn(x, ctx), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("model", ["unet", "unet_condition"])
def test_time_projections_in_one_product_are_the_blocks_own(monkeypatch, model):
    """The U-Nets project the time embedding for every residual block in one matrix product
    (stacked weights; CUDA's default, switched on for the CPU here): in float64 each block gets
    what its own ``time_emb_proj(silu(temb))`` gives, and the model's output and every
    parameter's gradient equal the block-by-block computation's."""
    from difflab.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
    from difflab.nn import ResnetBlock, blocks, time_projections

    torch.manual_seed(0)
    if model == "unet":
        net = UNet2DModel(UNetConfig(sample_size=8, block_out_channels=(8, 16),
                                     attention_levels=(False, True), norm_num_groups=4,
                                     attention_head_dim=8, layers_per_block=1)).double()
        extra = {}
    else:
        net = UNet2DConditionModel(UNet2DConditionConfig(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
            norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2)).double()
        extra = {"encoder_hidden_states": torch.randn(2, 3, 12, dtype=torch.float64)}
    resnets = [m for m in net.modules() if isinstance(m, ResnetBlock)]
    for r in resnets:  # diffusers-style zero init would hide a mix-up: random projections
        torch.nn.init.normal_(r.time_emb_proj.weight, std=0.5)
        torch.nn.init.normal_(r.time_emb_proj.bias)
    temb = torch.randn(2, resnets[0].time_emb_proj.in_features, dtype=torch.float64)
    monkeypatch.setattr(blocks, "GROUPED_TIME_PROJECTIONS", frozenset({"cpu"}))
    for r, p in zip(resnets, time_projections(resnets, temb)):
        torch.testing.assert_close(p, r.time_emb_proj(F.silu(temb)), rtol=0, atol=1e-12)
    x = torch.randn(2, net.config.in_channels, 8, 8, dtype=torch.float64)

    def run(grouped):
        monkeypatch.setattr(blocks, "GROUPED_TIME_PROJECTIONS",
                            frozenset({"cpu"}) if grouped else frozenset())
        net.zero_grad()
        out = net(x, torch.tensor([3, 700]), **extra).sample
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    (out, grads), (out_split, grads_split) = run(True), run(False)
    torch.testing.assert_close(out, out_split, rtol=0, atol=1e-12)
    assert grads.keys() == grads_split.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_split[name], rtol=1e-10, atol=1e-12, msg=name)
    assert all(grads[f"{n}.time_emb_proj.weight"].abs().sum() > 0  # every block's reached
               for n, m in net.named_modules() if isinstance(m, ResnetBlock))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("cin,cout,bias", [(3, 16, True), (16, 3, True), (3, 5, False),
                                           (4, 12, True), (8, 16, True)])
def test_padded_conv_is_the_convolution(monkeypatch, layout, cin, cout, bias):
    """A convolution with its channels zero-padded to multiples of 8 (switched on for the CPU
    here) gives, in float64, the plain convolution's output and input, weight and bias
    gradients, in their own shapes; the output is dense in the input's layout."""
    from difflab.nn import blocks, padded_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=bias).double()
    x = torch.randn(2, cin, 6, 5, dtype=torch.float64)
    if layout == "channels_last":
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run(padded):
        monkeypatch.setattr(blocks, "PADDED_NARROW_CONVOLUTIONS",
                            frozenset({"cpu"}) if padded else frozenset())
        conv.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = padded_conv(conv, xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), xi.grad, [p.grad.clone() for p in conv.parameters()]

    (out, gx, gp), (want, want_gx, want_gp) = run(True), run(False)
    assert out.shape == want.shape == (2, cout, 6, 5) and gx.shape == x.shape
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, want_gx, rtol=0, atol=1e-12)
    for g, w in zip(gp, want_gp):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                             else torch.contiguous_format)


@pytest.mark.parametrize("model", ["unet", "unet_condition", "autoencoder_kl", "clip_image"])
def test_models_pad_their_narrow_convolutions_to_the_same_numbers(monkeypatch, model):
    """With padding on (the CPU here), the convolutions that take or give an image's or a
    latent's channels run padded to 8 — an RGB U-Net's first and last (3 channels), a latent
    U-Net's (4), the autoencoder's four (3 and 4 channels in, 3 out; its 8 moments are left
    alone), CLIP's image tower's first (3): the output and every parameter's gradient equal the
    unpadded model's in float64, and the state dict keeps its shapes."""
    from difflab.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from difflab.models.clip import CLIPConfig, ImageEncoder
    from difflab.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
    from difflab.nn import blocks

    torch.manual_seed(0)
    if model == "unet":
        net = UNet2DModel(UNetConfig(sample_size=8, block_out_channels=(8, 16),
                                     attention_levels=(False, True), norm_num_groups=4,
                                     attention_head_dim=8, layers_per_block=1,
                                     in_channels=3, out_channels=3)).double()
        fn = lambda x: net(x, torch.tensor([3, 700])).sample  # noqa: E731
        padded_shapes = {(8, 3, 3, 3): (8, 8, 3, 3), (3, 8, 3, 3): (8, 8, 3, 3)}
    elif model == "unet_condition":
        net = UNet2DConditionModel(UNet2DConditionConfig(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
            norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2)).double()
        ctx = torch.randn(2, 3, 12, dtype=torch.float64)
        fn = lambda x: net(x, torch.tensor([3, 700]), encoder_hidden_states=ctx).sample  # noqa
        padded_shapes = {(8, 4, 3, 3): (8, 8, 3, 3), (4, 8, 3, 3): (8, 8, 3, 3)}
    elif model == "autoencoder_kl":
        net = AutoencoderKL(AutoencoderKLConfig(in_channels=3, image_size=8,
                                                block_out_channels=(8, 16), norm_num_groups=4,
                                                latent_channels=4)).double()
        fn = lambda x: net(x).sample  # noqa: E731
        padded_shapes = {(8, 3, 3, 3): (8, 8, 3, 3), (16, 4, 3, 3): (16, 8, 3, 3),
                         (3, 8, 3, 3): (8, 8, 3, 3)}
    else:
        net = ImageEncoder(CLIPConfig(in_channels=3, image_channels=(8, 16),
                                      norm_num_groups=4)).double()
        fn = net
        padded_shapes = {(8, 3, 3, 3): (8, 8, 3, 3)}
    for m in net.modules():  # (zero-initialised output layers would hide a mix-up)
        if isinstance(m, torch.nn.Conv2d) and not m.weight.abs().sum():
            torch.nn.init.normal_(m.weight)
    in_channels = 4 if model == "unet_condition" else 3
    x = torch.randn(2, in_channels, 8, 8, dtype=torch.float64)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    calls = []  # the weight shapes the convolutions run with
    conv_forward = torch.nn.Conv2d._conv_forward
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", lambda self, inp, w, b:
                        calls.append(tuple(w.shape)) or conv_forward(self, inp, w, b))

    def run(padded):
        monkeypatch.setattr(blocks, "PADDED_NARROW_CONVOLUTIONS",
                            frozenset({"cpu"}) if padded else frozenset())
        net.zero_grad()
        calls.clear()
        out = fn(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}, list(calls)

    (out, grads, padded), (want, want_grads, plain) = run(True), run(False)
    assert padded == [padded_shapes.get(s, s) for s in plain]
    assert sum(s in padded_shapes for s in plain) == len(padded_shapes)  # each one ran
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    assert {k: v.shape for k, v in net.state_dict().items()} == shapes
