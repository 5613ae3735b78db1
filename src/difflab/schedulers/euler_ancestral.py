"""Euler ancestral sampling (k-diffusion's ``sample_euler_ancestral``; Karras et al. 2022, EDM
§4 on ancestral sampling; the split below is Song et al. 2021's reverse SDE step in σ).

Each step goes down to σ_down with the ODE and adds fresh noise of std σ_up, chosen so that
σ_down² + σ_up² = σ_{i+1}² and the marginal noise level is right:

    σ_up   = √(σ_{i+1}² (σ_i² − σ_{i+1}²) / σ_i²),      σ_down = √(σ_{i+1}² − σ_up²) = σ_{i+1}²/σ_i
    d_i    = (x̃_i − x̂₀(x̃_i, σ_i)) / σ_i
    x̃_{i+1} = x̃_i + (σ_down − σ_i) d_i + σ_up z,        z ~ N(0, I)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from difflab.schedulers._common import Generator, randn
from difflab.schedulers.base import SchedulerOutput
from difflab.schedulers.sigma_base import SigmaScheduler, SigmaSchedulerConfig


@dataclass(kw_only=True)
class EulerAncestralConfig(SigmaSchedulerConfig):
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Stochastic Euler sampler; ``step`` needs a ``generator`` for reproducible noise."""

    config_class = EulerAncestralConfig
    cfg: EulerAncestralConfig

    def step(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor, *,
             generator: Generator = None, return_dict: bool = True) -> Any:
        """One ancestral step σ_i → σ_{i+1}. ``model_output, sample: (B, C, H, W)``."""
        i = self._begin_step(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x = sample.to(self._compute_dtype(sample))

        x0 = self._clip_x0(self._pred_x0(model_output, x, sigma))
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = sigma_next**2 / sigma  # = √(σ_{i+1}² − σ_up²), without cancellation
        d = (x - x0) / sigma
        prev_sample = x + d * (sigma_down - sigma)
        z = randn(model_output.shape, generator=generator, device=model_output.device,
                  dtype=model_output.dtype)
        prev_sample = (prev_sample + z * sigma_up).to(model_output.dtype)

        self._step_index = i + 1
        out = SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
        return out if return_dict else (out.prev_sample, out.pred_original_sample)
