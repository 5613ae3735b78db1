"""The DDPM U-Net (Ho et al. 2020, App. B; Ronneberger et al. 2015) for pixel-space diffusion.

The network ε_θ(x_t, t[, y]) predicts the *whole* noise (or v, or x₀ — the objective decides
what the output means). Layout, top to bottom:

    conv_in → down_blocks (ResnetBlock × L [+ attention], Downsample) → mid (Res, Attn, Res)
            → up_blocks (ResnetBlock × (L+1) on [h, skip] [+ attention], Upsample) → conv_out

Parameter names mirror diffusers' ``UNet2DModel`` so checkpoints map 1:1 by name
(``difflab.interop``), and a given config has the same parameter count as the peer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.config import Config, check_positive
from difflab.errors import ConfigError
from difflab.models.base import ModelMixin
from difflab.nn import (
    Downsample,
    ResnetBlock,
    SelfAttention,
    TimestepEmbedding,
    Upsample,
    dense_gradient,
    padded_conv,
    time_projections,
    timestep_embedding,
)
from difflab.nn.fused import group_norm_silu


@dataclass(kw_only=True)
class UNetConfig(Config):
    in_channels: int = 1  # image channels (1 = grayscale, 3 = RGB, 4 = SD latents)
    out_channels: int = 1  # channels of the prediction (ε, v or x₀): same as the input
    sample_size: int = 28  # training resolution (informational; any size divisible by 2^levels)
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # width per resolution level
    layers_per_block: int = 1  # ResnetBlocks per level on the way down (L+1 on the way up)
    attention_levels: tuple[bool, ...] = (False, False, True)  # self-attention per level
    mid_attention: bool = True  # attention in the bottleneck
    attention_head_dim: int | None = 32  # channels per head (None: one head)
    norm_num_groups: int = 8  # GroupNorm groups (32 in the paper; 8 suits narrow CPU models)
    dropout: float = 0.0  # dropout in ResnetBlocks (0.1 in DDPM's CIFAR-10 model)
    num_class_embeds: int | None = None  # class-conditional if set (one extra row = "no class")
    flip_sin_to_cos: bool = True  # timestep embedding convention (diffusers' default)
    freq_shift: int = 0  # timestep embedding frequency shift (diffusers' default)

    def validate(self) -> None:
        if not self.block_out_channels:
            raise ConfigError("UNetConfig.block_out_channels must not be empty")
        for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            check_positive("UNetConfig", name, getattr(self, name))
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ConfigError(
                f"UNetConfig.attention_levels has {len(self.attention_levels)} entries; "
                f"block_out_channels has {len(self.block_out_channels)}: they must match")
        attn_widths = [c for c, a in zip(self.block_out_channels, self.attention_levels) if a]
        if self.mid_attention:
            attn_widths.append(self.block_out_channels[-1])
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"UNetConfig.block_out_channels: {c} is not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
        for c in attn_widths:
            if self.attention_head_dim and c % self.attention_head_dim:
                raise ConfigError(f"UNetConfig.attention_head_dim={self.attention_head_dim} "
                                  f"does not divide width {c}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"UNetConfig.dropout={self.dropout} must be in [0, 1)")


PRESETS: dict[str, dict] = {
    # ~1.9M parameters: the CPU default for 28×28 / 32×32 images.
    "small": dict(block_out_channels=(32, 64, 128), layers_per_block=1,
                  attention_levels=(False, False, True), norm_num_groups=8),
    # The DDPM CIFAR-10 model (Ho et al. 2020; diffusers' google/ddpm-cifar10-32): ~35.7M params.
    "ddpm-cifar10": dict(in_channels=3, out_channels=3, sample_size=32,
                         block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                         attention_levels=(False, True, False, False), attention_head_dim=None,
                         norm_num_groups=32, dropout=0.1),
}


@dataclass
class UNetOutput:
    sample: torch.Tensor  # (B, out_channels, H, W)


class _Level(nn.Module):
    """One resolution level: ``resnets`` [+ ``attentions``] [+ ``downsamplers``/``upsamplers``]."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None,
                 resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        else:
            self.attentions = None
        if resample is not None:
            setattr(self, resample_name, nn.ModuleList([resample]))


class UNet2DModel(ModelMixin):
    """ε_θ(x_t, t, y): x (B, C, H, W), t scalar or (B,), class_labels (B,) → ``.sample``."""

    config_class = UNetConfig

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        temb_dim = ch[0] * 4
        groups, head = config.norm_num_groups, config.attention_head_dim

        def attn(c: int) -> SelfAttention:
            return SelfAttention(c, head_dim=head, groups=groups)

        def res(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, temb_dim, groups=groups, dropout=config.dropout)

        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.class_embedding = (nn.Embedding(config.num_class_embeds, temb_dim)
                                if config.num_class_embeds else None)

        self.down_blocks = nn.ModuleList()
        skip_channels = [ch[0]]
        cin = ch[0]
        for i, cout in enumerate(ch):
            last = i == len(ch) - 1
            resnets, attns = [], []
            for j in range(config.layers_per_block):
                resnets.append(res(cin if j == 0 else cout, cout))
                if config.attention_levels[i]:
                    attns.append(attn(cout))
                skip_channels.append(cout)
            down = None if last else Downsample(cout)
            if down is not None:
                skip_channels.append(cout)
            self.down_blocks.append(_Level(resnets, attns, down, "downsamplers"))
            cin = cout

        self.mid_block = _Level([res(ch[-1], ch[-1]), res(ch[-1], ch[-1])],
                                [attn(ch[-1])] if config.mid_attention else None, None, "")

        self.up_blocks = nn.ModuleList()
        prev = ch[-1]
        for i, cout in enumerate(reversed(ch)):
            level = len(ch) - 1 - i
            resnets, attns = [], []
            for _ in range(config.layers_per_block + 1):
                resnets.append(res(prev + skip_channels.pop(), cout))
                prev = cout
                if config.attention_levels[level]:
                    attns.append(attn(cout))
            up = Upsample(cout) if level > 0 else None
            self.up_blocks.append(_Level(resnets, attns, up, "upsamplers"))

        self.conv_norm_out = nn.GroupNorm(min(groups, ch[0]), ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None) -> UNetOutput:
        if encoder_hidden_states is not None:
            raise ValueError("UNet2DModel has no cross-attention; use UNet2DConditionModel")
        x = sample
        b = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        temb = timestep_embedding(t, self.config.block_out_channels[0],
                                  flip_sin_to_cos=self.config.flip_sin_to_cos,
                                  freq_shift=self.config.freq_shift).to(x.dtype)
        temb = self.time_embedding(temb)  # (B, 4·C0)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this U-Net is class-conditional: pass class_labels")
            temb = temb + self.class_embedding(class_labels).to(temb.dtype)

        # every residual block's time projection in one product, taken in calling order
        resnets = [r for b in (*self.down_blocks, self.mid_block, *self.up_blocks)
                   for r in b.resnets]
        projs = iter(time_projections(resnets, temb))
        h = padded_conv(self.conv_in, x)
        skips = [h]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                h = resnet(h, temb_proj=next(projs))
                if block.attentions is not None:
                    h = block.attentions[j](h)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                skips.append(h)

        h = self.mid_block.resnets[0](h, temb_proj=next(projs))
        if self.mid_block.attentions is not None:
            h = self.mid_block.attentions[0](h)
        h = self.mid_block.resnets[1](h, temb_proj=next(projs))

        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([dense_gradient(h), skips.pop()], dim=1),
                           temb_proj=next(projs))
                if block.attentions is not None:
                    h = block.attentions[j](h)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h, size=skips[-1].shape[-2:])

        return UNetOutput(padded_conv(self.conv_out, group_norm_silu(self.conv_norm_out, h)))


def unet_from_preset(name: str, **overrides: object) -> UNet2DModel:
    """Build a U-Net from a named preset (``PRESETS``), overriding any config field."""
    if name not in PRESETS:
        raise ConfigError(f"unknown U-Net preset {name!r}; choose one of {sorted(PRESETS)}")
    return UNet2DModel(UNetConfig(**{**PRESETS[name], **overrides}))
