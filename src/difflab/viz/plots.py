"""Plots (matplotlib, Agg backend — no screen needed): loss curves, latent scatters."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path, *,
                     title: str = "training loss", log_y: bool = True,
                     smooth: int = 25) -> Path:
    """One line per named curve of (step, value) points; a running mean tames the noise."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, pts in curves.items():
        if not pts:
            continue
        steps = np.array([p[0] for p in pts], dtype=float)
        vals = np.array([p[1] for p in pts], dtype=float)
        k = max(1, min(smooth, len(vals) // 10 or 1))
        if k > 1:
            vals = np.convolve(vals, np.ones(k) / k, mode="valid")
            steps = steps[k - 1:]
        ax.plot(steps, vals, label=name, lw=1.2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_latent_scatter(z: np.ndarray, labels: np.ndarray, class_names: list[str],
                        path: str | Path, *, title: str = "latent space") -> Path:
    """Scatter of 2-D latents (N, 2) coloured by class."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    cmap = plt.get_cmap("tab10")
    for c in np.unique(labels):
        m = labels == c
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        ax.scatter(z[m, 0], z[m, 1], s=4, color=cmap(int(c) % 10), label=name, alpha=0.7)
    ax.set_title(title)
    ax.set_xlabel("z₁")
    ax.set_ylabel("z₂")
    ax.legend(markerscale=3, fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
