"""Checks that need a CUDA GPU (skipped elsewhere; benchmarks/gpu.sh runs them on a lent one):
the opt-in half-precision GroupNorm under CUDA autocast against float32, the layout-keeping
GroupNorm against PyTorch's, and a same-seed deterministic training run of a U-Net with
attention and upsampling, bit for bit."""

import pytest
import torch
from torch import nn

from difflab.data import load_dataset
from difflab.models.unet import UNet2DModel, UNetConfig
from difflab.nn import fused
from difflab.training import TrainConfig, train
from difflab.training.objectives import DiffusionConfig, DiffusionObjective

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def low_precision_group_norm():
    fused.LOW_PRECISION_GPU_GROUP_NORM = True
    yield
    fused.LOW_PRECISION_GPU_GROUP_NORM = False


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bf16_group_norm_under_autocast_matches_float32(low_precision_group_norm, layout):
    torch.manual_seed(0)
    norm = nn.GroupNorm(32, 128).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(8, 128, 16, 16, device="cuda") * 2 + 0.5).contiguous(memory_format=layout)
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fused.group_norm_silu(norm, xb)
    assert y.dtype == torch.bfloat16  # autocast alone would give float32
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (xb, norm.weight), dy)
    x32 = xb.detach().float().requires_grad_()
    y32 = torch.nn.functional.silu(norm(x32))
    dx32, dw32 = torch.autograd.grad(y32, (x32, norm.weight), dy.float())
    for got, want in ((y, y32), (dx, dx32), (dw, dw32)):
        assert ((got.float() - want).abs().max() / want.abs().max()) < 2e-2


def test_deterministic_bf16_training_is_bitwise_repeatable():
    digits = load_dataset("digits")
    cfg_unet = UNetConfig(block_out_channels=(32, 64), layers_per_block=1,
                          attention_levels=(False, True), norm_num_groups=8,
                          attention_head_dim=16, sample_size=8)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        task = DiffusionObjective(UNet2DModel(cfg_unet), DiffusionConfig())
        cfg = TrainConfig(batch_size=64, max_steps=6, warmup_steps=2, seed=0, progress=False,
                          mixed_precision="bf16", deterministic=True)
        weights.append(train(task, digits.images, digits.labels, cfg).raw_model.state_dict())
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


def test_layout_keeping_group_norm_matches_pytorchs_under_cuda_autocast():
    """fused.channels_last_group_norm_silu (what compiled channels-last models use with
    COMPILED_CHANNELS_LAST_GROUP_NORM = {"cuda"}) against PyTorch's GroupNorm on the GPU:
    float32 out under CUDA autocast, same values and gradients."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(32, 128).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(8, 128, 16, 16, device="cuda") * 2 + 0.5).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fused.channels_last_group_norm_silu(norm, x)
        y_ref = torch.nn.functional.silu(norm(x))
    assert y.dtype == y_ref.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, norm.weight, norm.bias), dy)
    want = torch.autograd.grad(y_ref, (x, norm.weight, norm.bias), dy)
    assert (y - y_ref).abs().max() < 1e-4
    for g, w in zip(got, want):
        assert ((g.float() - w.float()).abs().max() / w.float().abs().max()) < 1e-2


def test_compiled_mfu_candidate_trains_like_eager_pytorch(monkeypatch):
    """The fastest-compiling candidate of benchmarks/gpu.sh part mfu (difflab-fold-gncl-rr6:
    folded upsampling on the GPU, the layout-keeping GroupNorm, inductor's
    realize_reads_threshold=6), compiled on the GPU under bf16 autocast, against the same model
    run eagerly with PyTorch's GroupNorm and the plain upsampling: same loss, same gradients to
    bf16 accuracy. It must hold before any of the three becomes a GPU default."""
    from difflab.nn import Upsample
    from difflab.training.loop import compile_kwargs

    cfg = UNetConfig(block_out_channels=(32, 64), layers_per_block=1,
                     attention_levels=(False, True), norm_num_groups=8, attention_head_dim=16,
                     sample_size=16, dropout=0.0, in_channels=3, out_channels=3)
    torch.manual_seed(0)
    eager = UNet2DModel(cfg).cuda().to(memory_format=torch.channels_last)
    fast = UNet2DModel(cfg).cuda().to(memory_format=torch.channels_last)
    with torch.no_grad():  # off the zero-initialised output layers: every weight gets a gradient
        for p in eager.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    fast.load_state_dict(eager.state_dict())
    for m in fast.modules():
        if isinstance(m, Upsample):
            m.fold_on = frozenset({"cpu", "cuda"})
    x = torch.randn(8, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (8,), device="cuda")
    noise = torch.randn_like(x)
    monkeypatch.setattr(fused, "COMPILED_CHANNELS_LAST_GROUP_NORM", frozenset({"cuda"}))
    compiled = torch.compile(fast, **compile_kwargs("default", {"realize_reads_threshold": 6}))
    grads = []
    for net in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(net(x + noise, t).sample.float(), noise)
        params = [p for p in (eager if net is eager else fast).parameters()]
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
    (l0, g0), (l1, g1) = grads
    assert abs(l1 - l0) / l0 < 1e-2
    scale = torch.cat([a.float().flatten() for a in g0]).norm()
    diff = torch.cat([(b.float() - a.float()).flatten() for a, b in zip(g0, g1)])
    assert diff.norm() < 2e-2 * scale
    for a, b in zip(g0, g1):  # each tensor too (an attention key bias's gradient is ~0 exactly)
        assert (b.float() - a.float()).norm() <= 5e-2 * a.float().norm() + 1e-4 * scale


def test_bf16_weights_train_like_autocasts_casts_on_the_gpu():
    """--bf16-weights on CUDA (deterministic kernels, so two runs can be compared bit for bit):
    the same weights as autocast casting the float32 weights every step."""
    digits = load_dataset("digits")
    cfg_unet = UNetConfig(block_out_channels=(32, 64), layers_per_block=1,
                          attention_levels=(False, True), norm_num_groups=8,
                          attention_head_dim=16, sample_size=8)
    weights = []
    for kept in (False, True):
        torch.manual_seed(0)
        task = DiffusionObjective(UNet2DModel(cfg_unet), DiffusionConfig())
        cfg = TrainConfig(batch_size=64, max_steps=4, warmup_steps=2, seed=0, progress=False,
                          mixed_precision="bf16", deterministic=True, bf16_weights=kept)
        weights.append(train(task, digits.images, digits.labels, cfg).raw_model.state_dict())
    for k, v in weights[0].items():
        assert weights[1][k].dtype == torch.float32 and torch.equal(v, weights[1][k]), k
