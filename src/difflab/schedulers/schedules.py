"""Noise schedules of the forward process q(x_t | x_0) and the conversions between them.

Everything here is computed in float64 and returned as float64 tensors (or numpy arrays for the
timestep grids); schedulers cast to the sample's dtype once, at the boundary.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; t = 0 … T−1 indexes the
training chain as in diffusers):

=====================  ==============================================================
code                   symbol
=====================  ==============================================================
``betas``              β_t, the variance added at step t
``alphas``             α_t = 1 − β_t
``alphas_cumprod``     ᾱ_t = ∏_{s≤t} α_s, so  q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)   (eq. 4)
``snr``                SNR(t) = ᾱ_t / (1 − ᾱ_t);   ``log_snr`` λ_t = log SNR(t)
``sigmas``             σ_t = √((1 − ᾱ_t)/ᾱ_t), the noise level of x̃ = x_t/√ᾱ_t = x_0 + σ_t ε
                       (variance-exploding form, Karras et al. 2022 "EDM" eq. 1–2)
=====================  ==============================================================
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.schedulers._common import append_dims

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------------- β schedules

def cosine_alpha_bar(t: np.ndarray | float, s: float = 0.008) -> np.ndarray:
    """f(t) = cos²(((t + s)/(1 + s)) · π/2), t ∈ [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    return np.cos((np.asarray(t, dtype=np.float64) + s) / (1 + s) * math.pi / 2) ** 2


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta) for the cosine ᾱ (Nichol & Dhariwal 2021, §3.2).

    The clip at 0.999 keeps the last step from being singular (ᾱ(1) = 0).
    """
    grid = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    f = cosine_alpha_bar(grid)
    return torch.from_numpy(np.minimum(1.0 - f[1:] / f[:-1], max_beta))


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> Tensor:
    """The β_t table, float64 of shape ``(num_train_timesteps,)``.

    - ``linear``: evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020, §4).
    - ``scaled_linear``: evenly spaced in √β, then squared (Stable Diffusion / LDM).
    - ``squaredcos_cap_v2``: the cosine schedule (Nichol & Dhariwal 2021); ignores the β range.
    - ``sigmoid``: β_start + (β_end − β_start)·sigmoid(linspace(−6, 6)) (GeoDiff, Xu et al. 2022).
    """
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(T)
    if beta_schedule == "sigmoid":
        ramp = torch.linspace(-6, 6, T, dtype=torch.float64)
        return torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start
    raise ConfigError(f"beta_schedule={beta_schedule!r} is not allowed; "
                      f"choose one of {list(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale √ᾱ_t so that √ᾱ_{T−1} = 0 while √ᾱ_0 is unchanged.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
    With a zero terminal SNR the last training step is pure noise, so sampling from N(0, I)
    matches training; ε-prediction is then undefined at t = T−1, use v-prediction.
    """
    sqrt_ab = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


# -------------------------------------------------------------------- derived quantities of ᾱ

def alphas_cumprod(betas: Tensor) -> Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), in float64."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def snr(alphas_cumprod: Tensor) -> Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021, "Variational Diffusion Models", eq. 3)."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def log_snr(alphas_cumprod: Tensor) -> Tensor:
    """λ_t = log ᾱ_t − log(1 − ᾱ_t), computed without cancellation near ᾱ = 1."""
    return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t): the VE noise level of x_t/√ᾱ_t (Karras et al. 2022, Table 1)."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def add_noise(x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sample the forward process: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (Ho et al. 2020, eq. 4).

    ``x0, noise: (B, ...)``; ``timesteps: (B,)`` integers in [0, T); ``alphas_cumprod: (T,)``.
    Coefficients are gathered and square-rooted in float64 (float32 on MPS, which has no float64)
    and cast once to ``x0.dtype``.
    """
    device = x0.device
    table_dtype = torch.float32 if device.type == "mps" else torch.float64
    ab = alphas_cumprod.to(device=device, dtype=table_dtype)[timesteps.to(device).long()]
    sqrt_ab = append_dims(ab.sqrt().to(x0.dtype), x0.ndim)
    sqrt_one_minus_ab = append_dims((1.0 - ab).sqrt().to(x0.dtype), x0.ndim)
    return sqrt_ab * x0 + sqrt_one_minus_ab * noise


# ------------------------------------------------------------------- inference timestep grids

def spaced_timesteps(spacing: str, num_train_timesteps: int, num_steps: int,
                     steps_offset: int = 0) -> np.ndarray:
    """``num_steps`` descending timesteps on the training chain [0, T−1], float64.

    Lin et al. 2023, Table 2: ``linspace`` includes both ends (not rounded here; integer
    schedulers round), ``leading`` is 0, k, 2k, … with k = T // n plus ``steps_offset``, and
    ``trailing`` counts back from T−1 in steps of T/n, so it always starts at the last step.
    """
    T, n = num_train_timesteps, num_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1.0
    raise ConfigError(f"timestep_spacing={spacing!r} is not allowed; "
                      f"choose one of {list(TIMESTEP_SPACINGS)}")


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0
                  ) -> np.ndarray:
    """σ_i = (σ_max^{1/ρ} + i/(n−1) · (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Continuous timestep of each σ: linear interpolation of t against log σ_t on the table.

    ``train_sigmas`` must increase with t; values outside the table clamp to 0 or T−1.
    """
    log_table = np.log(train_sigmas)
    return np.interp(np.log(np.maximum(sigmas, 1e-10)), log_table,
                     np.arange(len(train_sigmas), dtype=np.float64))
