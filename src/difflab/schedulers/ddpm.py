"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models").

One step samples the Gaussian posterior q(x_{t'} | x_t, x̂₀) of eq. 6–7, with t' the next
(smaller) timestep of the schedule and ᾱ_{t'} = 1 when t is the last one:

    α_t  = ᾱ_t / ᾱ_{t'},   β_t = 1 − α_t               (per-jump values when steps are skipped)
    μ̃    = √ᾱ_{t'} β_t / (1 − ᾱ_t) · x̂₀  +  √α_t (1 − ᾱ_{t'}) / (1 − ᾱ_t) · x_t        (eq. 7)
    β̃_t  = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β_t                                              (eq. 7)
    x_{t'} = μ̃ + s_t z,   z ~ N(0, I),   s_t² = β̃_t ("fixed_small") or β_t ("fixed_large")

x̂₀ comes from the model output (ε, v or x₀, see ``prediction_type``) and is clipped to
±``clip_sample_range`` or dynamically thresholded. No noise is added at the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from difflab.config import check_choice
from difflab.schedulers._common import Generator, randn
from difflab.schedulers.base import Scheduler, SchedulerConfig, SchedulerOutput

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(kw_only=True)
class DDPMConfig(SchedulerConfig):
    variance_type: str = "fixed_small"  # s_t²: β̃_t (fixed_small[_log]) or β_t (fixed_large)
    clip_sample: bool = True  # clip x̂₀ to ±clip_sample_range (pixel-space models)
    clip_sample_range: float = 1.0
    thresholding: bool = False  # Imagen dynamic thresholding instead of clipping
    dynamic_thresholding_ratio: float = 0.995  # quantile of |x̂₀| used as the threshold
    sample_max_value: float = 1.0  # largest threshold allowed
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)

    def validate(self) -> None:
        super().validate()
        check_choice(type(self).__name__, "variance_type", self.variance_type, VARIANCE_TYPES)


class DDPMScheduler(Scheduler):
    """Stochastic DDPM sampler; ``step`` needs a ``generator`` for reproducible noise."""

    config_class = DDPMConfig
    cfg: DDPMConfig

    def previous_timestep(self, timestep: int) -> int:
        """The next timestep of the schedule after ``timestep`` (−1 after the last)."""
        i = int((self.timesteps.cpu() == int(timestep)).nonzero()[0, 0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, *,
             generator: Generator = None, return_dict: bool = True) -> Any:
        """One posterior sample x_t → x_{t'}. ``model_output, sample: (B, C, H, W)``."""
        self._require_timesteps()
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        ab_t = float(self.alphas_cumprod[t])
        ab_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        alpha_t = ab_t / ab_prev
        beta_t = 1.0 - alpha_t

        x0 = self._pred_x0_vp(model_output, sample, math.sqrt(ab_t), math.sqrt(1.0 - ab_t))
        x0 = self._clip_x0(x0)

        coef_x0 = math.sqrt(ab_prev) * beta_t / (1.0 - ab_t)  # eq. 7
        coef_xt = math.sqrt(alpha_t) * (1.0 - ab_prev) / (1.0 - ab_t)
        prev_sample = coef_x0 * x0 + coef_xt * sample

        if t > 0:
            z = randn(model_output.shape, generator=generator, device=model_output.device,
                      dtype=model_output.dtype)
            if self.cfg.variance_type == "fixed_large":
                var = beta_t
            else:  # β̃_t, floored as in improved-diffusion's log-variance clipping
                var = max((1.0 - ab_prev) / (1.0 - ab_t) * beta_t, 1e-20)
            prev_sample = prev_sample + math.sqrt(var) * z

        out = SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
        return out if return_dict else (out.prev_sample, out.pred_original_sample)
