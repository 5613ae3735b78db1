"""Improved precision and recall of a generative model on features (Kynkäänniemi et al. 2019).

"Improved Precision and Recall Metric for Assessing Generative Models", §2: each set of feature
vectors Φ approximates its data manifold by the union of balls centred at its points, each
ball's radius being the distance to the point's k-th nearest neighbour in the same set (k = 3
in the paper):

    f(φ, Φ)   = 1  if ‖φ − φ'‖ ≤ ‖φ' − NN_k(φ', Φ)‖ for at least one φ' ∈ Φ,  else 0     (eq. 1)
    precision = mean over generated φ_g of f(φ_g, Φ_real)   — how many samples look real
    recall    = mean over real φ_r of f(φ_r, Φ_gen)         — how much of the data is covered

A model that draws only a few modes well has high precision and low recall; one that
spreads blurry mass everywhere has the opposite. Distances are computed in float64, in row
blocks so that memory stays at ``block × N`` whatever N is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from difflab.metrics.fid import feature_matrix


def knn_radii(features: Tensor, k: int = 3, block: int = 1000) -> Tensor:
    """Distance of each row of ``features`` (N, D) to its k-th nearest *other* row, (N,)."""
    n = len(features)
    if not 1 <= k < n:
        raise ValueError(f"k={k} must be in [1, N) for N={n} points")
    radii = torch.empty(n, dtype=features.dtype)
    for i in range(0, n, block):
        d = torch.cdist(features[i:i + block], features)  # (block, N); the point itself is 0
        radii[i:i + block] = d.kthvalue(k + 1, dim=1).values
    return radii


def manifold_coverage(query: Tensor, support: Tensor, radii: Tensor,
                      block: int = 1000) -> Tensor:
    """f(φ, Φ) of eq. 1 for every row φ of ``query`` (M, D): inside any ball of ``support``
    (N, D) with ``radii`` (N,)? Returns (M,) bool."""
    inside = torch.empty(len(query), dtype=torch.bool)
    for i in range(0, len(query), block):
        d = torch.cdist(query[i:i + block], support)  # (block, N)
        inside[i:i + block] = (d <= radii[None, :]).any(dim=1)
    return inside


def precision_recall(real_features: Tensor | np.ndarray, fake_features: Tensor | np.ndarray,
                     k: int = 3, block: int = 1000) -> dict[str, float]:
    """Improved precision and recall of ``fake_features`` (M, D) against ``real_features``
    (N, D). Returns ``{"precision", "recall", "k"}``."""
    real = torch.from_numpy(feature_matrix(real_features))
    fake = torch.from_numpy(feature_matrix(fake_features))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} and {fake.shape[1]}")
    precision = manifold_coverage(fake, real, knn_radii(real, k, block), block)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, block), block)
    return {"precision": float(precision.double().mean()),
            "recall": float(recall.double().mean()), "k": k}
