"""Pictures of the noise schedules: β_t, ᾱ_t and log-SNR, and an image noised along each.

The point to see (Nichol & Dhariwal 2021, Fig. 3 and 5): the linear schedule drives ᾱ_t to ~0
long before t = T, so the last part of the chain is wasted on pure noise and an image is
unrecognisable early; the cosine schedule destroys information evenly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure  # rendered by Agg; no pyplot, no global backend change
from torch import Tensor

from difflab.schedulers.schedules import add_noise, alphas_cumprod, log_snr, make_betas

# Each schedule with the β range it is normally used with (DDPM's for linear and sigmoid,
# Stable Diffusion's for scaled_linear; cosine has none).
SCHEDULE_PRESETS: dict[str, dict[str, float]] = {
    "linear": {"beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {},
    "sigmoid": {"beta_start": 1e-4, "beta_end": 0.02},
}
LABELS = {"squaredcos_cap_v2": "cosine"}


def _betas(name: str, num_train_timesteps: int) -> Tensor:
    return make_betas(name, num_train_timesteps, **SCHEDULE_PRESETS.get(name, {}))


def plot_schedules(path: str | Path, names: Sequence[str] = tuple(SCHEDULE_PRESETS),
                   num_train_timesteps: int = 1000) -> Path:
    """Write a PNG with three panels (β_t, ᾱ_t, log-SNR λ_t) for each schedule in ``names``."""
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    t = torch.arange(num_train_timesteps)
    for name in names:
        betas = _betas(name, num_train_timesteps)
        ab = alphas_cumprod(betas)
        label = LABELS.get(name, name)
        axes[0].plot(t, betas, label=label)
        axes[1].plot(t, ab, label=label)
        axes[2].plot(t[:-1], log_snr(ab)[:-1], label=label)  # λ_T may be −∞
    for ax, title in zip(axes, ["β_t", "ᾱ_t", "log-SNR  λ_t = log ᾱ_t/(1−ᾱ_t)"]):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_forward_process(image: Tensor, path: str | Path,
                         schedules: Sequence[str] = tuple(SCHEDULE_PRESETS),
                         ts: Sequence[int] = (0, 100, 200, 300, 500, 700, 850, 999),
                         num_train_timesteps: int = 1000, seed: int = 0) -> Path:
    """Grid of x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε: one row per schedule, one column per t.

    ``image: (C, H, W)`` in [−1, 1] with C = 1 or 3. The same ε is used in every cell, so the
    rows differ only by the schedule.
    """
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (C, H, W) with C in (1, 3), got {tuple(image.shape)}")
    x0 = image.detach().cpu().to(torch.float64)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)
    fig = Figure(figsize=(1.6 * len(ts), 1.8 * len(schedules)))
    axes = fig.subplots(len(schedules), len(ts), squeeze=False)
    for row, name in enumerate(schedules):
        ab = alphas_cumprod(_betas(name, num_train_timesteps))
        for col, t in enumerate(ts):
            x_t = add_noise(x0[None], eps[None], torch.tensor([t]), ab)[0]
            pixels = ((x_t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0)  # (H, W, C) in [0, 1]
            ax = axes[row][col]
            ax.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels,
                      cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"t={t}", fontsize=9)
            if col == 0:
                ax.set_ylabel(LABELS.get(name, name), fontsize=9)
            ax.set_xlabel(f"ᾱ={float(ab[t]):.2f}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
