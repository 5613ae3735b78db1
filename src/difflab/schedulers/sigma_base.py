"""Shared base of the samplers that integrate in σ (LMS, Euler, Euler ancestral, Heun).

They work on x̃ = x_t/√ᾱ_t = x₀ + σ ε with σ = √((1 − ᾱ_t)/ᾱ_t), the variance-exploding form
of the same process (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (EDM), eq. 1–4; k-diffusion). In these variables the probability-flow ODE is

    dx̃/dσ = (x̃ − x̂₀(x̃, σ)) / σ                                          (EDM eq. 3, s(t)=1)

so each sampler is an ODE/SDE integrator over the decreasing grid σ_0 > σ_1 > … > σ_n = 0.

- ``init_noise_sigma`` is σ_max (x_T = σ_max z), or √(σ_max² + 1) for ``leading`` spacing,
  whose first step is not the last training step.
- The network was trained on VP inputs, so ``scale_model_input`` returns x̃/√(σ² + 1) = x_t.
- ``add_noise`` returns x₀ + σ ε at the σ that the schedule assigns to each timestep.
- With ``use_karras_sigmas`` the σ grid is EDM's ρ = 7 grid (eq. 5) between the schedule's ends
  and the timesteps given to the model are the (fractional) t with σ_t = σ_i.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difflab.schedulers import schedules
from difflab.schedulers._common import append_dims
from difflab.schedulers.base import Scheduler, SchedulerConfig

# σ = √((1 − ᾱ)/ᾱ) must stay finite: with a zero terminal SNR, diffusers floors the last ᾱ at
# 2⁻²⁴ for σ-space samplers; we do the same so both give the same σ_max ≈ 4096.
ZERO_SNR_ALPHA_BAR_FLOOR = 2.0**-24


@dataclass(kw_only=True)
class SigmaSchedulerConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"  # diffusers' default for σ-space samplers
    # Clip x̂₀ to ±clip_sample_range before the derivative d = (x̃ − x̂₀)/σ is formed (diffusers
    # has this for Heun only; difflab for every σ-space sampler). Pixel-space models use it
    # with the trailing grid, whose first step from ᾱ ≈ 0 would otherwise blow ε̂'s error up.
    clip_sample: bool = False
    clip_sample_range: float = 1.0


class SigmaScheduler(Scheduler):
    """Base class: σ tables, input scaling, VE ``add_noise`` and x̂₀ in σ-space."""

    config_class = SigmaSchedulerConfig
    extensions = frozenset({"clip_sample", "clip_sample_range"})  # diffusers: Heun only

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        if getattr(self.cfg, "rescale_betas_zero_snr", False):
            self.alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR_FLOOR
        self.train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,) ↑t
        # before set_timesteps: the whole training chain, t = T−1 … 0
        T = self.cfg.num_train_timesteps
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.float32)
        self.sigmas = torch.cat([self.train_sigmas.flip(0), torch.zeros(1, dtype=torch.float64)])
        self._scale_called = False

    # ------------------------------------------------------------------------- σ grid

    def _grid(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps float32, σ float64 without the final 0) for ``num_inference_steps``."""
        cfg = self.cfg
        table = self.train_sigmas.numpy()
        ts = schedules.spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps,
                                        num_inference_steps, cfg.steps_offset).astype(np.float32)
        # σ at the timestep actually given to the model (linear in t between table entries)
        sig = np.interp(ts.astype(np.float64), np.arange(len(table), dtype=np.float64), table)
        if getattr(cfg, "use_karras_sigmas", False):
            sig_min, sig_max = getattr(cfg, "sigma_min", None), getattr(cfg, "sigma_max", None)
            sig_min = float(sig[-1]) if sig_min is None else sig_min
            sig_max = float(sig[0]) if sig_max is None else sig_max
            sig = schedules.karras_sigmas(sig_min, sig_max, num_inference_steps)
            ts = schedules.sigma_to_t(sig, table).astype(np.float32)
        return ts, sig

    def _final_sigma(self) -> float:
        """σ after the last step: 0, or σ at t = 0 with ``final_sigmas_type='sigma_min'``."""
        if getattr(self.cfg, "final_sigmas_type", "zero") == "sigma_min":
            return float(self.train_sigmas[0])
        return 0.0

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None
                      ) -> None:
        """Build ``timesteps`` (float32, for the model) and ``sigmas`` (float64, length n + 1)."""
        self._check_steps(num_inference_steps)
        ts, sig = self._grid(num_inference_steps)
        self.timesteps = torch.from_numpy(ts).to(device)
        self.sigmas = torch.from_numpy(np.append(sig, self._final_sigma()))
        self.num_inference_steps = num_inference_steps
        self._reset_steps()
        self._scale_called = False

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        sigma_max = float(self.sigmas.max())
        if self.cfg.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return math.sqrt(sigma_max**2 + 1.0)

    # ------------------------------------------------------------------ model interface

    def scale_model_input(self, sample: Tensor, timestep: float | Tensor) -> Tensor:
        """x̃ → x_t = x̃/√(σ² + 1), the VP input the network was trained on."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self._scale_called = True
        sigma = float(self.sigmas[self._step_index])
        return sample / math.sqrt(sigma**2 + 1.0)

    def _pred_x0(self, model_output: Tensor, sample: Tensor, sigma: float) -> Tensor:
        """x̂₀ from the model output at noise level σ, for x̃ = x₀ + σ ε."""
        kind = self.cfg.prediction_type
        if kind == "epsilon":
            return sample - sigma * model_output
        if kind == "v_prediction":  # v = α ε − σ_VP x₀ with α = 1/√(σ²+1), σ_VP = σ α
            return model_output * (-sigma / math.sqrt(sigma**2 + 1.0)) + sample / (sigma**2 + 1.0)
        return model_output

    def _begin_step(self, timestep: float | Tensor) -> int:
        """Common prologue of ``step``: check the call order, return the step index."""
        self._require_timesteps()
        if not self._scale_called:
            warnings.warn(f"{type(self).__name__}.step called without scale_model_input; the "
                          "model input must be scheduler.scale_model_input(x, t)", stacklevel=3)
        if self._step_index is None:
            self._init_step_index(timestep)
        return self._step_index  # type: ignore[return-value]

    @staticmethod
    def _compute_dtype(sample: Tensor) -> torch.dtype:
        """Integrate in at least float32 (fp16/bf16 samples are upcast, as in diffusers)."""
        return torch.promote_types(sample.dtype, torch.float32)

    # ------------------------------------------------------------------ forward process

    def _alpha_sigma(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        sig = self.sigmas[self._schedule_indices(timesteps)]
        alpha = 1.0 / (sig**2 + 1.0).sqrt()
        return alpha, sig * alpha

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x̃_t = x₀ + σ_t ε for timesteps of the current schedule. ``(B, ...)``, ``(B,)``."""
        sig = self.sigmas[self._schedule_indices(torch.as_tensor(timesteps))]
        sig = append_dims(sig.to(original_samples.device, original_samples.dtype),
                          original_samples.ndim)
        return original_samples + noise * sig
