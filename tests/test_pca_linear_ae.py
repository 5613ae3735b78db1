"""Principal angles, and the linear autoencoder finding the PCA subspace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.experiments import format_table, plot_bases, run_pca_vs_linear_ae
from difflab.metrics.subspace import abs_cosine_matrix, orthonormality, principal_angles


def rotated_pair(theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """span(e1, e2) and span(e1, cos θ e2 + sin θ e3) in R^5: principal angles (0, θ)."""
    A = torch.eye(5, dtype=torch.float64)[:, :2]
    B = A.clone()
    B[:, 1] = 0
    B[1, 1], B[2, 1] = math.cos(theta), math.sin(theta)
    return A, B


@pytest.mark.parametrize("theta", [1e-7, 1e-3, 0.3, 1.2, math.pi / 2])
def test_principal_angles_known_values(theta):
    A, B = rotated_pair(theta)
    angles = principal_angles(A, B)
    assert angles.dtype == torch.float64
    torch.testing.assert_close(angles, torch.tensor([0.0, theta], dtype=torch.float64),
                               atol=1e-12, rtol=1e-9)  # small θ exact: sine branch


def test_principal_angles_ignore_the_basis_and_handle_unequal_dims():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 4, generator=g, dtype=torch.float64)
    mix = torch.randn(4, 4, generator=g, dtype=torch.float64)
    assert principal_angles(A, A @ mix).max() < 1e-6
    bigger = torch.cat([A, torch.randn(20, 3, generator=g, dtype=torch.float64)], 1)
    assert principal_angles(bigger, A).shape == (4,)
    assert principal_angles(A, bigger).max() < 1e-6  # span(A) ⊂ span(bigger)
    collapsed = A.clone()
    collapsed[:, 3] = collapsed[:, 0] + collapsed[:, 1]  # 4 columns spanning 3 dimensions
    deg = principal_angles(collapsed, A, degrees=True)
    assert deg.shape == (4,) and deg[:3].max() < 1e-6 and deg[3] == 90.0
    deg = principal_angles(*rotated_pair(0.5), degrees=True)
    assert deg[1].item() == pytest.approx(math.degrees(0.5))
    with pytest.raises(ValueError):
        principal_angles(A, torch.randn(19, 4))


def test_orthonormality_and_cosines():
    Q, _ = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64))
    o = orthonormality(Q)
    assert o["fro_error"] < 1e-12 and o["sv_min"] == pytest.approx(1) == o["sv_max"]
    o2 = orthonormality(2 * Q)
    assert o2["fro_error"] == pytest.approx(3 * math.sqrt(3))
    torch.testing.assert_close(abs_cosine_matrix(-3 * Q, Q), torch.eye(3, dtype=torch.float64))


def low_rank_data(n: int = 400, d: int = 30, k: int = 4, noise: float = 0.1) -> torch.Tensor:
    """X = Z diag(s) Uᵀ + noise + offset: k clear directions (variances 9, 6, 4, 2.5)."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    scales = torch.tensor([3.0, 2.45, 2.0, 1.58])[:k]
    X = (torch.randn(n, k, generator=g) * scales) @ U.T
    return X + noise * torch.randn(n, d, generator=g) + torch.randn(d, generator=g)


@pytest.mark.parametrize("tied", [True, False])
def test_linear_ae_finds_the_pca_subspace(tied):
    r = run_pca_vs_linear_ae(low_rank_data(), 4, tied=tied, steps=200,
                             generator=torch.Generator().manual_seed(0), lbfgs_steps=500)
    assert r.max_angle_deg < 2.0, r.angles_deg  # measured: 3e-6° tied, 1e-4° untied
    assert abs(r.mse_rel_gap) < 0.01, (r.mse_ae, r.mse_pca)  # measured: < 1e-9
    assert r.mse_ae >= r.mse_pca * (1 - 1e-9)  # PCA is optimal
    assert r.abs_cos.shape == (4, 4) and r.ae_basis.shape == (30, 4)
    if tied:  # optimum of the tied AE: orthonormal columns
        assert r.orth_fro_error < 1e-4 and abs(r.sv_min - 1) < 1e-4 and abs(r.sv_max - 1) < 1e-4
    # the learned map reproduces PCA's reconstructions
    X = low_rank_data().double()
    with torch.no_grad():
        assert torch.mean((r.model(X) - X) ** 2).item() == pytest.approx(r.mse_ae, rel=1e-9)


def test_report_and_plot(tmp_path):
    X = low_rank_data(n=100, d=16, k=3)
    r = run_pca_vs_linear_ae(X, 3, tied=True, steps=50, lbfgs_steps=200,
                             generator=torch.Generator().manual_seed(1))
    table = format_table(r)
    for key in ("max principal angle", "reconstruction MSE, PCA", "||W^T W - I||_F", "|cos|"):
        assert key in table
    path = plot_bases(r, (4, 4), tmp_path / "bases.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_pca_vs_linear_ae(X, 3, tied=True, steps=50, lbfgs_steps=200,
                                 generator=torch.Generator().manual_seed(1))
    assert np.array_equal(again.ae_basis, r.ae_basis)  # same seed ⇒ same numbers
