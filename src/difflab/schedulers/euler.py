"""Euler's method on the probability-flow ODE in σ (Karras et al. 2022, EDM, Algorithm 1
without the Heun correction; k-diffusion's ``sample_euler``).

    d_i     = (x̃_i − x̂₀(x̃_i, σ_i)) / σ_i                 (EDM eq. 3)
    x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i) d_i

One model evaluation per step. With the exact ε this lands exactly on x₀ + σ_{i+1} ε.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from difflab.config import check_choice
from difflab.schedulers._common import Generator
from difflab.schedulers.base import SchedulerOutput
from difflab.schedulers.sigma_base import SigmaScheduler, SigmaSchedulerConfig


@dataclass(kw_only=True)
class EulerConfig(SigmaSchedulerConfig):
    use_karras_sigmas: bool = False  # EDM's ρ = 7 σ grid instead of the timestep grid
    sigma_min: float | None = None  # ends of the Karras grid (default: the schedule's ends)
    sigma_max: float | None = None
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)
    final_sigmas_type: str = "zero"  # σ after the last step: "zero" or "sigma_min" (σ at t=0)

    def validate(self) -> None:
        super().validate()
        check_choice(type(self).__name__, "final_sigmas_type", self.final_sigmas_type,
                     ("zero", "sigma_min"))


class EulerDiscreteScheduler(SigmaScheduler):
    """Deterministic Euler sampler (``generator`` is accepted and unused)."""

    config_class = EulerConfig
    unsupported = {"interpolation_type": "linear", "use_exponential_sigmas": False,
                   "use_beta_sigmas": False, "timestep_type": "discrete"}
    cfg: EulerConfig

    def step(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor, *,
             generator: Generator = None, return_dict: bool = True) -> Any:
        """One Euler step σ_i → σ_{i+1}. ``model_output, sample: (B, C, H, W)``."""
        i = self._begin_step(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x = sample.to(self._compute_dtype(sample))

        x0 = self._clip_x0(self._pred_x0(model_output, x, sigma))
        d = (x - x0) / sigma
        prev_sample = (x + d * (sigma_next - sigma)).to(model_output.dtype)

        self._step_index = i + 1
        out = SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
        return out if return_dict else (out.prev_sample, out.pred_original_sample)
