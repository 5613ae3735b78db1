"""Checking samplers against the math, without training anything.

If the data are Gaussian, x₀ ~ N(μ, diag(s²)), then x_t = √ᾱ x₀ + √(1 − ᾱ) ε is Gaussian too and
the ideal network is known in closed form, per dimension:

    E[ε | x_t]  = √(1 − ᾱ) (x_t − √ᾱ μ) / (ᾱ s² + 1 − ᾱ)
    E[x₀ | x_t] = μ + √ᾱ s² (x_t − √ᾱ μ) / (ᾱ s² + 1 − ᾱ)
    v̂           = √ᾱ E[ε | x_t] − √(1 − ᾱ) E[x₀ | x_t]

A correct sampler driven by this exact model must turn x_T into samples whose mean and std
approach μ and s as the number of steps grows. :func:`convergence_table` measures that error
against the number of network evaluations (NFE) for every scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difflab.schedulers.base import Scheduler

Model = Callable[[Tensor, Any], Tensor]


def alpha_bar_at(scheduler: Scheduler, t: float | Tensor) -> float:
    """ᾱ at a (possibly fractional) timestep: the table at integers, log-σ interpolation between.

    Log-σ interpolation is the inverse of the t(σ) map used for Karras grids, so the exact model
    sees the same noise level the sampler integrates at.
    """
    t = float(t)
    table = scheduler.alphas_cumprod
    if t == round(t):
        return float(table[int(round(t))])
    log_sigma = 0.5 * (torch.log1p(-table) - torch.log(table)).numpy()
    sigma = math.exp(np.interp(t, np.arange(len(log_sigma)), log_sigma))
    return 1.0 / (1.0 + sigma**2)


def gaussian_model(mu: Tensor, s: Tensor, scheduler: Scheduler) -> Model:
    """The exact network for x₀ ~ N(mu, s²) per dimension, in the scheduler's prediction_type.

    ``mu, s: (D,)`` broadcast against model inputs ``(B, D)``; the input is the VP sample x_t
    (what ``scale_model_input`` returns for every scheduler).
    """
    kind = scheduler.config["prediction_type"]

    def model(x_t: Tensor, t: Any) -> Tensor:
        ab = alpha_bar_at(scheduler, t)
        a, b = math.sqrt(ab), math.sqrt(1.0 - ab)
        var = ab * s**2 + (1.0 - ab)
        eps = b * (x_t - a * mu) / var
        x0 = mu + a * s**2 * (x_t - a * mu) / var
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        return a * eps - b * x0

    return model


def run_sampler(scheduler: Scheduler, model: Model, x_T: Tensor, num_inference_steps: int,
                generator: torch.Generator | None = None, **step_kwargs: Any) -> Tensor:
    """The standard loop from unit-variance noise ``x_T: (B, ...)``; returns x₀ samples."""
    scheduler.set_timesteps(num_inference_steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def standard_noise(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """N(0, 1) noise standardised per dimension (exact zero mean, unit std over the batch), so
    that deterministic samplers are measured without Monte-Carlo error in the start."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean(0)) / z.std(0)


def moment_errors(x: Tensor, mu: Tensor, s: Tensor) -> tuple[float, float]:
    """(max |mean − μ|, max |std − s|) over dimensions, ``x: (B, D)``."""
    return float((x.mean(0) - mu).abs().max()), float((x.std(0) - s).abs().max())


def convergence_table(schedulers: Iterable[str] | None = None,
                      steps: Iterable[int] = (10, 25, 50, 100),
                      mu: Iterable[float] = (0.5, -0.3, 0.0, 1.0),
                      s: Iterable[float] = (0.5, 0.2, 1.0, 0.8),
                      num_samples: int = 4096, seed: int = 0,
                      config: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Moment error of each sampler's output against N(μ, s²) vs. number of steps.

    ``config`` is applied to every scheduler through ``from_config`` (keys a scheduler does not
    have are ignored); by default the DDPM linear schedule without x̂₀ clipping. Samples are
    float64 so that the table shows the samplers' error, not float32 rounding.
    Returns rows ``{"scheduler", "steps", "nfe", "mean_err", "std_err", "error"}``.
    """
    from difflab.schedulers import SCHEDULERS  # late import: this module is imported by it

    names = list(SCHEDULERS) if schedulers is None else list(schedulers)
    mu_t = torch.tensor(list(mu), dtype=torch.float64)
    s_t = torch.tensor(list(s), dtype=torch.float64)
    cfg = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
           "clip_sample": False, **(config or {})}
    x_T = standard_noise((num_samples, len(mu_t)), seed)
    rows = []
    for name in names:
        sched = SCHEDULERS[name].from_config(cfg)
        model = gaussian_model(mu_t, s_t, sched)
        for n in steps:
            g = torch.Generator().manual_seed(seed + 1)
            x = run_sampler(sched, model, x_T, n, generator=g)
            mean_err, std_err = moment_errors(x, mu_t, s_t)
            rows.append({"scheduler": name, "steps": n, "nfe": len(sched.timesteps),
                         "mean_err": mean_err, "std_err": std_err,
                         "error": max(mean_err, std_err)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text rendering of :func:`convergence_table` rows."""
    lines = [f"{'scheduler':<10}{'steps':>6}{'NFE':>6}{'mean err':>11}{'std err':>11}"]
    for r in rows:
        lines.append(f"{r['scheduler']:<10}{r['steps']:>6}{r['nfe']:>6}"
                     f"{r['mean_err']:>11.2e}{r['std_err']:>11.2e}")
    return "\n".join(lines)
