"""Sampling with the network under autocast (``mixed_precision``): bf16 forward passes, the
guidance and the scheduler's update in float32; ``auto`` follows the CPU's bf16 support."""

import pytest
import torch

import difflab.perf
from difflab.errors import ConfigError
from difflab.models.unet import UNet2DModel, UNetConfig
from difflab.runs.diffusion import DiffusionModelBundle, sample_images
from difflab.training.objectives import DiffusionConfig

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(False, True),
            norm_num_groups=4, attention_head_dim=8, sample_size=8)


def _bundle(**extra):
    torch.manual_seed(0)
    unet = UNet2DModel(UNetConfig(**TINY, **extra)).eval()
    unet = unet.to(memory_format=torch.channels_last)  # as load_bundle gives it
    return DiffusionModelBundle(unet, DiffusionConfig(), {"name": "digits", "class_names": [],
                                                          "image_shape": [1, 8, 8]})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("guided", [False, True])
def test_bf16_network_output_is_the_float32_one_to_bf16_rounding(guided):
    b = _bundle(num_class_embeds=3) if guided else _bundle()
    kw = dict(scheduler="ddim", steps=1, seed=3, return_trajectory=True)
    if guided:
        kw.update(class_labels=torch.tensor([0, 1, 0, 1]), guidance_scale=3.0)
    ref = sample_images(b, 4, mixed_precision="no", **kw)
    low = sample_images(b, 4, mixed_precision="bf16", **kw)
    # same x_T (same seed), so one step compares the network's output directly
    assert torch.equal(ref.trajectory[0].x_t, low.trajectory[0].x_t)
    out_ref, out_low = ref.trajectory[0].model_output, low.trajectory[0].model_output
    assert out_low.dtype == torch.float32 and low.images.dtype == torch.float32
    assert 1e-4 < _rel(out_low, out_ref) < 3e-2  # bf16 did run, and only rounds


def test_bf16_sampling_is_deterministic():
    b = _bundle()
    one = sample_images(b, 3, scheduler="dpm++", steps=4, seed=1, mixed_precision="bf16")
    two = sample_images(b, 3, scheduler="dpm++", steps=4, seed=1, mixed_precision="bf16")
    assert torch.equal(one.images, two.images)


@pytest.mark.parametrize("has_bf16,same_as", [(True, "bf16"), (False, "no")])
def test_auto_is_bf16_exactly_where_the_cpu_multiplies_bf16(monkeypatch, has_bf16, same_as):
    monkeypatch.setattr(difflab.perf, "cpu_has_bf16_dot_products", lambda *a: has_bf16)
    b = _bundle()
    auto = sample_images(b, 2, scheduler="ddim", steps=3, seed=0, mixed_precision="auto")
    named = sample_images(b, 2, scheduler="ddim", steps=3, seed=0, mixed_precision=same_as)
    other = sample_images(b, 2, scheduler="ddim", steps=3, seed=0,
                          mixed_precision="no" if same_as == "bf16" else "bf16")
    assert torch.equal(auto.images, named.images)
    assert not torch.equal(auto.images, other.images)


def test_an_unknown_precision_is_a_clear_error():
    with pytest.raises(ConfigError, match="mixed_precision='fp8'"):
        sample_images(_bundle(), 1, steps=1, mixed_precision="fp8")
