"""Diagonal Gaussian posteriors and the discretised Gaussian likelihood.

Notation (Kingma & Welling 2014, "Auto-Encoding Variational Bayes", §2.4 and App. B):

=========  =====================  ==============================================
code       symbol                 meaning
=========  =====================  ==============================================
mean       μ                      posterior mean
logvar     log σ²                 posterior log-variance (clamped to [-30, 20])
std        σ                      exp(½ log σ²)
eps        ε ~ N(0, I)            noise of the reparameterisation z = μ + σ ⊙ ε
=========  =====================  ==============================================

:class:`DiagonalGaussian` follows diffusers' ``DiagonalGaussianDistribution`` (same clamp, same
``sample(generator)`` / ``mode()`` / ``kl()`` / ``nll()``), so a difflab ``AutoencoderKL``
behaves like a diffusers one. Event dimensions are all dimensions after the batch dimension:
``kl``, ``nll`` and ``log_prob`` sum over them and return one number per sample, ``(B,)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.rng import batch_rand, batch_randn

LOG_2PI = math.log(2.0 * math.pi)


def randn_tensor(shape: Sequence[int], generator: torch.Generator | None,
                 device: torch.device, dtype: torch.dtype) -> Tensor:
    """ε ~ N(0, I) of ``shape`` drawn from ``generator`` (on the generator's device), then moved.

    Drawing on the generator's device and moving makes a CPU generator usable for a CUDA model,
    and the numbers depend only on the seed, not on where the model lives.
    """
    gen_device = generator.device if generator is not None else device
    return batch_randn(shape, generator, device=gen_device, dtype=dtype).to(device)


def rand_tensor(shape: Sequence[int], generator: torch.Generator | None,
                device: torch.device, dtype: torch.dtype) -> Tensor:
    """u ~ U[0, 1) of ``shape`` from ``generator``; same device rule as :func:`randn_tensor`."""
    gen_device = generator.device if generator is not None else device
    return batch_rand(shape, generator, device=gen_device, dtype=dtype).to(device)


class DiagonalGaussian:
    """N(μ, diag σ²) with one distribution per batch row.

    Args:
        mean: μ, shape ``(B, *event)`` — ``(B, d)`` for a VAE, ``(B, c, h, w)`` for AutoencoderKL.
        logvar: log σ², same shape; clamped to [-30, 20] like diffusers so exp() never overflows.
    """

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ")
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor, dim: int = 1) -> DiagonalGaussian:
        """Split ``moments`` = [μ, log σ²] in two along ``dim`` (an encoder's output)."""
        mean, logvar = torch.chunk(moments, 2, dim=dim)
        return cls(mean, logvar)

    @property
    def event_dims(self) -> tuple[int, ...]:
        return tuple(range(1, self.mean.dim()))

    def sample(self, generator: torch.Generator | None = None, *,
               num_samples: int | None = None) -> Tensor:
        """Reparameterised sample z = μ + σ ⊙ ε, differentiable in μ and log σ².

        Returns ``mean.shape``, or ``(num_samples, *mean.shape)`` when ``num_samples`` is given.
        """
        shape = tuple(self.mean.shape) if num_samples is None else (num_samples, *self.mean.shape)
        eps = randn_tensor(shape, generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The most likely point, μ."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self ‖ other) in nats, ``(B,)``; ``other=None`` means the prior N(0, I).

        Closed form for diagonal Gaussians (Kingma & Welling 2014, App. B):
        ½ Σ [ (μ − μ₂)²/σ₂² + σ²/σ₂² − 1 − log σ² + log σ₂² ].
        """
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = ((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                     - 1.0 - self.logvar + other.logvar)
        return 0.5 * terms.sum(dim=self.event_dims)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z) in nats, summed over event dims.

        ``z`` is ``(*S, B, *event)`` for any leading sample dims S (e.g. from
        ``sample(num_samples=k)``); the result is ``(*S, B)``.
        """
        n_event = self.mean.dim() - 1
        terms = LOG_2PI + self.logvar + (z - self.mean).pow(2) / self.var
        return -0.5 * terms.sum(dim=tuple(range(z.dim() - n_event, z.dim())))

    def nll(self, z: Tensor) -> Tensor:
        """−log q(z) in nats, ``(B,)`` (diffusers' ``nll`` with its default dims)."""
        return -self.log_prob(z)


def standard_normal_log_prob(z: Tensor, n_event: int) -> Tensor:
    """log N(z; 0, I) summed over the last ``n_event`` dims (the VAE prior p(z))."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(dim=tuple(range(z.dim() - n_event, z.dim())))


# --------------------------------------------------------------------------------------------
# Discretised Gaussian: a probability mass function on L equally spaced intensity levels.
# --------------------------------------------------------------------------------------------

_INF_SIGMAS = 1e4  # stands in for ±∞ (in standard deviations) so gradients stay finite


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 − e^d) for d < 0, accurate at both ends (Mächler 2012, "Accurately computing
    log(1 − exp(−|a|))"): expm1 near 0, log1p far from it. Each branch sees a clamped input so
    the branch that ``where`` discards never produces inf/NaN gradients."""
    tiny = torch.finfo(d.dtype).tiny
    near = torch.log(-torch.expm1(d.clamp(min=-math.log(2.0), max=-tiny)))
    far = torch.log1p(-torch.exp(d.clamp(max=-math.log(2.0))))
    return torch.where(d > -math.log(2.0), near, far)


def _log_ndtr_diff(a: Tensor, b: Tensor) -> Tensor:
    """log(Φ(b) − Φ(a)) for a < b. Where a > 0 both lie in the upper tail, so use the mirror
    identity Φ(b) − Φ(a) = Φ(−a) − Φ(−b) to stay in the lower tail where log Φ is exact."""
    flip = a > 0
    hi = torch.where(flip, -a, b)
    lo = torch.where(flip, -b, a)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    return log_hi + _log1mexp(log_lo - log_hi)


def discretized_gaussian_log_likelihood(x: Tensor, *, mean: Tensor, std: Tensor | float,
                                        num_levels: int, low: float = 0.0,
                                        high: float = 1.0) -> Tensor:
    """Elementwise log P(x) in nats for x on the grid {low, …, high} of ``num_levels`` levels.

    P(x) = Φ((x + δ − μ)/σ) − Φ((x − δ − μ)/σ) with half bin width δ = (high − low)/(2(L − 1));
    the first bin extends to −∞ and the last to +∞, so the L probabilities sum to exactly 1
    (the decoder of Ho et al. 2020, §3.3, and of PixelCNN++ with a Gaussian instead of a
    logistic). Because this is a probability *mass*, −log P is an honest code length for
    discrete (e.g. 8-bit) data — no dequantisation noise is needed.

    Args:
        x: data on the grid (values are snapped to the nearest level), any shape.
        mean: μ, broadcastable to ``x``.
        std: σ > 0, broadcastable to ``x``.
    Computed in float64; returned in ``x``'s dtype.
    """
    if num_levels < 2:
        raise ValueError(f"num_levels={num_levels} must be >= 2")
    step = (high - low) / (num_levels - 1)
    idx = torch.round((x.double() - low) / step).clamp(0, num_levels - 1)
    centre = low + idx * step
    # a Python float straight to float64 (through float32 it would lose digits: 0.1 → 0.1000000015)
    mean64 = torch.as_tensor(mean, dtype=torch.float64, device=x.device)
    std64 = torch.as_tensor(std, dtype=torch.float64, device=x.device)
    a = (centre - 0.5 * step - mean64) / std64
    b = (centre + 0.5 * step - mean64) / std64
    a = torch.where(idx == 0, torch.full_like(a, -_INF_SIGMAS), a)
    b = torch.where(idx == num_levels - 1, torch.full_like(b, _INF_SIGMAS), b)
    return _log_ndtr_diff(a, b).to(x.dtype)
