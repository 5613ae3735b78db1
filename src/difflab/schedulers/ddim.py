"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

With t' = t − T/n the previous timestep (ᾱ_{t'} = 1, or ᾱ_0 if ``set_alpha_to_one=False``, past
the end), eq. 12 of the paper:

    x_{t'} = √ᾱ_{t'} x̂₀  +  √(1 − ᾱ_{t'} − σ_t²) ε̂  +  σ_t z,        z ~ N(0, I)
    σ_t(η) = η √((1 − ᾱ_{t'}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t'})                      (eq. 16)

η = 0 is the deterministic DDIM (an ODE sampler); η = 1 gives σ_t² = DDPM's posterior variance
β̃_t, i.e. ancestral DDPM sampling. x̂₀ and ε̂ are both derived from the model output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from difflab.schedulers._common import Generator, randn
from difflab.schedulers.base import Scheduler, SchedulerConfig, SchedulerOutput


@dataclass(kw_only=True)
class DDIMConfig(SchedulerConfig):
    clip_sample: bool = True  # clip x̂₀ to ±clip_sample_range (pixel-space models)
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # ᾱ after the last step: 1 (True) or ᾱ_0 (False; SD v1)
    thresholding: bool = False  # Imagen dynamic thresholding instead of clipping
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)


class DDIMScheduler(Scheduler):
    """DDIM; ``step(..., eta=0.0)`` is deterministic, ``eta > 0`` needs a ``generator``."""

    config_class = DDIMConfig
    cfg: DDIMConfig

    def _alpha_bar_prev(self, prev_t: int) -> float:
        if prev_t >= 0:
            return float(self.alphas_cumprod[prev_t])
        return 1.0 if self.cfg.set_alpha_to_one else float(self.alphas_cumprod[0])

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, *,
             eta: float = 0.0, use_clipped_model_output: bool = False,
             generator: Generator = None, variance_noise: Tensor | None = None,
             return_dict: bool = True) -> Any:
        """One DDIM step x_t → x_{t'}. ``model_output, sample: (B, C, H, W)``.

        ``use_clipped_model_output`` recomputes ε̂ from the clipped x̂₀; ``variance_noise``
        supplies z directly instead of drawing it from ``generator``.
        """
        self._require_timesteps()
        t = int(timestep)
        # t' is one stride back whatever the spacing, as in diffusers (and the DDIM paper)
        prev_t = t - self.cfg.num_train_timesteps // self.num_inference_steps
        ab_t = float(self.alphas_cumprod[t])
        ab_prev = self._alpha_bar_prev(prev_t)
        sqrt_ab, sqrt_1m_ab = math.sqrt(ab_t), math.sqrt(1.0 - ab_t)

        kind = self.cfg.prediction_type
        x0 = self._pred_x0_vp(model_output, sample, sqrt_ab, sqrt_1m_ab)
        if kind == "epsilon":
            eps = model_output
        elif kind == "v_prediction":
            eps = sqrt_ab * model_output + sqrt_1m_ab * sample
        else:
            eps = (sample - sqrt_ab * x0) / sqrt_1m_ab
        x0 = self._clip_x0(x0)
        if use_clipped_model_output:
            eps = (sample - sqrt_ab * x0) / sqrt_1m_ab

        posterior_var = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)  # β̃_t
        std = eta * math.sqrt(posterior_var)  # eq. 16
        direction = math.sqrt(max(1.0 - ab_prev - std**2, 0.0)) * eps
        prev_sample = math.sqrt(ab_prev) * x0 + direction  # eq. 12

        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn(model_output.shape, generator=generator,
                                       device=model_output.device, dtype=model_output.dtype)
            prev_sample = prev_sample + std * variance_noise

        out = SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
        return out if return_dict else (out.prev_sample, out.pred_original_sample)
