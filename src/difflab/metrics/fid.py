"""Fréchet distance (FID) and kernel inception distance (KID) between two sets of features.

Both compare the distribution of features φ(x) of real and generated images; which network
gives φ is the caller's choice (:mod:`difflab.metrics.features`: a classifier trained on the
same data set; :mod:`difflab.metrics.inception`: the standard FID Inception-v3).

Fréchet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule…", eq. 6;
Dowson & Landau 1982) between the Gaussians N(μ₁, Σ₁), N(μ₂, Σ₂) fitted to the two sets:

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)

Tr((Σ₁^½ Σ₂ Σ₁^½)^½) = Σᵢ √λᵢ with λᵢ the eigenvalues of the symmetric PSD matrix
Σ₁^½ Σ₂ Σ₁^½ (they equal those of Σ₁Σ₂). Computing them with a symmetric eigensolver
(``scipy.linalg.eigvalsh``) in float64 gives real, non-negative values up to rounding — no complex
``sqrtm`` result whose "tiny imaginary part" must be dropped, and no ε added to a singular
covariance. The usual pytorch-fid formula (``scipy.linalg.sqrtm(Σ₁Σ₂)``) is the test oracle.

KID (Bińkowski et al. 2018, "Demystifying MMD GANs", §4): the unbiased estimator of the squared
MMD with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over random subsets:

    MMD²_u = 1/(m(m−1)) Σ_{i≠j} [k(xᵢ, xⱼ) + k(yᵢ, yⱼ)] − 2/m² Σ_{i,j} k(xᵢ, yⱼ)

Unlike FID it has no bias in the number of samples, so small sample sizes compare fairly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def feature_matrix(features: ArrayLike) -> np.ndarray:
    """``features`` as a float64 (N, D) array; a ValueError unless 2-D and finite."""
    if isinstance(features, Tensor):
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"features hold {int((~np.isfinite(x)).sum())} NaN or infinite "
                         "values; a score of them would mean nothing")
    return x


# ----------------------------------------------------------------------------- Fréchet distance

def fit_gaussian(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean μ (D,) and unbiased covariance Σ (D, D) of ``features`` (N, D), in float64."""
    x = feature_matrix(features)
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors to fit a Gaussian, got {len(x)}")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    import scipy.linalg  # ~0.4 s to import: only when a distance is computed

    w, v = scipy.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """d²(N(μ₁, Σ₁), N(μ₂, Σ₂)) = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½), float64.

    mu: (D,); sigma: (D, D) symmetric PSD (singular is fine).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or \
            sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, "
                         f"sigma {sigma1.shape} {sigma2.shape}")
    import scipy.linalg

    root1 = sqrtm_psd(sigma1)
    m = root1 @ sigma2 @ root1
    lam = scipy.linalg.eigvalsh((m + m.T) / 2)  # real by construction; symmetrise rounding
    tr_covmean = np.sqrt(np.clip(lam, 0.0, None)).sum()
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(d2, 0.0))  # ≥ 0 in exact arithmetic; clip rounding at identical inputs


def fid_from_features(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to ``features_a`` (N, D) and ``features_b``."""
    return frechet_distance(*fit_gaussian(features_a), *fit_gaussian(features_b))


# -------------------------------------------------------------------------------------- KID

def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, coef0: float = 1.0) -> Tensor:
    """k(x, y) = (xᵀy / d + coef0)^degree for rows of x (n, d) and y (m, d) → (n, m)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor, degree: int = 3, coef0: float = 1.0) -> Tensor:
    """Unbiased MMD² between samples x (m, d) and y (m', d) (Gretton et al. 2012, eq. 3)."""
    m, n = len(x), len(y)
    k_xx = polynomial_kernel(x, x, degree, coef0)
    k_yy = polynomial_kernel(y, y, degree, coef0)
    k_xy = polynomial_kernel(x, y, degree, coef0)
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()  # i ≠ j
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    return sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.mean()


def kid(features_a: ArrayLike, features_b: ArrayLike, *, num_subsets: int = 100,
        subset_size: int = 1000, generator: torch.Generator | None = None
        ) -> tuple[float, float]:
    """KID: mean and standard deviation of MMD²_u over ``num_subsets`` random subsets.

    Each subset draws ``min(subset_size, N_a, N_b)`` rows of each set without replacement
    (the protocol of Bińkowski et al. 2018 and torch-fidelity). float64 throughout. When both
    sets are smaller than ``subset_size`` every "subset" is the whole of both: MMD²_u is then
    computed once and the standard deviation is NaN (there is no spread to report).
    """
    a = torch.from_numpy(feature_matrix(features_a))
    b = torch.from_numpy(feature_matrix(features_b))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} and {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets={num_subsets} must be >= 1")
    if m == len(a) == len(b):
        return float(mmd2_unbiased(a, b)), float("nan")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    vals = []
    for _ in range(num_subsets):
        ia = torch.randperm(len(a), generator=g)[:m]
        ib = torch.randperm(len(b), generator=g)[:m]
        vals.append(mmd2_unbiased(a[ia], b[ib]))
    v = torch.stack(vals)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


# -------------------------------------------------------------------------------- on images

@torch.no_grad()
def compute_fid(images_a: Tensor, images_b: Tensor, extractor: Any,
                batch_size: int = 500) -> float:
    """Fréchet distance between two image sets (N, C, H, W) in [-1, 1] in ``extractor``'s
    feature space (``extractor(images, batch_size=...) -> (N, D)``)."""
    fa = extractor(images_a, batch_size=batch_size)
    fb = extractor(images_b, batch_size=batch_size)
    return fid_from_features(fa, fb)


# --------------------------------------------------------------- against a data set's images

def quantize_8bit(images_01: Tensor) -> Tensor:
    """Round images in [0, 1] to 8-bit levels, as saving them as PNG would."""
    return torch.round(images_01.clamp(0, 1) * 255) / 255


def fid_of_images(images: Tensor, dataset_spec: str, n_ref: int | None = None, *,
                  split: str = "test", extractor: Any = None, steps: int | None = None,
                  with_kid: bool = False, batch_size: int = 500, quantize: bool = True,
                  progress: bool = False, seed: int = 0) -> dict[str, Any]:
    """FID-style score of ``images`` (N, C, H, W) **in [0, 1]** (e.g. model samples) against
    the ``split`` images of ``dataset_spec``, in the data set's feature-classifier space.

    The reference set is conformed to the images' channels and size; ``n_ref`` takes its first
    n images (all when None). ``quantize`` rounds the images to 8 bits first, so samples are
    scored as the PNGs a user would save. ``extractor`` defaults to
    :func:`~difflab.metrics.features.get_feature_extractor` (cached; ``steps`` passed on).
    Returns ``{"fid", "n", "n_ref", "split", "feature_extractor": {..., "test_accuracy"}}``
    (+ ``"kid"``, ``"kid_std"`` with ``with_kid``).
    """
    from difflab.data import load_dataset
    from difflab.metrics.features import get_feature_extractor

    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    _, c, h, w = images.shape
    if extractor is None:
        extractor = get_feature_extractor(dataset_spec, image_size=h, channels=c, steps=steps,
                                          progress=progress)
    ref = load_dataset(dataset_spec, split, image_size=h, channels=c)
    if n_ref is not None and n_ref < len(ref):
        ref = ref.subset(n_ref)
    x = quantize_8bit(images) if quantize else images.clamp(0, 1)
    f_gen = extractor(x * 2 - 1, batch_size=batch_size)
    f_ref = extractor(ref.images, batch_size=batch_size)
    out: dict[str, Any] = {"fid": fid_from_features(f_gen, f_ref), "n": len(images),
                           "n_ref": len(ref), "split": split, "data": ref.name,
                           "feature_extractor": extractor.info()}
    if with_kid:
        out["kid"], out["kid_std"] = kid(f_gen, f_ref,
                                         generator=torch.Generator().manual_seed(seed))
    return out


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, H, W) with std ``sigma`` px (kernel radius ⌈3σ⌉,
    reflected borders); the baseline "slightly blurred real images"."""
    if sigma <= 0:
        return images
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(images.dtype)
    n, c, h, w = images.shape
    out = images.reshape(n * c, 1, h, w)  # (N·C, 1, H, W): one filter for every channel
    pad_mode = "reflect" if min(h, w) > r else "replicate"
    out = F.conv2d(F.pad(out, (r, r, 0, 0), mode=pad_mode), k.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, r, r), mode=pad_mode), k.view(1, 1, -1, 1))
    return out.reshape(n, c, h, w)


def reference_fid(dataset_spec: str, transform: Callable[[Tensor], Tensor] | None = None, *,
                  n: int | None = None, n_ref: int | None = None, extractor: Any = None,
                  image_size: int | None = None, channels: int | None = None,
                  steps: int | None = None, progress: bool = False) -> dict[str, Any]:
    """The score of real images against the data: ``transform(test images)`` vs the train split.

    ``transform`` maps (N, C, H, W) in [0, 1] to the same (None: identity, the floor), e.g.
    ``lambda x: gaussian_blur(x, 1.0)`` (the blurred-images baseline) or
    ``lambda x: torch.rand_like(x)`` (the ceiling). ``n`` / ``n_ref`` take the first test /
    train images. Returns :func:`fid_of_images`' dict.
    """
    from difflab.data import load_dataset

    test = load_dataset(dataset_spec, "test", image_size=image_size, channels=channels)
    if n is not None and n < len(test):
        test = test.subset(n)
    x = (test.images + 1) / 2
    if transform is not None:
        x = transform(x)
    return fid_of_images(x, dataset_spec, n_ref, split="train", extractor=extractor,
                         steps=steps, progress=progress)
