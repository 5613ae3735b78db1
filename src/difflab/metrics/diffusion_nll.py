"""The variational bound of a DDPM on 8-bit images, in bits/dim (Ho et al. 2020, eq. 5).

For discrete data x₀ (pixels on L levels scaled to [−1, 1]) the negative log-likelihood is
bounded by a sum of T + 1 terms (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eq. 4–7):

    −log p_θ(x₀) ≤ L_T + Σ_{t=2}^{T} L_{t−1} + L_0
    L_T     = KL(q(x_T | x₀) ‖ N(0, I))                                   prior, no parameters
    L_{t−1} = E_q KL(q(x_{t−1} | x_t, x₀) ‖ p_θ(x_{t−1} | x_t))           2 ≤ t ≤ T
    L_0     = −E_q log p_θ(x₀ | x₁)                                       discretised decoder

q(x_{t−1} | x_t, x₀) = N(μ̃_t(x_t, x₀), β̃_t I) with μ̃_t = c₀ x₀ + c₁ x_t (eq. 6–7) and the
model p_θ(x_{t−1} | x_t) = N(μ̃_t(x_t, x̂₀(x_t, t)), σ_t² I) plugs the network's estimate x̂₀ into
the same mean. The variance σ_t² is fixed, not learned (Ho et al. §3.2 name both choices):

    variance="fixed_large" (default): σ_t² = β_t — right when x₀ is spread out (x₀ ~ N(0, I)).
    variance="fixed_small": σ_t² = β̃_t — right when x₀ is a single point; each KL is then only
        the mean term c₀²‖x₀ − x̂₀‖² / (2β̃_t). (The DDPM *sampler*'s default.)
    For the decoder (t = 1), where β̃_1 = 0, both use β̃_2, as improved-diffusion does.

Why β_t by default: with the *exact* denoiser of discretised Gaussian data (tests/test_metrics.py)
the β_t bound is within 0.03–0.1 bits/dim of the data's entropy, while β̃_t overshoots by
0.6–2.3 bits/dim (it is too narrow wherever x₀ is still uncertain given x_t) — the looseness
that made Nichol & Dhariwal 2021 learn Σ_θ. Both are valid upper bounds; the smaller is better.

The decoder is the discretised Gaussian N(x̂₀(x₁, 1), σ_1²) integrated over each pixel's bin
(the first and last bins extend to ±∞), so the bound is an honest code length for 8-bit data.

Index convention: code index t = 0 … T−1 is the paper's t = 1 … T (diffusers' convention).

Estimating Σ L_{t−1} exactly costs T − 1 network evaluations per image. With
``num_timesteps=K`` the T − 1 steps are cut into K contiguous strata; one t is drawn uniformly
in each stratum (per image) and weighted by the stratum's size. This stratified estimator is
unbiased for the full sum and has lower variance than K uniform draws; K = T − 1 (or None) is
the full sum. Each term also uses one draw of x_t ~ q(x_t | x₀), as in every DDPM likelihood
evaluation, so the result is an unbiased estimate of the bound with a standard error.

Notation: ``ab`` ᾱ_t, ``ab_prev`` ᾱ_{t−1} (1 at the first step), ``beta`` β_t = 1 − ᾱ_t/ᾱ_{t−1},
``post_var`` β̃_t, ``c0``/``c1`` the posterior-mean coefficients, ``model_var`` σ_t².
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difflab.models.distributions import discretized_gaussian_log_likelihood
from difflab.schedulers._common import append_dims

# denoiser(x_t (B, C, H, W), t (B,) int64, class_labels (B,) | None) -> model output (B, C, H, W)
Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]

VARIANCES = ("fixed_small", "fixed_large")


@dataclass
class VLBTables:
    """Float64 tables (T,) of the forward process and the fixed-variance reverse model."""

    ab: Tensor  # ᾱ_t
    ab_prev: Tensor  # ᾱ_{t−1}, with 1 at t = 0
    beta: Tensor  # β_t = 1 − ᾱ_t / ᾱ_{t−1}
    post_var: Tensor  # β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t                    (eq. 7)
    c0: Tensor  # √ᾱ_{t−1} β_t / (1 − ᾱ_t), the coefficient of x₀ in μ̃_t       (eq. 7)
    c1: Tensor  # √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), the coefficient of x_t in μ̃_t
    model_var: Tensor  # σ_t²
    prediction_type: str  # what the denoiser outputs: epsilon | v_prediction | sample
    variance: str

    @property
    def num_train_timesteps(self) -> int:
        return len(self.ab)


def vlb_tables(alphas_cumprod: Tensor, prediction_type: str = "epsilon",
               variance: str = "fixed_large") -> VLBTables:
    """Build the tables from ᾱ_t (T,) (e.g. ``DDPMScheduler(...).alphas_cumprod``)."""
    if variance not in VARIANCES:
        raise ValueError(f"variance={variance!r} is not allowed; choose one of {list(VARIANCES)}")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type={prediction_type!r} is not allowed")
    ab = alphas_cumprod.detach().cpu().double()
    if len(ab) < 2:
        raise ValueError("the bound needs at least 2 diffusion steps")
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    beta = 1.0 - ab / ab_prev
    post_var = (1.0 - ab_prev) / (1.0 - ab) * beta
    c0 = ab_prev.sqrt() * beta / (1.0 - ab)
    c1 = (ab / ab_prev).sqrt() * (1.0 - ab_prev) / (1.0 - ab)
    model_var = (post_var if variance == "fixed_small" else beta).clone()
    model_var[0] = post_var[1]  # β̃_1 = 0: the decoder uses β̃_2 (improved-diffusion's clip)
    return VLBTables(ab, ab_prev, beta, post_var, c0, c1, model_var, prediction_type, variance)


def tables_for(diffusion_config: Any, variance: str = "fixed_large") -> VLBTables:
    """Tables of a :class:`~difflab.training.objectives.DiffusionConfig` (its DDPM schedule)."""
    sched = diffusion_config.make_scheduler()
    return vlb_tables(sched.alphas_cumprod, diffusion_config.prediction_type, variance)


# ------------------------------------------------------------------------------ closed forms

def gaussian_kl(mean1: Tensor, var1: Tensor | float, mean2: Tensor,
                var2: Tensor | float) -> Tensor:
    """Elementwise KL(N(mean1, var1) ‖ N(mean2, var2)) in nats:
    ½ [log(var2/var1) + var1/var2 + (mean1 − mean2)²/var2 − 1]."""
    var1 = torch.as_tensor(var1, dtype=torch.float64)
    var2 = torch.as_tensor(var2, dtype=torch.float64)
    return 0.5 * (torch.log(var2 / var1) + var1 / var2 + (mean1 - mean2) ** 2 / var2 - 1.0)


def pred_x0(output: Tensor, x_t: Tensor, ab_t: Tensor, prediction_type: str) -> Tensor:
    """x̂₀ from the model output. ``ab_t: (B,)`` ᾱ_t; output, x_t: (B, C, H, W).

    epsilon: x̂₀ = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t;   v: x̂₀ = √ᾱ_t x_t − √(1−ᾱ_t) v̂;   sample: x̂₀ = output.
    """
    a = append_dims(ab_t.sqrt(), x_t.ndim)
    s = append_dims((1.0 - ab_t).sqrt(), x_t.ndim)
    if prediction_type == "epsilon":
        return (x_t - s * output) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * output
    return output


def quantize(images: Tensor, num_levels: int = 256) -> Tensor:
    """Snap images in [−1, 1] to the grid of ``num_levels`` levels (8-bit pixels by default)."""
    k = num_levels - 1
    return torch.round((images.double().clamp(-1, 1) + 1) * (k / 2)) * (2 / k) - 1


def prior_kl(x0: Tensor, tables: VLBTables) -> Tensor:
    """L_T = KL(N(√ᾱ_T x₀, (1−ᾱ_T) I) ‖ N(0, I)) per image, (B,) nats."""
    ab_T = tables.ab[-1]
    return gaussian_kl(ab_T.sqrt() * x0, 1.0 - ab_T, torch.zeros_like(x0), 1.0).flatten(1).sum(1)


def vlb_term(denoiser: Denoiser, x0: Tensor, t: Tensor, tables: VLBTables, *,
             class_labels: Tensor | None = None, generator: torch.Generator | None = None,
             clip_denoised: bool = True, num_levels: int = 256) -> Tensor:
    """One term of the bound per image, (B,) float64 nats: L_{t−1} (KL) where t ≥ 1, L_0
    (decoder NLL) where t = 0 (code indices). x₀: (B, C, H, W) float64 on the grid; t: (B,)."""
    dev = x0.device
    idx = t.cpu()
    ab = tables.ab[idx].to(dev)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(dev)
    x_t = append_dims(ab.sqrt(), 4) * x0 + append_dims((1 - ab).sqrt(), 4) * noise  # eq. 4
    labels = None if class_labels is None else class_labels.to(dev)
    out = denoiser(x_t.float(), t.to(dev), labels).double()
    x0_hat = pred_x0(out, x_t, ab, tables.prediction_type)
    if clip_denoised:
        x0_hat = x0_hat.clamp(-1, 1)
    c0, c1 = append_dims(tables.c0[idx].to(dev), 4), append_dims(tables.c1[idx].to(dev), 4)
    mean_true, mean_model = c0 * x0 + c1 * x_t, c0 * x0_hat + c1 * x_t  # μ̃(x_t, x₀), μ_θ
    var_true = append_dims(tables.post_var[idx].to(dev), 4)
    var_model = append_dims(tables.model_var[idx].to(dev), 4)
    decoder = t == 0
    kl = gaussian_kl(mean_true, var_true.clamp_min(1e-300), mean_model, var_model)
    kl = torch.where(append_dims(decoder, 4), torch.zeros_like(kl), kl).flatten(1).sum(1)
    if not bool(decoder.any()):
        return kl
    log_px = discretized_gaussian_log_likelihood(x0, mean=mean_model, std=var_model.sqrt(),
                                                 num_levels=num_levels, low=-1.0, high=1.0)
    nll0 = -log_px.flatten(1).sum(1)
    return torch.where(decoder, nll0, kl)


def strata(num_train_timesteps: int, num_timesteps: int | None) -> list[tuple[int, int]]:
    """[start, stop) ranges of code indices cutting 1 … T−1 into ``num_timesteps`` strata."""
    n = num_train_timesteps - 1
    k = n if num_timesteps is None else int(num_timesteps)
    if not 1 <= k <= n:
        raise ValueError(f"num_timesteps={k} must be in [1, {n}] for T={num_train_timesteps}")
    edges = [1 + (i * n) // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def diffusion_nll(denoiser: Denoiser, images: Tensor, tables: VLBTables, *,
                  class_labels: Tensor | None = None, num_timesteps: int | None = None,
                  batch_size: int = 100, generator: torch.Generator | None = None,
                  clip_denoised: bool = True, num_levels: int = 256, progress: bool = True,
                  device: str | torch.device = "cpu") -> dict[str, Any]:
    """The bound on −log p_θ(x₀) of ``images`` (N, C, H, W) in [−1, 1] (snapped to
    ``num_levels`` levels), averaged over images; in bits/dim with its standard error.

    num_timesteps: strata of the stratified estimate of Σ L_{t−1} (None: all T − 1 terms).
    Returns totals and the parts (``prior_bpd``, ``diffusion_bpd``, ``decoder_bpd``).
    """
    from difflab._tqdm import tqdm

    T = tables.num_train_timesteps
    bins = strata(T, num_timesteps)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    D = images[0].numel()
    per_image = {"prior": [], "diffusion": [], "decoder": []}
    stratum_sums = torch.zeros(len(bins), dtype=torch.float64)
    n_batches = math.ceil(len(images) / batch_size)
    bar = tqdm(total=n_batches * (len(bins) + 1), desc="diffusion NLL", disable=not progress,
               leave=False, dynamic_ncols=True)
    for start in range(0, len(images), batch_size):
        x0 = quantize(images[start:start + batch_size], num_levels).to(device)
        labels = None if class_labels is None else class_labels[start:start + batch_size]
        B = len(x0)
        kw = dict(class_labels=labels, generator=g, clip_denoised=clip_denoised,
                  num_levels=num_levels)
        per_image["prior"].append(prior_kl(x0, tables).cpu())
        total_kl = torch.zeros(B, dtype=torch.float64)
        for j, (lo, hi) in enumerate(bins):
            t = lo + (torch.rand(B, generator=g, dtype=torch.float64) * (hi - lo)).long()
            term = vlb_term(denoiser, x0, t.clamp(max=hi - 1), tables, **kw).cpu()
            total_kl += (hi - lo) * term  # the stratum's size times one uniform draw in it
            stratum_sums[j] += term.sum()
            bar.update(1)
        per_image["diffusion"].append(total_kl)
        per_image["decoder"].append(vlb_term(denoiser, x0, torch.zeros(B, dtype=torch.long),
                                             tables, **kw).cpu())
        bar.update(1)
    bar.close()
    parts = {k: torch.cat(v) for k, v in per_image.items()}
    total = parts["prior"] + parts["diffusion"] + parts["decoder"]  # (N,) nats per image
    to_bpd = 1.0 / (D * math.log(2.0))
    n = len(total)
    sem = float(total.std() / math.sqrt(n)) * to_bpd if n > 1 else float("nan")
    return {
        "nll_bits_per_dim": float(total.mean()) * to_bpd,  # the bound (an upper bound on NLL)
        "nll_bits_per_dim_sem": sem,
        "prior_bpd": float(parts["prior"].mean()) * to_bpd,
        "diffusion_bpd": float(parts["diffusion"].mean()) * to_bpd,
        "decoder_bpd": float(parts["decoder"].mean()) * to_bpd,
        "nll_nats": float(total.mean()),
        "num_images": n,
        "data_dim": D,
        "num_levels": num_levels,
        "num_train_timesteps": T,
        "num_timesteps": len(bins),
        "estimator": "exact sum" if len(bins) == T - 1 else "stratified",
        "variance": tables.variance,
        "clip_denoised": clip_denoised,
        # mean per-step KL (bits/dim) in each stratum: the shape of L_t over t
        "strata": [[lo, hi] for lo, hi in bins],
        "stratum_bpd": (stratum_sums / n * to_bpd).tolist(),
    }


def bundle_nll(bundle: Any, images: Tensor, labels: Tensor | None = None, *,
               num_timesteps: int | None = 50, batch_size: int = 100, seed: int = 0,
               variance: str = "fixed_large", progress: bool = True) -> dict[str, Any]:
    """The bound for a trained diffusion bundle (``difflab.runs.diffusion.load_bundle``).

    A class-conditional U-Net is evaluated unconditionally (the "null" class) when it was trained
    with label dropout, else on the true ``labels`` (then it is a bound on −log p(x | y)).
    """
    unet = bundle.unet.eval()
    tables = tables_for(bundle.diffusion, variance)
    cond = None
    if getattr(unet.config, "num_class_embeds", None):
        if bundle.diffusion.p_uncond > 0 or labels is None:
            cond = torch.full((len(images),), unet.config.num_class_embeds - 1, dtype=torch.long)
        else:
            cond = labels

    def denoiser(x_t: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        return unet(x_t, t, class_labels=class_labels).sample

    dev = next(unet.parameters()).device
    res = diffusion_nll(denoiser, images, tables, class_labels=cond,
                        num_timesteps=num_timesteps, batch_size=batch_size,
                        generator=torch.Generator().manual_seed(seed), progress=progress,
                        device=dev)
    res["conditioning"] = ("none" if cond is None else
                           "null class" if cond is not labels else "true labels")
    return res
