"""Variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").

Model:  p(z) = N(0, I),   p(x | z) = likelihood with parameters f(z) (the decoder),
        q(z | x) = N(μ(x), diag σ²(x)) (the encoder), sampled as z = μ + σ ⊙ ε, ε ~ N(0, I).

ELBO:   log p(x) ≥ E_q[log p(x | z)] − KL(q(z | x) ‖ p(z)).
Training minimises, per image,  recon + β · KL  (β-VAE, Higgins et al. 2017; β = 1 is the ELBO),
with the KL in closed form and one reparameterised sample for the reconstruction term.

What the likelihood is defined on (``likelihood_targets``), with batch images x ∈ [-1, 1]:

* ``"bernoulli"`` — binarised pixels t ∈ {0, 1} with p = (x + 1)/2:
  ``binarize="dynamic"`` draws t ~ Bernoulli(p) afresh each time (Salakhutdinov & Murray 2008,
  as in the IWAE paper), ``"threshold"`` uses t = [p > ½] (a fixed binarisation).
  recon = −log p(t | z) = binary cross-entropy with logits f(z); exact, in nats.
* ``"gaussian"`` — intensities t ∈ {0, 1/(L−1), …, 1} (x rescaled to [0, 1] and snapped to the
  L = ``num_levels`` levels, 256 for 8-bit images, 17 for scikit-learn's digits). The decoder
  gives a mean f(z) on the [0, 1] scale and the variance is fixed, σ² = 1/(2C). Training uses
  the classic objective  C ‖t − f(z)‖² + β · KL,  which is −log N(t; f(z), σ² I) up to a constant
  — a *continuous density*. Its value is not a likelihood of 8-bit data (a density on a discrete
  set can be made arbitrarily large), so the reported log p(t | z) (:meth:`VAE.log_px_given_z`,
  used by ELBO/IWAE) is the **discretised Gaussian** with the same μ = f(z) and σ: the mass of
  each level's bin, edges to ±∞. That is a proper distribution on the L levels, so nats and
  bits/dim are honest without dequantisation. (For σ much smaller than the bin width the two
  objectives differ; for the usual σ ≫ 1/(L−1) they agree to first order, so training the
  continuous surrogate is fine.)

In training and in the likelihood bounds the encoder sees 2t − 1, the data the likelihood is
about, rescaled to [-1, 1]. The latent-space tools (``forward``, :meth:`VAE.interpolate`, codes
for plots and the AE-vs-VAE scores) encode the image x itself: for Bernoulli, the mean of 2t − 1
rather than one random binarisation (its codes differ from a binarised image's by about half a
posterior σ on 2-D mnist5k; deterministic, and the same for every model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.config import Config, check_choice, check_positive
from difflab.errors import ConfigError
from difflab.models.autoencoder import ARCHS, build_decoder, build_encoder, check_hidden, check_int
from difflab.models.base import ModelMixin
from difflab.models.distributions import (
    DiagonalGaussian,
    discretized_gaussian_log_likelihood,
    rand_tensor,
    randn_tensor,
)

LIKELIHOODS = ("gaussian", "bernoulli")
BINARIZE = ("dynamic", "threshold")


@dataclass(kw_only=True)
class VAEConfig(Config):
    arch: str = "mlp"  # "mlp" or "conv" (same networks as Autoencoder)
    in_channels: int = 1  # image channels C
    image_size: int = 28  # image side S
    latent_dim: int = 16  # dimension of z
    hidden: tuple[int, ...] = (512, 256)  # MLP widths, or conv channels per stage (e.g. (32, 64))
    likelihood: str = "gaussian"  # p(x|z): "gaussian" (fixed σ² = 1/(2C)) or "bernoulli"
    C: float = 50.0  # weight of ‖t − f(z)‖² (t in [0, 1]); σ² = 1/(2C), so 50 ↔ σ = 0.1
    beta: float = 1.0  # β-VAE weight on the KL; 1 = the ELBO
    binarize: str = "dynamic"  # bernoulli only: "dynamic" (resample) or "threshold" (p > ½)
    num_levels: int = 256  # gaussian only: intensity levels of the data (256 = 8-bit)

    def validate(self) -> None:
        o = "VAEConfig"
        check_choice(o, "arch", self.arch, ARCHS)
        for name in ("in_channels", "image_size", "latent_dim"):
            check_int(o, name, getattr(self, name))
        check_hidden(o, self.hidden)
        check_choice(o, "likelihood", self.likelihood, LIKELIHOODS)
        check_positive(o, "C", self.C)
        check_positive(o, "beta", self.beta, allow_zero=True)
        check_choice(o, "binarize", self.binarize, BINARIZE)
        check_int(o, "num_levels", self.num_levels)
        if self.num_levels < 2:
            raise ConfigError(f"{o}.num_levels={self.num_levels} must be >= 2")


class VAE(ModelMixin):
    """Gaussian-encoder VAE with a Bernoulli or (discretised) Gaussian decoder; see module doc."""

    config_class = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoder = build_encoder(c.arch, c.in_channels, c.image_size, c.hidden,
                                     2 * c.latent_dim)  # → [μ, log σ²]
        self.decoder = build_decoder(c.arch, c.latent_dim, c.image_size, c.hidden, c.in_channels)

    # ---- shapes and what is modelled --------------------------------------------------------

    @property
    def data_dim(self) -> int:
        """D = C·H·W, the number of modelled dimensions (for bits/dim)."""
        return self.config.in_channels * self.config.image_size ** 2

    @property
    def sigma(self) -> float:
        """Fixed decoder std σ = √(1/(2C)) of the Gaussian likelihood, on the [0, 1] scale."""
        return math.sqrt(1.0 / (2.0 * self.config.C))

    @property
    def likelihood_kind(self) -> str:
        c = self.config
        if c.likelihood == "bernoulli":
            how = ("dynamically, t ~ Bernoulli((x+1)/2)" if c.binarize == "dynamic"
                   else "by thresholding (x+1)/2 at 0.5")
            return f"Bernoulli on pixels binarised {how}"
        return (f"discretised Gaussian (sigma={self.sigma:.4g} on [0,1]) on "
                f"{c.num_levels}-level pixels")

    def _param(self) -> Tensor:
        return next(self.parameters())

    # ---- data → likelihood targets ----------------------------------------------------------

    def likelihood_targets(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images x (B, C, H, W) in [-1, 1] → the data t the likelihood is defined on, in [0, 1]:
        binary pixels (bernoulli) or pixels snapped to the ``num_levels`` grid (gaussian)."""
        p = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
        c = self.config
        if c.likelihood == "bernoulli":
            if c.binarize == "threshold":
                return (p > 0.5).to(x.dtype)
            return (rand_tensor(p.shape, generator, p.device, p.dtype) < p).to(x.dtype)
        return torch.round(p * (c.num_levels - 1)) / (c.num_levels - 1)

    # ---- encoder / decoder ------------------------------------------------------------------

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x: (B, C, H, W) in [-1, 1] → q(z | x) = N(μ, diag σ²) over (B, latent_dim).

        log σ² = −softplus(−h) ≤ 0: a posterior wider than the N(0, I) prior only costs KL and
        never helps the reconstruction, while an unbounded head let one unusual (almost white)
        Fashion-MNIST test image reach the clamp log σ² = 20, i.e. a KL of 2.4e8 nats.
        """
        mean, raw = torch.chunk(self.encoder(x), 2, dim=1)
        return DiagonalGaussian(mean, -F.softplus(-raw))

    def decoder_output(self, z: Tensor) -> Tensor:
        """f(z), (B, C, H, W): Bernoulli logits, or the Gaussian mean on the [0, 1] scale."""
        return self.decoder(z)

    def decode(self, z: Tensor) -> Tensor:
        """z: (B, latent_dim) → mean of p(x | z) as an image in [-1, 1] scale, (B, C, H, W)."""
        f = self.decoder_output(z)
        mean01 = torch.sigmoid(f) if self.config.likelihood == "bernoulli" else f
        return 2.0 * mean01 - 1.0

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = False) -> Tensor:
        """Reconstruction decode(z) with z = μ(x), or z ~ q(z|x) if ``sample_posterior``."""
        q = self.encode(x)
        return self.decode(q.sample(generator) if sample_posterior else q.mode())

    # ---- likelihood terms -------------------------------------------------------------------

    def recon_loss(self, t: Tensor, z: Tensor) -> Tensor:
        """Training reconstruction term per image, (B,): BCE(f(z), t) (bernoulli, = −log p(t|z))
        or C ‖t − f(z)‖² (gaussian, = −log N(t; f(z), σ²I) − const, a continuous density)."""
        f = self.decoder_output(z)
        if self.config.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(f, t, reduction="none")
            return nll.flatten(1).sum(1)
        return self.config.C * (t - f).pow(2).flatten(1).sum(1)

    def log_px_given_z(self, t: Tensor, z: Tensor) -> Tensor:
        """Honest log p(t | z) in nats, (B,): Bernoulli log-mass, or the discretised Gaussian
        log-mass on the ``num_levels`` grid. ``t`` from :meth:`likelihood_targets`."""
        f = self.decoder_output(z)
        if self.config.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(f, t, reduction="none").flatten(1).sum(1)
        logp = discretized_gaussian_log_likelihood(t, mean=f, std=self.sigma,
                                                   num_levels=self.config.num_levels)
        return logp.flatten(1).sum(1)

    def training_loss(self, batch: dict[str, Tensor],
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """loss = mean over the batch of (recon + β·KL) / D  (per-dimension, so its scale is
        O(1) whatever the image size; the optimum is that of recon + β·KL).

        Logs "recon" and "kl" are per image (batch means), "loss" is per dimension. "kl" is in
        nats; "recon" too for Bernoulli, while the Gaussian's is C‖t − f(z)‖², −log N(t; f(z),
        σ²I) without its constant (D/2)·log(2πσ²) — the nats of the bound are
        :meth:`log_px_given_z`'s.
        """
        t = self.likelihood_targets(batch["images"], generator)
        q = self.encode(2.0 * t - 1.0)
        recon = self.recon_loss(t, q.sample(generator))
        kl = q.kl()
        loss = (recon + self.config.beta * kl).mean() / self.data_dim
        return {"loss": loss, "recon": recon.mean().detach(), "kl": kl.mean().detach()}

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images (n, C, H, W) in [-1, 1]: z ~ N(0, I), then the decoder mean (not a noisy
        draw from p(x|z), which for these likelihoods is mostly pixel noise)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be a positive int")
        p = self._param()
        z = randn_tensor((n, self.config.latent_dim), generator, p.device, p.dtype)
        return self.decode(z)

    @torch.no_grad()
    def interpolate(self, x_a: Tensor, x_b: Tensor, steps: int = 8) -> Tensor:
        """Decode the straight line between the posterior means μ(x_a) and μ(x_b).

        x_a, x_b: (C, H, W) or (B, C, H, W) in [-1, 1] → (steps, *x_a.shape), endpoints included.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps={steps!r} must be an int >= 2 (both endpoints)")
        if x_a.shape != x_b.shape or x_a.dim() not in (3, 4):
            raise ValueError(f"x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} must have the "
                             "same shape, (C, H, W) or (B, C, H, W)")
        single = x_a.dim() == 3
        xa, xb = (x_a[None], x_b[None]) if single else (x_a, x_b)
        mu_a, mu_b = self.encode(xa).mean, self.encode(xb).mean  # (B, d)
        w = torch.linspace(0.0, 1.0, steps, device=mu_a.device, dtype=mu_a.dtype)[:, None, None]
        z = (1 - w) * mu_a + w * mu_b  # (steps, B, d)
        out = self.decode(z.flatten(0, 1)).unflatten(0, (steps, len(xa)))
        return out[:, 0] if single else out
