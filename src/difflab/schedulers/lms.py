"""Linear multistep (Adams–Bashforth type) integration of the probability-flow ODE in σ
(k-diffusion's ``sample_lms``; Karras et al. 2022, EDM eq. 3 for the ODE).

With d_j = (x̃_j − x̂₀(x̃_j, σ_j)) / σ_j the derivatives at the last k ≤ ``order`` grid points,
the ODE is integrated over [σ_i, σ_{i+1}] with d replaced by its Lagrange interpolant:

    x̃_{i+1} = x̃_i + Σ_{j=0}^{k−1} c_j d_{i−j},
    c_j = ∫_{σ_i}^{σ_{i+1}} ∏_{m≠j} (τ − σ_{i−m}) / (σ_{i−j} − σ_{i−m}) dτ

The interpolant is a polynomial of degree < 4, so c_j is integrated exactly (diffusers uses
numerical quadrature, exact for these polynomials to rounding). k grows 1, 2, … up to ``order``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difflab.schedulers._common import Generator
from difflab.schedulers.base import SchedulerOutput
from difflab.schedulers.sigma_base import SigmaScheduler, SigmaSchedulerConfig


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """c_0 … c_{order−1} for the step σ_i → σ_{i+1}, using nodes σ_i, σ_{i−1}, …, σ_{i−order+1}."""
    nodes = [float(sigmas[i - j]) for j in range(order)]
    lo, hi = float(sigmas[i]), float(sigmas[i + 1])
    coeffs = []
    for j in range(order):
        others = [s for m, s in enumerate(nodes) if m != j]
        basis = np.atleast_1d(np.poly(others)) / np.prod([nodes[j] - s for s in others])  # ℓ_j(τ)
        antiderivative = np.polyint(basis)
        coeffs.append(float(np.polyval(antiderivative, hi) - np.polyval(antiderivative, lo)))
    return coeffs


@dataclass(kw_only=True)
class LMSConfig(SigmaSchedulerConfig):
    use_karras_sigmas: bool = False  # EDM's ρ = 7 σ grid instead of the timestep grid


class LMSDiscreteScheduler(SigmaScheduler):
    """Deterministic linear multistep sampler of order up to 4."""

    config_class = LMSConfig
    unsupported = {"use_exponential_sigmas": False, "use_beta_sigmas": False}
    cfg: LMSConfig
    derivatives: list[Tensor] = []  # d_i, d_{i−1}, … newest last (reset by set_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None
                      ) -> None:
        super().set_timesteps(num_inference_steps, device)
        self.derivatives = []

    def step(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor, *,
             order: int = 4, generator: Generator = None, return_dict: bool = True) -> Any:
        """One multistep update σ_i → σ_{i+1}. ``model_output, sample: (B, C, H, W)``."""
        i = self._begin_step(timestep)
        sigma = float(self.sigmas[i])
        x0 = self._clip_x0(self._pred_x0(model_output, sample, sigma))
        self.derivatives.append((sample - x0) / sigma)
        del self.derivatives[:-order]

        k = len(self.derivatives)  # the order grows with the history (also when resuming mid-way)
        coeffs = lms_coefficients(self.sigmas.numpy(), i, k)
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))

        self._step_index = i + 1
        out = SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
        return out if return_dict else (out.prev_sample, out.pred_original_sample)
