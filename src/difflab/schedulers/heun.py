"""Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, EDM, Algorithm 1).

    d_i      = (x̃_i − x̂₀(x̃_i, σ_i)) / σ_i
    x̃'       = x̃_i + (σ_{i+1} − σ_i) d_i                     (Euler predictor)
    d'       = (x̃' − x̂₀(x̃', σ_{i+1})) / σ_{i+1}
    x̃_{i+1}  = x̃_i + (σ_{i+1} − σ_i) (d_i + d') / 2          (trapezoidal corrector)

The last step (σ_{i+1} = 0) is Euler only. Like diffusers, the two model evaluations of a step
are two calls of ``step``: ``timesteps`` lists t_0, t_1, t_1, t_2, t_2, …, t_{n−1}, t_{n−1}
(2n − 1 entries) and ``order = 2``; the first call of a pair returns the Euler predictor x̃'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difflab.schedulers._common import Generator
from difflab.schedulers.base import SchedulerOutput
from difflab.schedulers.sigma_base import SigmaScheduler, SigmaSchedulerConfig


@dataclass(kw_only=True)
class HeunConfig(SigmaSchedulerConfig):
    beta_start: float = 0.00085  # diffusers' defaults for Heun (Stable Diffusion's range)
    beta_end: float = 0.012
    use_karras_sigmas: bool = False  # EDM's ρ = 7 σ grid instead of the timestep grid


class HeunDiscreteScheduler(SigmaScheduler):
    """Deterministic Heun sampler, two ``step`` calls (model evaluations) per σ step."""

    config_class = HeunConfig
    extensions = frozenset()  # diffusers' Heun has clip_sample too
    unsupported = {"use_exponential_sigmas": False, "use_beta_sigmas": False}
    order = 2
    cfg: HeunConfig
    _first: tuple[Tensor, float, Tensor] | None = None  # (d_i, σ_{i+1} − σ_i, x̃_i) of a step

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None
                      ) -> None:
        """σ_0, σ_1, σ_1, …, σ_{n−1}, σ_{n−1}, 0 and t_0, t_1, t_1, …: each inner point twice."""
        super().set_timesteps(num_inference_steps, device)
        s, t = self.sigmas, self.timesteps
        self.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        self.timesteps = torch.cat([t[:1], t[1:].repeat_interleave(2)])
        self._first = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` call is the Euler predictor of a new step."""
        return self._first is None

    def step(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor, *,
             generator: Generator = None, return_dict: bool = True) -> Any:
        """Predictor or corrector half-step. ``model_output, sample: (B, C, H, W)``."""
        i = self._begin_step(timestep)
        if self.state_in_first_order:
            sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
            x0 = self._clip_x0(self._pred_x0(model_output, sample, sigma))
            d = (sample - x0) / sigma
            dt = sigma_next - sigma
            self._first = (d, dt, sample)
            prev_sample = sample + d * dt
        else:
            sigma_next = float(self.sigmas[i])
            x0 = self._clip_x0(self._pred_x0(model_output, sample, sigma_next))
            d_first, dt, x_start = self._first
            d = ((sample - x0) / sigma_next + d_first) / 2
            self._first = None
            prev_sample = x_start + d * dt

        self._step_index = i + 1
        out = SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
        return out if return_dict else (out.prev_sample, out.pred_original_sample)
