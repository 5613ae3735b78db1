"""DPM-Solver++(2M): multistep second-order solver of the diffusion ODE in data prediction
(Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Algorithm 2).

With x_t = α_t x₀ + σ_t ε, λ_t = log(α_t/σ_t), h_i = λ_{t_i} − λ_{t_{i−1}}, r_i = h_{i−1}/h_i and
x̂₀ the model's data prediction (converted from ε / v / x₀ and optionally thresholded):

    1st order (DDIM):  x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x_{t_{i−1}} − α_{t_i}(e^{−h_i} − 1) x̂₀_{i−1}
    2nd order (2M):    the same with x̂₀_{i−1} replaced by
                       D_i = (1 + 1/(2r_i)) x̂₀_{i−1} − 1/(2r_i) x̂₀_{i−2}      ("midpoint")

``algorithm_type="sde-dpmsolver++"`` integrates the reverse SDE instead (the stochastic form of
DPM-Solver++, diffusers' ``sde-dpmsolver++``; e^{−2h} is the share of x/α kept per step):

    1st order:  x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) e^{−h_i} x_{t_{i−1}}
                          + α_{t_i}(1 − e^{−2h_i}) x̂₀_{i−1} + σ_{t_i} √(1 − e^{−2h_i}) z
    2nd order:  the same with D_i in place of x̂₀_{i−1} ("midpoint"; "heun" weighs
                (x̂₀_{i−1} − x̂₀_{i−2})/r_i by α_{t_i}((1 − e^{−2h_i})/(−2h_i) + 1) instead).

z ~ N(0, I) is fresh at every step. The first-order SDE step is exactly ancestral DDPM (the
posterior q(x_{t_i} | x_{t_{i−1}}, x̂₀) written in λ; tested); like DDPM, the fresh noise washes
out part of the model's earlier errors, which the ODE solver carries to the end.

The first step (no history) and, by default, the final step to σ = 0 are first order. The
grid is kept as VE noise levels σ̃ = σ/α, so e^{−h} = σ̃_{t_i}/σ̃_{t_{i−1}}.
It reuses the σ̃ tables of :class:`SigmaScheduler`, but its state is the VP sample x_t itself:
``scale_model_input`` is the identity, ``init_noise_sigma`` = 1 and ``add_noise`` is VP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difflab.config import check_choice
from difflab.schedulers import schedules
from difflab.schedulers._common import Generator, append_dims, randn
from difflab.schedulers.base import SchedulerOutput
from difflab.schedulers.sigma_base import SigmaScheduler, SigmaSchedulerConfig


@dataclass(kw_only=True)
class DPMSolverConfig(SigmaSchedulerConfig):
    solver_order: int = 2  # 2 = DPM-Solver++(2M); 1 = DDIM in λ-space
    # "dpmsolver++": the probability-flow ODE; "sde-dpmsolver++": the reverse SDE (stochastic)
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"  # 2nd-order correction: "midpoint" (Alg. 2) or "heun"
    lower_order_final: bool = True  # first order at the last step when n < 15 (stabler)
    euler_at_final: bool = False  # always first order at the last step
    use_karras_sigmas: bool = False  # EDM's ρ = 7 σ grid instead of the timestep grid
    final_sigmas_type: str = "zero"  # σ after the last step: "zero" or "sigma_min" (σ at t=0)
    # Start no noisier than λ = log(α/σ) = lambda_min_clipped: near T the cosine schedule's
    # α_t → 0, and x̂₀ = (x − σ ε̂)/α multiplies the model's error by 1/α (diffusers suggests −5.1).
    lambda_min_clipped: float = -math.inf
    thresholding: bool = False  # Imagen dynamic thresholding of x̂₀
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_choice(owner, "solver_order", self.solver_order, (1, 2))
        check_choice(owner, "algorithm_type", self.algorithm_type,
                     ("dpmsolver++", "sde-dpmsolver++"))
        check_choice(owner, "solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice(owner, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))


class DPMSolverMultistepScheduler(SigmaScheduler):
    """DPM-Solver++ (2M by default, ``use_karras_sigmas`` for the EDM grid); deterministic,
    or stochastic with ``algorithm_type="sde-dpmsolver++"`` (then ``step`` takes a
    ``generator`` or ``variance_noise``)."""

    config_class = DPMSolverConfig
    unsupported = {"use_exponential_sigmas": False, "use_beta_sigmas": False,
                   "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
                   # DDPM's fixed variances mean nothing to this sampler (diffusers ignores
                   # them too): a DDPM config swaps in. A learned variance is not read.
                   "variance_type": frozenset({None, "fixed_small", "fixed_small_log",
                                               "fixed_large", "fixed_large_log"}),
                   "use_dynamic_shifting": False, "time_shift_type": "exponential"}
    init_noise_sigma = 1.0  # type: ignore[assignment]
    cfg: DPMSolverConfig
    _x0_history: list[Tensor] = []  # x̂₀ of the last ``solver_order`` steps, newest last

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None
                      ) -> None:
        """Integer ``timesteps`` and VE ``sigmas`` σ̃ (float64, one more than the timesteps).

        For linspace/leading the grid has n + 1 points whose last one (t = 0) is where the
        solver lands, not a model evaluation, so it is dropped from ``timesteps``.
        """
        cfg, n = self.cfg, num_inference_steps
        self._check_steps(n)
        T = cfg.num_train_timesteps
        last = T  # one past the noisiest timestep allowed by lambda_min_clipped
        if cfg.lambda_min_clipped > -math.inf:
            ab = self.alphas_cumprod.float()  # float32, as diffusers computes λ_t
            lam = torch.log(ab.sqrt()) - torch.log((1 - ab).sqrt())
            last = T - int(torch.searchsorted(lam.flip(0), torch.tensor(cfg.lambda_min_clipped)))
        if cfg.timestep_spacing == "trailing":
            ts = np.round(np.arange(last, 0, -T / n)) - 1.0
        else:
            ts = schedules.spaced_timesteps(cfg.timestep_spacing, last, n + 1,
                                            cfg.steps_offset)[:-1]
        ts = np.round(ts)
        table = self.train_sigmas.numpy()
        # Karras + cosine: integer t would tell the model noise levels far from σ where the
        # cosine schedule is steep near T (and repeat timesteps), so t stays fractional there,
        # as diffusers means to (its int64 cast truncates them, then fails with an IndexError).
        fractional = cfg.use_karras_sigmas and cfg.beta_schedule == "squaredcos_cap_v2"
        if cfg.use_karras_sigmas:
            sig = schedules.karras_sigmas(float(table[0]), float(table[-1]), n)
            ts = schedules.sigma_to_t(sig, table)
            ts = ts if fractional else np.round(ts)
        else:
            sig = table[ts.astype(np.int64)]
        final = float(table[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.append(sig, final))
        ts = ts.astype(np.float32 if fractional else np.int64)
        self.timesteps = torch.from_numpy(ts).to(device)
        self.num_inference_steps = len(ts)
        self._x0_history = []
        self._reset_steps()

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """Identity: the solver works on the VP sample the model expects."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = α_t x₀ + σ_t ε at the schedule's noise level of each timestep."""
        alpha, sigma = self._alpha_sigma(torch.as_tensor(timesteps))
        x = original_samples
        alpha = append_dims(alpha.to(x.device, x.dtype), x.ndim)
        sigma = append_dims(sigma.to(x.device, x.dtype), x.ndim)
        return alpha * x + sigma * noise

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, *,
             generator: Generator = None, variance_noise: Tensor | None = None,
             return_dict: bool = True) -> Any:
        """One solver step t_{i−1} → t_i. ``model_output, sample: (B, C, H, W)``.

        The SDE variant draws z from ``generator`` (float32, as diffusers) unless
        ``variance_noise`` supplies it."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg, i, n = self.cfg, self._step_index, len(self.timesteps)
        sde = cfg.algorithm_type == "sde-dpmsolver++"
        if variance_noise is not None and (generator is not None or not sde):
            raise ValueError("variance_noise is for algorithm_type='sde-dpmsolver++' only, "
                             "and not together with a generator")
        s0, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])  # σ̃_{t_{i−1}}, σ̃_{t_i}
        alpha_s0 = 1.0 / math.sqrt(s0**2 + 1.0)
        alpha_t = 1.0 / math.sqrt(s_next**2 + 1.0)

        x0 = self._clip_x0(self._pred_x0_vp(model_output, sample, alpha_s0, s0 * alpha_s0))
        self._x0_history = [*self._x0_history, x0][-cfg.solver_order:]

        last = i == n - 1
        first_order_final = last and (cfg.euler_at_final or cfg.final_sigmas_type == "zero"
                                      or (cfg.lower_order_final and n < 15))
        x = sample.to(torch.promote_types(sample.dtype, torch.float32))
        ratio = s_next / s0  # e^{−h}
        h = h_prev = 0.0
        if i > 0 and s_next > 0.0:  # σ̃ = 0 (the final step) is always first order
            h, h_prev = math.log(s0 / s_next), math.log(float(self.sigmas[i - 1]) / s0)
        # A grid that repeats a timestep (λ-clipped grids at ~1000 steps round to the same t)
        # has h = 0 there: the step is a no-op and there is no interval to difference over, so
        # those steps are first order (diffusers divides by zero and returns NaN).
        second = not (cfg.solver_order == 1 or len(self._x0_history) < 2 or first_order_final
                      or h <= 0.0 or h_prev <= 0.0)
        # e^{−h} for the ODE, e^{−2h} for the SDE (which also shrinks x by a further e^{−h})
        keep = ratio * ratio if sde else ratio
        coef_x = keep * alpha_t / alpha_s0  # σ_t/σ_s = (σ̃_t α_t)/(σ̃_s α_s)
        coef_d = alpha_t * (1.0 - keep)
        prev_sample = coef_x * x + coef_d * x0
        if second:  # 2M: D = x̂₀_{i−1} + c·(x̂₀_{i−1} − x̂₀_{i−2})/r
            d1 = (self._x0_history[-1] - self._x0_history[-2]) * (h / h_prev)
            if cfg.solver_type == "midpoint":
                coef_d1 = 0.5 * coef_d
            else:  # "heun": α_t((e^{−h} − 1)/h + 1), or α_t((1 − e^{−2h})/(−2h) + 1) for the SDE
                coef_d1 = alpha_t * ((keep - 1.0) / (h * (2.0 if sde else 1.0)) + 1.0)
            prev_sample = prev_sample + coef_d1 * d1
        if sde:
            if variance_noise is None:
                variance_noise = randn(model_output.shape, generator=generator,
                                       device=model_output.device, dtype=torch.float32)
            # σ_t √(1 − e^{−2h}) z; e^{−2h} can exceed 1 by rounding when the last σ equals
            # the first (Karras σ_min rebuilt from σ_min^{1/ρ} vs final_sigmas_type="sigma_min")
            sigma_t = s_next * alpha_t
            prev_sample = prev_sample + sigma_t * math.sqrt(max(1.0 - keep, 0.0)) * \
                variance_noise.to(prev_sample.device, prev_sample.dtype)
        prev_sample = prev_sample.to(model_output.dtype)

        self._step_index = i + 1
        out = SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
        return out if return_dict else (out.prev_sample,)  # diffusers' tuple for this class
