"""Comparing subspaces and bases: principal angles, orthonormality, |cosine| matrices.

Principal angles θ₁ ≤ … ≤ θ_m (m = min(k_A, k_B)) between span(A) and span(B) are defined by
cos θᵢ = σᵢ(Q_Aᵀ Q_B) with Q_A, Q_B orthonormal bases (Björck & Golub 1973). arccos loses
accuracy for small angles (cos θ ≈ 1 − θ²/2), so as in Knyazev & Argentati (2002) the small
angles come from the sines, sin θ = σ((I − Q_A Q_Aᵀ) Q_B), and the large ones from the cosines.
Everything is float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def orthonormal_basis(A: Tensor) -> Tensor:
    """Orthonormal basis (D, r) of the column span of A (D, k), float64, via SVD (r = rank)."""
    U, S, _ = torch.linalg.svd(A.double(), full_matrices=False)
    tol = S.max() * max(A.shape) * torch.finfo(torch.float64).eps if len(S) else 0.0
    return U[:, S > tol]


def principal_angles(A: Tensor, B: Tensor, *, degrees: bool = False) -> Tensor:
    """Principal angles between span(A) and span(B); A: (D, k_A), B: (D, k_B) (columns span).

    Returns (min(k_A, k_B),) float64, ascending, in radians (degrees if ``degrees``). Where a
    matrix spans less than its column count (rank r < k: a direction collapsed), each missing
    direction counts as a right angle — so k columns agree with a k-dimensional subspace only
    if they span all of it.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must be (D, k) matrices "
                         "with the same D")
    QA, QB = orthonormal_basis(A), orthonormal_basis(B)
    if QB.shape[1] > QA.shape[1]:
        QA, QB = QB, QA  # make QB the smaller basis: its m columns give the m angles
    cos = torch.linalg.svdvals(QA.T @ QB).clamp(0.0, 1.0)  # descending ↔ angles ascending
    sin = torch.linalg.svdvals(QB - QA @ (QA.T @ QB)).clamp(0.0, 1.0).flip(0)  # ascending
    theta = torch.where(cos.pow(2) >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    missing = min(A.shape[1], B.shape[1]) - len(theta)
    theta = torch.cat([theta, theta.new_full((missing,), math.pi / 2)])
    return theta * (180.0 / math.pi) if degrees else theta


def orthonormality(W: Tensor) -> dict[str, float]:
    """How far the columns of W (D, k) are from orthonormal: ‖WᵀW − I‖_F and the extreme
    singular values of W (all 1 for an orthonormal basis)."""
    W = W.double()
    s = torch.linalg.svdvals(W)
    eye = torch.eye(W.shape[1], dtype=torch.float64, device=W.device)
    return {"fro_error": float(torch.linalg.matrix_norm(W.T @ W - eye)),
            "sv_min": float(s.min()), "sv_max": float(s.max())}


def abs_cosine_matrix(A: Tensor, B: Tensor) -> Tensor:
    """|cos| between every column of A (D, k_A) and every column of B (D, k_B): (k_A, k_B)."""
    A = A.double() / torch.linalg.vector_norm(A.double(), dim=0, keepdim=True)
    B = B.double() / torch.linalg.vector_norm(B.double(), dim=0, keepdim=True)
    return (A.T @ B).abs()
