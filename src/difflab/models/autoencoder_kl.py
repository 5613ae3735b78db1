"""AutoencoderKL: the KL-regularised convolutional autoencoder of latent diffusion.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", §3 and
App. G: an encoder E maps x (B, C, H, W) to q(z | x) = N(μ, diag σ²) over latents
(B, latent_channels, H/f, W/f) with f = 2^(len(block_out_channels) − 1), and a decoder D maps z
back. Diffusion then runs on z · ``scaling_factor`` (1/std of the latents, so they have unit
variance); ``encode``/``decode`` themselves never apply the scale — the pipeline multiplies after
encoding and divides before decoding, exactly as with diffusers.

The module tree mirrors diffusers' ``AutoencoderKL`` name for name (``encoder.conv_in``,
``encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut}``,
``…downsamplers.0.conv``, ``…mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``,
``…mid_block.resnets.{0,1}``, ``conv_norm_out``, ``conv_out``, ``quant_conv``,
``post_quant_conv``, ``decoder.up_blocks.{i}.resnets.{j}``, ``…upsamplers.0.conv``), and every
layer computes what diffusers' does (GroupNorm ε = 1e-6, SiLU, asymmetric (0,1,0,1) padding
before the stride-2 downsampling conv, nearest ×2 upsampling, single-head attention with a
residual). So a diffusers ``AutoencoderKL`` state_dict with ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` blocks and ``act_fn="silu"`` loads with ``load_state_dict`` unchanged; no
key mapping is needed (tests/test_autoencoder_kl.py checks outputs against diffusers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from difflab.config import Config, check_choice, check_positive
from difflab.errors import ConfigError
from difflab.models.autoencoder import check_int
from difflab.models.base import ModelMixin
from difflab.models.distributions import DiagonalGaussian
from difflab.nn import Downsample, ResnetBlock, SelfAttention, Upsample, padded_conv
from difflab.nn.fused import group_norm_silu

EPS = 1e-6  # GroupNorm ε of the LDM / diffusers VAE


@dataclass(kw_only=True)
class AutoencoderKLConfig(Config):
    in_channels: int = 1  # image channels C (the decoder outputs the same number)
    image_size: int = 28  # training image side S, divisible by f (any multiple of f runs)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # widths per level; f = 2^(len − 1)
    layers_per_block: int = 1  # ResNet blocks per encoder level (decoder: one more), SD: 2
    latent_channels: int = 4  # channels of z (SD: 4)
    norm_num_groups: int = 8  # GroupNorm groups; must divide every width (SD: 32)
    mid_block_add_attention: bool = True  # self-attention in the lowest-resolution mid block
    use_quant_conv: bool = True  # 1×1 conv on the moments (diffusers/SD have it)
    use_post_quant_conv: bool = True  # 1×1 conv on z before the decoder
    scaling_factor: float = 1.0  # 1/std of latents; set by compute_scaling_factor (SD: 0.18215)
    recon_loss: str = "l1"  # "l1" (LDM's pixel loss) or "l2"
    kl_weight: float = 1e-6  # weight of KL vs the summed pixel loss (LDM: 1e-6); see training_loss

    def validate(self) -> None:
        o = "AutoencoderKLConfig"
        for name in ("in_channels", "image_size", "layers_per_block", "latent_channels",
                     "norm_num_groups"):
            check_int(o, name, getattr(self, name))
        boc = self.block_out_channels
        if not isinstance(boc, tuple) or not boc or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in boc):
            raise ConfigError(f"{o}.block_out_channels={boc!r} must be a non-empty tuple of "
                              "positive ints")
        bad = [c for c in boc if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"{o}.norm_num_groups={self.norm_num_groups} must divide every "
                              f"block_out_channels entry; {bad} are not multiples")
        if self.image_size % self.down_factor:
            raise ConfigError(f"{o}.image_size={self.image_size} must be divisible by the down "
                              f"factor 2^(len(block_out_channels)-1) = {self.down_factor}")
        for name in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{o}.{name}={getattr(self, name)!r} must be true or false")
        check_positive(o, "scaling_factor", self.scaling_factor)
        check_choice(o, "recon_loss", self.recon_loss, ("l1", "l2"))
        check_positive(o, "kl_weight", self.kl_weight, allow_zero=True)

    @property
    def down_factor(self) -> int:
        """f: the encoder halves the resolution len(block_out_channels) − 1 times."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.down_factor


@dataclass
class AutoencoderKLOutput:
    latent_dist: DiagonalGaussian  # q(z | x) over (B, latent_channels, H/f, W/f)


@dataclass
class DecoderOutput:
    sample: Tensor  # (B, C, H, W), images in [-1, 1] scale (not clamped)


# --------------------------------------------------------------------------------------------
# Blocks: difflab.nn's U-Net blocks, which carry diffusers' names and maths (ResnetBlock2D
# without a time embedding, Downsample2D with LDM's (0, 1, 0, 1) padding, Upsample2D, Attention
# with _from_deprecated_attn_block=True: one head over all channels), at the VAE's ε
# --------------------------------------------------------------------------------------------

def _resnet(in_channels: int, out_channels: int, groups: int) -> ResnetBlock:
    """h = conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))),  out = shortcut(x) + h (He et al. 2016,
    pre-activation form); shortcut is a 1×1 conv when the width changes."""
    return ResnetBlock(in_channels, out_channels, None, groups=groups, eps=EPS)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers))
        self.downsamplers = nn.ModuleList(
            [Downsample(out_channels, padding=0)] if add_downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for block in (*self.resnets, *self.downsamplers):
            x = block(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if add_upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for block in (*self.resnets, *self.upsamplers):
            x = block(x)
        return x


class MidBlock2D(nn.Module):
    """resnet → [attention →] resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, groups),
                                      _resnet(channels, channels, groups)])
        self.attentions = nn.ModuleList(  # one head over all channels, scale 1/√C
            [SelfAttention(channels, groups=groups, eps=EPS)] if add_attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """x (B, C, H, W) → moments (B, 2·latent_channels, H/f, W/f)."""

    def __init__(self, c: AutoencoderKLConfig) -> None:
        super().__init__()
        boc, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, boc[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(boc[max(i - 1, 0)], boc[i], c.layers_per_block, g,
                               add_downsample=i < len(boc) - 1)
            for i in range(len(boc)))
        self.mid_block = MidBlock2D(boc[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, boc[-1], eps=EPS)
        self.conv_out = nn.Conv2d(boc[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = padded_conv(self.conv_in, x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return padded_conv(self.conv_out, group_norm_silu(self.conv_norm_out, h))


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) → x̂ (B, C, h·f, w·f), mirroring :class:`Encoder`."""

    def __init__(self, c: AutoencoderKLConfig) -> None:
        super().__init__()
        rev, g = tuple(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock2D(rev[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], c.layers_per_block + 1, g,
                             add_upsample=i < len(rev) - 1)
            for i in range(len(rev)))
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rev[-1], c.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(padded_conv(self.conv_in, z))
        for block in self.up_blocks:
            h = block(h)
        return padded_conv(self.conv_out, group_norm_silu(self.conv_norm_out, h))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class AutoencoderKL(ModelMixin):
    """Encoder → quant_conv → q(z|x);  z → post_quant_conv → Decoder. See the module doc."""

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        self.config = config
        lc = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if config.use_post_quant_conv else None

    def encode(self, x: Tensor) -> AutoencoderKLOutput:
        """x: (B, C, H, W) in [-1, 1] → ``.latent_dist`` = q(z|x) over (B, c_z, H/f, W/f)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussian.from_moments(moments, dim=1))

    def decode(self, z: Tensor) -> DecoderOutput:
        """z: (B, c_z, h, w), *unscaled* latents → ``.sample`` (B, C, h·f, w·f)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return DecoderOutput(sample=self.decoder(z))

    def forward(self, x: Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> DecoderOutput:
        """Reconstruct x through z = μ (or z ~ q(z|x) if ``sample_posterior``)."""
        q = self.encode(x).latent_dist
        return self.decode(q.sample(generator) if sample_posterior else q.mode())

    def training_loss(self, batch: dict[str, Tensor],
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """loss = mean over the batch of (Σ_pixels ρ(x − x̂) + kl_weight · KL(q ‖ N(0, I))) / D,
        with z ~ q(z|x) (reparameterised), ρ = |·| or (·)², D = C·H·W.

        This is LDM's objective (pixel loss summed per image plus kl_weight × KL summed over
        latent elements; its perceptual and GAN terms are left out) divided by D so the loss is
        O(1). The KL weight is tiny on purpose: the KL only keeps the latent scale bounded and
        its posterior noise mildly smooth; a β ~ 1 would trade reconstruction quality for a
        prior-shaped latent that the diffusion model is there to learn anyway. 1e-6 (LDM)
        gives almost deterministic latents; up to ~1e-4 still reconstructs well.

        Logs: "recon" = mean per-pixel |x − x̂| (or squared error), "kl" = nats per image.
        """
        x = batch["images"]
        q = self.encode(x).latent_dist
        x_hat = self.decode(q.sample(generator)).sample
        err = (x_hat - x).abs() if self.config.recon_loss == "l1" else (x_hat - x).pow(2)
        recon = err.flatten(1).mean(1)  # (B,) = Σ_pixels ρ / D
        kl = q.kl()  # (B,)
        D = x[0].numel()
        loss = (recon + self.config.kl_weight * kl / D).mean()
        return {"loss": loss, "recon": recon.mean().detach(), "kl": kl.mean().detach()}

    @torch.no_grad()
    def compute_scaling_factor(self, images: Tensor, generator: torch.Generator | None = None,
                               batch_size: int = 64) -> float:
        """Set ``config.scaling_factor`` = 1/std of z ~ q(z|x) over ``images`` (N, C, H, W) and
        return it (LDM §4.3.2 / App. G: SD v1's 0.18215 was computed this way), so that the
        scaled latents the diffusion model sees have unit variance."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            zs = [self.encode(images[i:i + batch_size].to(device)).latent_dist.sample(generator)
                  for i in range(0, len(images), batch_size)]
        finally:
            self.train(was_training)
        std = float(torch.cat([z.flatten() for z in zs]).double().std())
        self.config.scaling_factor = 1.0 / std
        return self.config.scaling_factor
