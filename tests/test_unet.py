"""The pixel-space U-Net: diffusers parity (same names, same numbers), presets, save/load."""

import pytest
import torch

from difflab.errors import ConfigError
from difflab.models.base import load_model
from difflab.models.unet import PRESETS, UNet2DModel, UNetConfig, unet_from_preset

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(False, True),
            norm_num_groups=4, attention_head_dim=8, sample_size=8)


def _diffusers_twin(cfg: UNetConfig):
    diffusers = pytest.importorskip("diffusers")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return diffusers.UNet2DModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups, num_class_embeds=cfg.num_class_embeds,
        add_attention=cfg.mid_attention, dropout=cfg.dropout)


@pytest.mark.parametrize("extra", [{}, {"num_class_embeds": 11}, {"layers_per_block": 2,
                                   "in_channels": 3, "out_channels": 3}])
def test_matches_diffusers_unet2d(extra):
    cfg = UNetConfig(**{**TINY, **extra})
    torch.manual_seed(0)
    ref = _diffusers_twin(cfg).eval()
    ours = UNet2DModel(cfg).eval()
    assert ours.num_parameters == sum(p.numel() for p in ref.parameters())
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, same shapes
    x = torch.randn(3, cfg.in_channels, 8, 8)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([0, 5, 10]) if cfg.num_class_embeds else None
    with torch.no_grad():
        a = ours(x, t, class_labels=y).sample
        b = ref(x, t, class_labels=y).sample
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_ddpm_cifar10_preset_has_the_papers_size():
    with torch.device("meta"):
        m = unet_from_preset("ddpm-cifar10")
    assert abs(m.num_parameters - 35.7e6) / 35.7e6 < 0.005
    assert set(PRESETS) >= {"small", "ddpm-cifar10"}


def test_odd_sizes_and_scalar_timestep():
    m = UNet2DModel(UNetConfig(**TINY)).eval()
    for size in (8, 14, 28):
        out = m(torch.randn(2, 1, size, size), 10).sample
        assert out.shape == (2, 1, size, size)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    m = UNet2DModel(UNetConfig(**TINY, num_class_embeds=3)).eval()
    m.save_pretrained(tmp_path / "u")
    m2 = load_model(tmp_path / "u").eval()
    assert isinstance(m2, UNet2DModel) and m2.config == m.config
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    assert torch.equal(m(x, t, y).sample, m2(x, t, y).sample)


@pytest.mark.parametrize("bad", [dict(block_out_channels=(30, 64), attention_levels=(0, 0)),
                                 dict(attention_levels=(True,)),
                                 dict(dropout=1.5), dict(layers_per_block=0)])
def test_bad_configs_are_config_errors(bad):
    with pytest.raises(ConfigError):
        UNetConfig(**bad)


def test_class_conditional_needs_labels():
    m = UNet2DModel(UNetConfig(**TINY, num_class_embeds=3))
    with pytest.raises(ValueError, match="class_labels"):
        m(torch.randn(1, 1, 8, 8), 1)
