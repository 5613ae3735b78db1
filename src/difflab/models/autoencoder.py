"""Deterministic autoencoders: an MLP / convolutional :class:`Autoencoder` and a
:class:`LinearAutoencoder` (the model that, trained to its optimum, spans the PCA subspace).

An autoencoder is an encoder e: x ↦ z ∈ R^k and a decoder d: z ↦ x̂ trained to minimise the
mean squared reconstruction error  L = mean ‖x − d(e(x))‖².

Images are ``(B, C, H, W)`` in [-1, 1]; the shape comes from the config (``in_channels``,
``image_size``). The encoder/decoder builders here are shared with :mod:`difflab.models.vae`.

Conv variant and odd sizes: each of the ``len(hidden)`` stages halves the resolution with a
stride-2 4×4 convolution, so the input is zero-padded (symmetrically) up to the next multiple of
2^len(hidden) and the decoder's output is cropped back. With ``hidden=(32, 64)``: 8→4→2,
28→14→7, 32→16→8 need no padding; with three stages 28 is padded to 32 (→16→8→4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.config import Config, check_choice
from difflab.errors import ConfigError
from difflab.models.base import ModelMixin

ARCHS = ("mlp", "conv")


def check_hidden(owner: str, hidden: tuple[int, ...]) -> None:
    """``hidden`` must be a non-empty tuple of positive ints."""
    if not isinstance(hidden, tuple) or not hidden or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise ConfigError(f"{owner}.hidden={hidden!r} must be a non-empty tuple of positive ints")


def check_int(owner: str, name: str, value: object) -> None:
    """Raise ConfigError unless ``value`` is an int > 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{owner}.{name}={value!r} must be an integer > 0")


# --------------------------------------------------------------------------------------------
# Shared encoder / decoder networks (also used by the VAE)
# --------------------------------------------------------------------------------------------

def _padded_size(image_size: int, num_stages: int) -> int:
    f = 2 ** num_stages
    return math.ceil(image_size / f) * f


class ConvEncoder(nn.Module):
    """x (B, C, S, S) → (B, out_dim): [4×4 stride-2 conv + SiLU] × len(hidden), flatten, linear."""

    def __init__(self, in_channels: int, image_size: int, hidden: tuple[int, ...],
                 out_dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.padded = _padded_size(image_size, len(hidden))
        layers: list[nn.Module] = []
        c = in_channels
        for h in hidden:
            layers += [nn.Conv2d(c, h, 4, stride=2, padding=1), nn.SiLU()]
            c = h
        self.convs = nn.Sequential(*layers)
        s = self.padded // 2 ** len(hidden)
        self.proj = nn.Linear(c * s * s, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        pad = self.padded - self.image_size
        if pad:
            x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return self.proj(self.convs(x).flatten(1))  # (B, out_dim)


class ConvDecoder(nn.Module):
    """z (B, latent_dim) → (B, out_channels, S, S): linear, then [4×4 stride-2 transposed conv]
    mirroring :class:`ConvEncoder`; the output is linear (no squashing) and cropped to S."""

    def __init__(self, latent_dim: int, image_size: int, hidden: tuple[int, ...],
                 out_channels: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.padded = _padded_size(image_size, len(hidden))
        self.s = self.padded // 2 ** len(hidden)
        self.top = hidden[-1]
        self.proj = nn.Sequential(nn.Linear(latent_dim, self.top * self.s * self.s), nn.SiLU())
        layers: list[nn.Module] = []
        widths = list(reversed(hidden))
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.ConvTranspose2d(widths[-1], out_channels, 4, stride=2, padding=1))
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = self.proj(z).view(-1, self.top, self.s, self.s)  # (B, hidden[-1], s, s)
        x = self.deconvs(h)
        pad = self.padded - self.image_size
        if pad:
            lo = pad // 2
            x = x[..., lo:lo + self.image_size, lo:lo + self.image_size]
        return x


def mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def build_encoder(arch: str, in_channels: int, image_size: int, hidden: tuple[int, ...],
                  out_dim: int) -> nn.Module:
    """Images (B, C, S, S) → (B, out_dim). ``hidden``: MLP widths or conv channels per stage."""
    if arch == "mlp":
        d = in_channels * image_size * image_size
        return nn.Sequential(nn.Flatten(1), mlp([d, *hidden, out_dim]))
    return ConvEncoder(in_channels, image_size, hidden, out_dim)


def build_decoder(arch: str, latent_dim: int, image_size: int, hidden: tuple[int, ...],
                  out_channels: int) -> nn.Module:
    """(B, latent_dim) → (B, out_channels, S, S), mirroring :func:`build_encoder`."""
    if arch == "mlp":
        d = out_channels * image_size * image_size
        return nn.Sequential(mlp([latent_dim, *reversed(hidden), d]),
                             nn.Unflatten(1, (out_channels, image_size, image_size)))
    return ConvDecoder(latent_dim, image_size, hidden, out_channels)


# --------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class AutoencoderConfig(Config):
    arch: str = "mlp"  # "mlp" (fully connected) or "conv" (stride-2 convolutions)
    in_channels: int = 1  # image channels C
    image_size: int = 28  # image height = width S
    latent_dim: int = 16  # size k of the code z
    hidden: tuple[int, ...] = (512, 256)  # MLP widths, or conv channels per stage (e.g. (32, 64))

    def validate(self) -> None:
        check_choice("AutoencoderConfig", "arch", self.arch, ARCHS)
        for name in ("in_channels", "image_size", "latent_dim"):
            check_int("AutoencoderConfig", name, getattr(self, name))
        check_hidden("AutoencoderConfig", self.hidden)


class Autoencoder(ModelMixin):
    """x̂ = d(e(x)), trained with L = mean over pixels of (x − x̂)².

    The decoder output is linear (not squashed into [-1, 1]): the loss is a plain least-squares
    fit, and clamping is left to whoever displays the images.
    """

    config_class = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoder = build_encoder(c.arch, c.in_channels, c.image_size, c.hidden, c.latent_dim)
        self.decoder = build_decoder(c.arch, c.latent_dim, c.image_size, c.hidden, c.in_channels)

    def encode(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) in [-1, 1] → z: (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """z: (B, latent_dim) → x̂: (B, C, H, W)."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def training_loss(self, batch: dict[str, Tensor],
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """{"loss": mean (x − d(e(x)))²}; deterministic, ``generator`` is unused."""
        x = batch["images"]
        loss = F.mse_loss(self(x), x)
        return {"loss": loss, "mse": loss.detach()}


# --------------------------------------------------------------------------------------------
# Linear autoencoder
# --------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class LinearAutoencoderConfig(Config):
    in_channels: int = 1  # image channels C; for plain vectors (N, D) use in_channels=D
    image_size: int = 28  # image side S; for plain vectors use image_size=1
    latent_dim: int = 16  # k, the dimension of the learned subspace
    tied: bool = False  # encoder weight = decoder weightᵀ (one matrix W)
    bias: bool = False  # learn encoder and decoder biases b_e, b_d
    center: bool = False  # subtract a stored data mean μ (call set_data_mean first), like PCA

    def validate(self) -> None:
        for name in ("in_channels", "image_size", "latent_dim"):
            check_int("LinearAutoencoderConfig", name, getattr(self, name))
        d = self.in_channels * self.image_size ** 2
        if self.latent_dim > d:
            raise ConfigError(f"LinearAutoencoderConfig.latent_dim={self.latent_dim} must be "
                              f"<= the data dimension C*S*S = {d}")
        for name in ("tied", "bias", "center"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LinearAutoencoderConfig.{name}={getattr(self, name)!r} "
                                  "must be true or false")


class LinearAutoencoder(ModelMixin):
    """z = W_e (x − μ) + b_e,   x̂ = W z + b_d + μ   (no nonlinearity; x flattened to R^D).

    ``W`` (D, k) is the decoder, whose columns are the learned basis; ``tied=True`` sets
    W_e = Wᵀ. At the minimum of mean ‖x − x̂‖², span(W) is the span of the top-k principal
    components (Baldi & Hornik 1989; Bourlard & Kamp 1988), but W itself is any basis of it
    (untied) or any orthonormal one (tied), not the PCA components. ``μ`` is a buffer set by
    :meth:`set_data_mean` (zero until then), so centring is exact rather than learned.
    """

    config_class = LinearAutoencoderConfig

    def __init__(self, config: LinearAutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        d, k = self.data_dim, config.latent_dim
        self.W = nn.Parameter(torch.randn(d, k) / math.sqrt(d))  # decoder (D, k)
        self.W_enc = None if config.tied else nn.Parameter(torch.randn(k, d) / math.sqrt(d))
        self.b_enc = nn.Parameter(torch.zeros(k)) if config.bias else None
        self.b_dec = nn.Parameter(torch.zeros(d)) if config.bias else None
        if config.center:
            self.register_buffer("data_mean", torch.zeros(d))
        else:
            self.data_mean = None

    @property
    def data_dim(self) -> int:
        return self.config.in_channels * self.config.image_size ** 2

    @property
    def basis(self) -> Tensor:
        """The decoder matrix W, (D, k): its columns span the learned subspace."""
        return self.W

    @property
    def encoder_weight(self) -> Tensor:
        """W_e, (k, D): Wᵀ when tied."""
        return self.W.T if self.W_enc is None else self.W_enc

    @torch.no_grad()
    def set_data_mean(self, x: Tensor) -> None:
        """Store μ = mean of ``x`` ((N, D) or (N, C, H, W)); needs ``center=True``."""
        if self.data_mean is None:
            raise ConfigError("LinearAutoencoder.set_data_mean needs center=True in the config")
        self.data_mean.copy_(x.reshape(len(x), -1).mean(0))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw W (and W_e) ~ N(0, 1/D) from ``generator``; zero the biases."""
        d = self.data_dim
        for p in (self.W, self.W_enc):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / math.sqrt(d))
        for b in (self.b_enc, self.b_dec):
            if b is not None:
                b.zero_()

    def encode(self, x: Tensor) -> Tensor:
        """x: (B, D) or (B, C, H, W) → z: (B, k)."""
        x = x.reshape(len(x), -1)
        if self.data_mean is not None:
            x = x - self.data_mean
        return F.linear(x, self.encoder_weight, self.b_enc)

    def decode(self, z: Tensor) -> Tensor:
        """z: (B, k) → x̂: (B, D) (flat; reshape to images if needed)."""
        x = F.linear(z, self.W, self.b_dec)
        return x if self.data_mean is None else x + self.data_mean

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction with the same shape as ``x``."""
        return self.decode(self.encode(x)).view_as(x)

    def training_loss(self, batch: dict[str, Tensor],
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """{"loss": mean (x − x̂)²}; deterministic, ``generator`` is unused. With
        ``center=True`` call :meth:`set_data_mean` on the training images first (else μ = 0)."""
        x = batch["images"]
        loss = F.mse_loss(self(x), x)
        return {"loss": loss, "mse": loss.detach()}
