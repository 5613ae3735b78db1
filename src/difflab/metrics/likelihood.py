"""Likelihood of a VAE: the ELBO and the importance-weighted (IWAE) bound, in nats and bits/dim.

For one image with data t (what the model's likelihood is defined on, see
``VAE.likelihood_targets``) and posterior q(z | t):

  ELBO     L₁ = E_q[log p(t | z)] − KL(q(z | t) ‖ p(z))                 ≤ log p(t)
  IWAE     L_k = E[ log (1/k) Σᵢ p(t, zᵢ)/q(zᵢ | t) ],  zᵢ ~ q             (Burda et al. 2016)

L₁ ≤ L_k ≤ L_{k+1} ≤ log p(t), and L_k → log p(t) as k → ∞, so −L_k with large k (1000 in the
IWAE paper, 5000 in some later work) is the standard NLL estimate. Both are computed per image
in nats; ``to_bits_per_dim`` divides by D·ln 2. The numbers are honest code lengths only
because the model's p(t | z) is a probability *mass* on discrete data (Bernoulli on binary
pixels, or a discretised Gaussian on 8-bit levels) — see ``difflab.models.vae``.

A model used here needs ``likelihood_targets(x, generator)``, ``encode(x) -> DiagonalGaussian``
(over (B, d)), ``log_px_given_z(t, z) -> (B,)``, ``data_dim`` and ``likelihood_kind``; the prior
is N(0, I).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

from difflab.models.distributions import DiagonalGaussian, standard_normal_log_prob


class LatentVariableModel(Protocol):
    data_dim: int
    likelihood_kind: str

    def likelihood_targets(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        ...

    def encode(self, x: Tensor) -> DiagonalGaussian:
        ...

    def log_px_given_z(self, t: Tensor, z: Tensor) -> Tensor:
        ...


def to_bits_per_dim(nats: Tensor | float, D: int) -> Tensor | float:
    """NLL in nats per image → bits per dimension: nats / (D · ln 2)."""
    return nats / (D * math.log(2.0))


def _targets(model: LatentVariableModel, x: Tensor, generator: torch.Generator | None,
             targets: Tensor | None) -> Tensor:
    return model.likelihood_targets(x, generator) if targets is None else targets


def elbo(model: LatentVariableModel, x: Tensor, generator: torch.Generator | None = None, *,
         targets: Tensor | None = None, num_samples: int = 1) -> Tensor:
    """ELBO per image in nats, (B,): log p(t|z) averaged over ``num_samples`` z ~ q(z|t), minus
    the closed-form KL(q ‖ N(0, I)).

    x: (B, C, H, W) in [-1, 1]. ``targets``: the data t (e.g. one fixed binarisation shared with
    :func:`iwae_nll`); drawn from x with ``generator`` when None. Differentiable.
    """
    t = _targets(model, x, generator, targets)
    q = model.encode(2.0 * t - 1.0)
    rec = torch.stack([model.log_px_given_z(t, q.sample(generator))
                       for _ in range(num_samples)]).mean(0)
    return rec - q.kl()


@torch.no_grad()
def iwae_nll(model: LatentVariableModel, x: Tensor, k: int = 1000, batch_k: int = 100,
             generator: torch.Generator | None = None, *, targets: Tensor | None = None) -> Tensor:
    """−L_k per image in nats, (B,): −log (1/k) Σᵢ exp(log p(t|zᵢ) + log p(zᵢ) − log q(zᵢ|t)).

    The k importance samples are drawn ``batch_k`` at a time, so memory holds B·batch_k decoder
    outputs plus the (k, B) log-weights; the log-mean-exp is exact (done once over all k).
    """
    if k < 1 or batch_k < 1:
        raise ValueError(f"k={k} and batch_k={batch_k} must be >= 1")
    t = _targets(model, x, generator, targets)
    q = model.encode(2.0 * t - 1.0)
    B = len(t)
    n_event = q.mean.dim() - 1
    log_w = []
    for start in range(0, k, batch_k):
        kk = min(batch_k, k - start)
        z = q.sample(generator, num_samples=kk)  # (kk, B, d)
        t_rep = t.expand(kk, *t.shape).flatten(0, 1)  # (kk·B, C, H, W)
        log_px = model.log_px_given_z(t_rep, z.flatten(0, 1)).view(kk, B)
        log_w.append(log_px + standard_normal_log_prob(z, n_event) - q.log_prob(z))
    log_w = torch.cat(log_w)  # (k, B)
    return -(torch.logsumexp(log_w.double(), dim=0) - math.log(k)).to(t.dtype)


@torch.no_grad()
def evaluate_likelihood(model: Any, images: Tensor, k: int = 1000,
                        generator: torch.Generator | None = None, progress: bool = True, *,
                        batch_size: int = 100, batch_k: int = 100) -> dict[str, Any]:
    """ELBO and IWAE NLL of ``images`` (N, C, H, W) in [-1, 1], averaged over images.

    Each image's data t is drawn once (one binarisation for a dynamically binarised Bernoulli
    model) and shared by both bounds. Returns nats per image and bits/dim (with standard errors
    of the mean over images), ``k``, ``num_images``, ``data_dim`` and ``likelihood_kind``.
    """
    from difflab._tqdm import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nelbo, nll = [], []
    try:
        for start in tqdm(range(0, len(images), batch_size), disable=not progress,
                          desc=f"likelihood (k={k})"):
            x = images[start:start + batch_size].to(device)
            t = model.likelihood_targets(x, generator)
            nelbo.append(-elbo(model, x, generator, targets=t).double().cpu())
            nll.append(iwae_nll(model, x, k, batch_k, generator, targets=t).double().cpu())
    finally:
        model.train(was_training)
    nelbo_t, nll_t = torch.cat(nelbo), torch.cat(nll)
    D = model.data_dim

    def sem(v: Tensor) -> float:
        return float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")

    return {
        "likelihood_kind": model.likelihood_kind,
        "num_images": len(nll_t),
        "data_dim": D,
        "k": k,
        "nelbo_nats": float(nelbo_t.mean()),
        "nelbo_nats_sem": sem(nelbo_t),
        "iwae_nll_nats": float(nll_t.mean()),
        "iwae_nll_nats_sem": sem(nll_t),
        "nelbo_bits_per_dim": float(to_bits_per_dim(nelbo_t.mean(), D)),
        "iwae_nll_bits_per_dim": float(to_bits_per_dim(nll_t.mean(), D)),
    }
