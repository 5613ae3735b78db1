"""difflab's UNet2DConditionModel is diffusers' UNet2DConditionModel, name for name and number
for number (diffusers is the oracle; tiny random models on CPU)."""

from __future__ import annotations

import pytest
import torch

from difflab.errors import ConfigError
from difflab.models.base import load_model
from difflab.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel

TINY = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            norm_num_groups=8, attention_head_dim=4)
# SD 2.x options: linear projections, heads per level, two transformer blocks per level,
# attention at every level (mid included), and float32 attention.
TINY_SD2 = dict(TINY, use_linear_projection=True, attention_head_dim=(2, 4),
                transformer_layers_per_block=(2, 1), upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def _diffusers_unet(cfg: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel as DiffusersUNet

    torch.manual_seed(seed)
    ref = DiffusersUNet(**cfg).eval()
    with torch.no_grad():  # move off the init (zero-ish biases) so every weight matters
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("cfg", [TINY, TINY_SD2], ids=["sd1", "sd2-options"])
@pytest.mark.parametrize("size", [(8, 12), (9, 13)])
def test_matches_diffusers(cfg, size):
    ref = _diffusers_unet(cfg)
    ours = UNet2DConditionModel(UNet2DConditionConfig.from_diffusers_config(dict(ref.config)))
    own_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert own_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    ctx = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        for t in (torch.tensor([3, 700]), 999, torch.tensor(412.5)):
            expected = ref(x, t, encoder_hidden_states=ctx).sample
            got = ours(x, t, encoder_hidden_states=ctx).sample
            assert got.shape == (2, 4, *size)
            assert _rel(expected, got) <= 1e-5


def test_config_json_round_trip_and_save_load(tmp_path):
    cfg = UNet2DConditionConfig.from_diffusers_config(TINY_SD2)
    assert UNet2DConditionConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    model = UNet2DConditionModel(cfg).eval()
    model.save_pretrained(tmp_path / "unet")
    loaded = load_model(tmp_path / "unet").eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert torch.equal(model(x, 10, ctx).sample, loaded(x, 10, ctx).sample)


def test_sd15_config_is_the_default():
    sd15 = dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
                _class_name="UNet2DConditionModel", _diffusers_version="0.6.0",
                act_fn="silu", center_input_sample=False, downsample_padding=1,
                flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4,
                out_channels=4)
    assert UNet2DConditionConfig.from_diffusers_config(sd15) == UNet2DConditionConfig()


@pytest.mark.parametrize("key,value", [("addition_embed_type", "text_time"),
                                       ("class_embed_type", "timestep"),
                                       ("time_cond_proj_dim", 256),
                                       ("only_cross_attention", True),
                                       ("some_future_option", 1)])
def test_unsupported_diffusers_options_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        UNet2DConditionConfig.from_diffusers_config({**TINY, key: value})


@pytest.mark.parametrize("override,field", [
    (dict(up_block_types=("UpBlock2D",)), "up_block_types"),
    (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), "down_block_types"),
    (dict(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")), "mirror"),
    (dict(attention_head_dim=5), "attention_head_dim"),
    (dict(attention_head_dim=(4, 4, 4)), "attention_head_dim"),
    (dict(norm_num_groups=7), "norm_num_groups"),
])
def test_bad_configs(override, field):
    with pytest.raises(ConfigError, match=field):
        UNet2DConditionConfig(**{**TINY, **override})


def test_needs_text_and_refuses_class_labels():
    model = UNet2DConditionModel(UNet2DConditionConfig(**TINY))
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, 1, None)
    with pytest.raises(ValueError, match="class"):
        model(x, 1, torch.randn(1, 3, 32), class_labels=torch.tensor([0]))
