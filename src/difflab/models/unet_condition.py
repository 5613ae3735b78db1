"""The text-conditioned U-Net of latent diffusion / Stable Diffusion v1.x (Rombach et al. 2022).

ε_θ(z_t, t, τ_θ(y)) on latents z (B, 4, H/8, W/8). It is the DDPM U-Net (``models/unet.py``) with
a spatial transformer (``nn/transformer.py``) after every ResnetBlock of the attention levels,
whose cross-attention reads the text embeddings ``encoder_hidden_states`` (B, 77, D):

    conv_in → down_blocks: (ResnetBlock → Transformer2D) × L, Downsample   CrossAttnDownBlock2D
                           ResnetBlock × L                                 DownBlock2D (lowest)
            → mid_block:   ResnetBlock → Transformer2D → ResnetBlock       UNetMidBlock2DCrossAttn
            → up_blocks:   ResnetBlock × (L+1) on [h, skip], Upsample      UpBlock2D
                           (ResnetBlock → Transformer2D) × (L+1), Upsample CrossAttnUpBlock2D
            → GroupNorm → SiLU → conv_out

Parameter names are diffusers' ``UNet2DConditionModel`` names, so diffusers weights load with
``load_state_dict`` as they are; ``difflab.interop`` maps the original LDM names onto them. SD v1:
block_out_channels (320, 640, 1280, 1280), 2 layers per block, 8 heads, cross_attention_dim 768,
859.5M parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difflab.config import Config, check_choice, check_positive
from difflab.errors import ConfigError
from difflab.models.base import ModelMixin
from difflab.nn import (
    Downsample,
    ResnetBlock,
    TimestepEmbedding,
    Upsample,
    dense_gradient,
    padded_conv,
    time_projections,
    timestep_embedding,
)
from difflab.nn.fused import group_norm_silu
from difflab.nn.transformer import Transformer2D

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn",)


@dataclass(kw_only=True)
class UNet2DConditionConfig(Config):
    in_channels: int = 4  # latent channels (SD: 4)
    out_channels: int = 4  # channels of the prediction (ε or v)
    sample_size: int = 64  # training latent side (SD v1: 64 = 512 px / 8); informational
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"  # the only mid block difflab has
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width per level
    layers_per_block: int = 2  # ResnetBlocks per level going down (L+1 going up)
    # The NUMBER of attention heads per level (an int: the same everywhere). diffusers calls it
    # attention_head_dim for historical reasons (diffusers issue #2011); SD v1 has 8 heads.
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768  # width D of the text embeddings (SD v1: CLIP ViT-L, 768)
    transformer_layers_per_block: int | tuple[int, ...] = 1  # transformer blocks per Transformer2D
    use_linear_projection: bool = False  # proj_in/out as Linear (SD 2.x) instead of 1×1 conv
    upcast_attention: bool = False  # attention in float32 (SD 2.1 in fp16)
    norm_num_groups: int = 32  # GroupNorm groups in ResnetBlocks and Transformer2D
    norm_eps: float = 1e-5  # GroupNorm ε of the ResnetBlocks and the output norm
    flip_sin_to_cos: bool = True  # timestep embedding: [cos, sin] (SD's convention)
    freq_shift: int = 0  # timestep embedding frequency shift (SD: 0)
    dropout: float = 0.0  # dropout in ResnetBlocks and transformer blocks

    def validate(self) -> None:
        o = "UNet2DConditionConfig"
        n = len(self.block_out_channels)
        for name in ("attention_head_dim", "transformer_layers_per_block"):  # JSON lists
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        if not n:
            raise ConfigError(f"{o}.block_out_channels must not be empty")
        for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups",
                     "cross_attention_dim"):
            check_positive(o, name, getattr(self, name))
        for name, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
            types = getattr(self, name)
            if len(types) != n:
                raise ConfigError(f"{o}.{name} has {len(types)} entries; block_out_channels has "
                                  f"{n}: they must match")
            for t in types:
                check_choice(o, name, t, allowed)
        check_choice(o, "mid_block_type", self.mid_block_type, MID_TYPES)
        down_attn = [t.startswith("CrossAttn") for t in self.down_block_types]
        up_attn = [t.startswith("CrossAttn") for t in reversed(self.up_block_types)]
        if down_attn != up_attn:
            raise ConfigError(f"{o}: up_block_types must mirror down_block_types (cross-attention "
                              f"at the same levels); got {self.down_block_types} and "
                              f"{self.up_block_types}")
        for name in ("attention_head_dim", "transformer_layers_per_block"):
            v = getattr(self, name)
            values = v if isinstance(v, tuple) else (v,)
            if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in values):
                raise ConfigError(f"{o}.{name}={v!r} must be a positive int or one per level")
            if isinstance(v, tuple) and len(v) != n:
                raise ConfigError(f"{o}.{name} has {len(v)} entries; block_out_channels has {n}")
        for c, heads in zip(self.block_out_channels, self.heads):
            if c % self.norm_num_groups:
                raise ConfigError(f"{o}.norm_num_groups={self.norm_num_groups} does not divide "
                                  f"width {c}")
            if c % heads:
                raise ConfigError(f"{o}.attention_head_dim={self.attention_head_dim}: {heads} "
                                  f"heads do not divide width {c}")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level."""
        v = self.attention_head_dim
        return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        v = self.transformer_layers_per_block
        return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    # ------------------------------------------------------------- diffusers' config.json

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> UNet2DConditionConfig:
        """Build from a diffusers ``unet/config.json`` dict; an option difflab does not
        implement (set to anything but its default) is a ConfigError naming the key."""
        own = {f for f in cls.__dataclass_fields__}
        kwargs = {}
        for key, value in {**DIFFUSERS_DEFAULTS, **cfg}.items():
            if key.startswith("_"):
                continue
            if key == "cross_attention_dim" and isinstance(value, list):  # one per level
                if len(set(value)) != 1:
                    raise ConfigError(f"unet config: cross_attention_dim={value!r}: difflab's "
                                      "U-Net attends to one width at every level")
                kwargs[key] = value[0]
            elif key in own:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in DIFFUSERS_FIXED:
                allowed = DIFFUSERS_FIXED[key]
                per_level = isinstance(value, list) and all(v == allowed for v in value)
                if value != allowed and not per_level:
                    raise ConfigError(f"unet config: {key}={value!r} is not supported by "
                                      f"difflab's UNet2DConditionModel (allowed: {allowed!r})")
            else:
                raise ConfigError(f"unet config: unknown key {key!r}")
        if kwargs.get("sample_size") is None:
            kwargs.pop("sample_size", None)
        elif isinstance(kwargs["sample_size"], tuple):
            kwargs["sample_size"] = kwargs["sample_size"][0]
        if kwargs.get("norm_num_groups") is None and "norm_num_groups" in kwargs:
            raise ConfigError("unet config: norm_num_groups=None (no output norm) is not supported")
        return cls(**kwargs)


# diffusers' defaults where difflab's differ, for keys a config may lack.
DIFFUSERS_DEFAULTS: dict[str, Any] = {"cross_attention_dim": 1280}

# diffusers keys that difflab does not implement: accepted only at these (default) values
# (or a list of them, one per level).
DIFFUSERS_FIXED: dict[str, Any] = {
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "act_fn": "silu", "only_cross_attention": False, "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_attention_heads": None,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}


@dataclass
class UNet2DConditionOutput:
    sample: Tensor  # (B, out_channels, H, W)


# --------------------------------------------------------------------------------------------
# The levels
# --------------------------------------------------------------------------------------------

class DownBlock(nn.Module):
    """(ResnetBlock [→ Transformer2D]) × L [→ Downsample]; returns h and the skip tensors."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[Transformer2D],
                 downsample: Downsample | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None

    def forward(self, h: Tensor, projs: Iterator[Tensor], context: Tensor
                ) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb_proj=next(projs))
            if self.attentions is not None:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """(ResnetBlock on [h, skip] [→ Transformer2D]) × (L+1) [→ Upsample to the next skip]."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[Transformer2D],
                 upsample: Upsample | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(self, h: Tensor, skips: list[Tensor], projs: Iterator[Tensor],
                context: Tensor) -> Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([dense_gradient(h), skips.pop()], dim=1), temb_proj=next(projs))
            if self.attentions is not None:
                h = self.attentions[j](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size=skips[-1].shape[-2:])
        return h


class MidBlock(nn.Module):
    """ResnetBlock → Transformer2D → ResnetBlock at the lowest resolution."""

    def __init__(self, resnets: list[ResnetBlock], attention: Transformer2D) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention])

    def forward(self, h: Tensor, projs: Iterator[Tensor], context: Tensor) -> Tensor:
        h = self.resnets[0](h, temb_proj=next(projs))
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb_proj=next(projs))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class UNet2DConditionModel(ModelMixin):
    """ε_θ(z_t, t, c): sample (B, C, H, W), timestep scalar or (B,), encoder_hidden_states
    (B, M, cross_attention_dim) → ``.sample`` (B, out_channels, H, W)."""

    config_class = UNet2DConditionConfig

    def __init__(self, config: UNet2DConditionConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        ch, heads, depth = c.block_out_channels, c.heads, c.transformer_layers
        temb_dim = 4 * ch[0]
        has_attn = [t.startswith("CrossAttn") for t in c.down_block_types]

        def res(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, temb_dim, groups=c.norm_num_groups, eps=c.norm_eps,
                               dropout=c.dropout)

        def attn(width: int, level: int) -> Transformer2D:
            return Transformer2D(width, heads[level], c.cross_attention_dim,
                                 num_layers=depth[level], groups=c.norm_num_groups,
                                 use_linear_projection=c.use_linear_projection,
                                 dropout=c.dropout, upcast=c.upcast_attention)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)

        self.down_blocks = nn.ModuleList()
        skip_channels, cin = [ch[0]], ch[0]
        for i, cout in enumerate(ch):
            resnets = [res(cin if j == 0 else cout, cout) for j in range(c.layers_per_block)]
            attns = [attn(cout, i) for _ in resnets] if has_attn[i] else []
            skip_channels += [cout] * c.layers_per_block
            down = Downsample(cout) if i < len(ch) - 1 else None
            if down is not None:
                skip_channels.append(cout)
            self.down_blocks.append(DownBlock(resnets, attns, down))
            cin = cout

        self.mid_block = MidBlock([res(ch[-1], ch[-1]), res(ch[-1], ch[-1])],
                                  attn(ch[-1], len(ch) - 1))

        self.up_blocks = nn.ModuleList()
        prev = ch[-1]
        for level in reversed(range(len(ch))):
            cout = ch[level]
            resnets = []
            for _ in range(c.layers_per_block + 1):
                resnets.append(res(prev + skip_channels.pop(), cout))
                prev = cout
            attns = [attn(cout, level) for _ in resnets] if has_attn[level] else []
            self.up_blocks.append(UpBlock(resnets, attns, Upsample(cout) if level > 0 else None))

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, sample: Tensor, timestep: Tensor | float | int,
                encoder_hidden_states: Tensor, class_labels: Tensor | None = None
                ) -> UNet2DConditionOutput:
        if class_labels is not None:
            raise ValueError("UNet2DConditionModel has no class embedding; pass class_labels=None")
        if encoder_hidden_states is None:
            raise ValueError("UNet2DConditionModel needs encoder_hidden_states (B, M, D)")
        x, context = sample, encoder_hidden_states
        t = torch.as_tensor(timestep, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = timestep_embedding(t, self.config.block_out_channels[0],
                                  flip_sin_to_cos=self.config.flip_sin_to_cos,
                                  freq_shift=self.config.freq_shift).to(x.dtype)
        temb = self.time_embedding(temb)  # (B, 4·C0)

        # every residual block's time projection in one product, taken in calling order
        resnets = [r for b in (*self.down_blocks, self.mid_block, *self.up_blocks)
                   for r in b.resnets]
        projs = iter(time_projections(resnets, temb))
        h = padded_conv(self.conv_in, x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, projs, context)
            skips += block_skips
        h = self.mid_block(h, projs, context)
        for block in self.up_blocks:
            h = block(h, skips, projs, context)
        out = padded_conv(self.conv_out, group_norm_silu(self.conv_norm_out, h))
        return UNet2DConditionOutput(out)
