"""Metrics against closed forms: Fréchet distance, KID, precision/recall, the DDPM bound,
and the cached, deterministic feature classifier."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch

from difflab.errors import CheckpointError, DifflabError
from difflab.metrics.diffusion_nll import (
    diffusion_nll,
    gaussian_kl,
    prior_kl,
    strata,
    vlb_tables,
    vlb_term,
)
from difflab.metrics.fid import (
    fid_from_features,
    fit_gaussian,
    frechet_distance,
    gaussian_blur,
    kid,
    mmd2_unbiased,
    polynomial_kernel,
)
from difflab.metrics.precision_recall import knn_radii, precision_recall
from difflab.models.distributions import discretized_gaussian_log_likelihood
from difflab.schedulers.schedules import alphas_cumprod, make_betas


def _random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _pytorch_fid_formula(mu1, s1, mu2, s2) -> float:
    """The reference implementation's formula (pytorch-fid / TTUR): sqrtm of the product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------- Fréchet distance

def test_frechet_distance_commuting_covariances_closed_form():
    # Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ commute: d² = ‖μ₁−μ₂‖² + Σ (√a − √b)².
    rng = np.random.default_rng(0)
    d = 6
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    diag = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert diag == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_sqrtm_oracle_and_is_symmetric():
    rng = np.random.default_rng(1)
    d = 10
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_pytorch_fid_formula(mu1, s1, mu2, s2), rel=1e-9)
    assert got == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_singular_covariance_is_finite_and_exact():
    # Rank-1 covariances along the same axis: d² = (√2 − √0.5)² on that axis.
    e = np.zeros((4, 4))
    e[0, 0] = 1.0
    got = frechet_distance(np.zeros(4), 2.0 * e, np.zeros(4), 0.5 * e)
    assert got == pytest.approx((math.sqrt(2) - math.sqrt(0.5)) ** 2, rel=1e-10)


def test_fid_from_samples_converges_to_closed_form():
    rng = np.random.default_rng(2)
    d = 4
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.5, 1.0, 1.0, 3.0])
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    x = rng.standard_normal((200_000, d)) * np.sqrt(a) + mu1
    y = rng.standard_normal((200_000, d)) * np.sqrt(b) + mu2
    assert fid_from_features(torch.from_numpy(x), y) == pytest.approx(exact, rel=0.01)
    m, s = fit_gaussian(x)
    assert m.shape == (d,) and s.shape == (d, d)


# ---------------------------------------------------------------------------------------- KID

def test_mmd2_unbiased_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.3

    def k(u, v):
        return (float(u @ v) / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert float(mmd2_unbiased(x, y)) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert polynomial_kernel(x, y).shape == (7, 5)


def test_kid_zero_for_same_distribution_positive_for_shifted():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)
    same, same_std = kid(a, b, num_subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3
    shifted, _ = kid(a, b + 0.5, num_subsets=20, subset_size=500)
    assert shifted > 0.05 and shifted > 20 * abs(same)
    assert kid(a, b, num_subsets=5) == kid(a, b, num_subsets=5)  # seeded by default
    whole, spread = kid(a[:100], b[:100], subset_size=1000)  # subsets = the whole sets
    assert whole == pytest.approx(float(mmd2_unbiased(a[:100].double(), b[:100].double())))
    assert math.isnan(spread)


# ------------------------------------------------------------------------- precision / recall

def test_precision_recall_toy_distributions():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1500, 2, generator=g)
    same = torch.randn(1500, 2, generator=g)
    pr = precision_recall(real, same)
    assert pr["precision"] > 0.85 and pr["recall"] > 0.85
    assert precision_recall(real, real)["precision"] == 1.0  # every point is in its own ball

    far = torch.randn(1500, 2, generator=g) + 20.0
    pr = precision_recall(real, far)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0

    cand = torch.randn(20000, 2, generator=g)
    subset = cand[cand[:, 0] > 1.0][:1500]  # one tail of the real distribution
    pr = precision_recall(real, subset)
    assert pr["precision"] > 0.85 and pr["recall"] < 0.35


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_or_mismatched_features_are_refused_by_every_score(bad):
    """A NaN or infinite feature (a diverged model's samples) is a ValueError for FID, KID and
    precision/recall alike, never a number; so are feature sets of different widths."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 4)), rng.normal(size=(50, 4))
    a[3, 2] = bad
    for score in (fid_from_features, lambda x, y: kid(x, y, subset_size=20), precision_recall):
        for x, y in ((a, b), (b, a)):
            with pytest.raises(ValueError, match="NaN or infinite"):
                score(x, y)
        with pytest.raises(ValueError, match="differ|do not match"):
            score(b, rng.normal(size=(50, 5)))


def test_knn_radii_exclude_the_point_itself():
    pts = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    assert knn_radii(pts, k=1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert knn_radii(pts, k=2).tolist() == [3.0, 2.0, 3.0, 5.0]


# ----------------------------------------------------------------------------- blur baseline

def test_gaussian_blur_preserves_constants_and_mass():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 8, 8), 0.7), 1.0),
                          torch.full((1, 1, 8, 8), 0.7), atol=1e-6)
    y = gaussian_blur(x, 0.5)
    assert y.shape == x.shape and y.std() < x.std()
    assert torch.equal(gaussian_blur(x, 0.0), x)


# ------------------------------------------------------------------------ DDPM bound: pieces

def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g,
                                                                            dtype=torch.float64)
    v1, v2 = torch.rand(50, generator=g, dtype=torch.float64) + 0.1, torch.rand(
        50, generator=g, dtype=torch.float64) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, v1.sqrt()),
                                            torch.distributions.Normal(m2, v2.sqrt()))
    assert torch.allclose(gaussian_kl(m1, v1, m2, v2), ref, rtol=1e-12, atol=1e-14)


def test_discretized_decoder_sums_to_one_over_256_bins():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, std in ((0.0, 0.01), (0.93, 0.2), (-1.4, 0.05), (0.3, 3.0)):
        logp = discretized_gaussian_log_likelihood(levels, mean=torch.tensor(mean),
                                                   std=std, num_levels=256, low=-1.0, high=1.0)
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-10)


def test_vlb_tables_closed_forms():
    ab = alphas_cumprod(make_betas("linear", 100))
    tab = vlb_tables(ab, "epsilon", "fixed_small")
    t = 37
    beta = 1 - ab[t] / ab[t - 1]
    assert float(tab.post_var[t]) == pytest.approx(float((1 - ab[t - 1]) / (1 - ab[t]) * beta),
                                                   rel=1e-12)
    # posterior mean coefficients reproduce x_{t−1}'s mean when x_t has its mean √ᾱ_t x₀ ...
    assert float(tab.c0[t] + tab.c1[t] * ab[t].sqrt()) == pytest.approx(
        float(ab[t - 1].sqrt()), rel=1e-12)
    assert float(tab.c0[0]) == pytest.approx(1.0) and float(tab.c1[0]) == 0.0
    assert float(tab.model_var[0]) == float(tab.post_var[1])  # decoder: the clipped β̃
    large = vlb_tables(ab, "epsilon", "fixed_large")
    assert torch.equal(large.model_var[1:], tab.beta[1:])
    assert strata(100, None) == [(t, t + 1) for t in range(1, 100)]
    cuts = strata(100, 7)
    assert cuts[0][0] == 1 and cuts[-1][1] == 100 and len(cuts) == 7
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))


# ----------------------------------------------------- DDPM bound: Gaussian data, exact denoiser

M, S = 0.1, 0.4  # data x₀ ~ N(M, S²) per pixel


def _optimal_eps(ab: torch.Tensor):
    """The exact ε-predictor for x₀ ~ N(M, S² I): ε̂ = (x_t − √ᾱ E[x₀|x_t]) / √(1−ᾱ)."""
    def denoiser(x_t, t, labels=None):
        a2 = ab[t.cpu()].to(x_t.dtype).view(-1, 1, 1, 1)
        a, b2 = a2.sqrt(), 1 - a2
        x0 = M + a * S**2 / (a2 * S**2 + b2) * (x_t - a * M)  # E[x₀ | x_t]
        return (x_t - a * x0) / b2.sqrt()
    return denoiser


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_vlb_terms_match_closed_form_on_gaussian_data(variance):
    # With the exact E[x₀|x_t] the model mean misses μ̃ by c₀(x₀ − E[x₀|x_t]), so
    # E L_{t−1} = D/2 [log(σ²/β̃) + β̃/σ² − 1 + c₀² Var[x₀|x_t] / σ²]
    # with Var[x₀|x_t] = S²(1−ᾱ_t) / (ᾱ_t S² + 1 − ᾱ_t) for x₀ ~ N(M, S²).
    T, D, N = 200, 16, 4000
    ab = alphas_cumprod(make_betas("linear", T, 1e-4, 0.05))
    tab = vlb_tables(ab, "epsilon", variance)
    g = torch.Generator().manual_seed(0)
    x0 = (M + S * torch.randn(N, 1, 4, 4, generator=g, dtype=torch.float64))
    den = _optimal_eps(ab)
    for t in (1, 5, 40, 199):
        terms = vlb_term(den, x0, torch.full((N,), t), tab, generator=g, clip_denoised=False)
        var_post = S**2 * (1 - ab[t]) / (ab[t] * S**2 + 1 - ab[t])
        bt, s2 = tab.post_var[t], tab.model_var[t]
        exact = float(D / 2 * (torch.log(s2 / bt) + bt / s2 - 1 + tab.c0[t] ** 2 * var_post / s2))
        sem = float(terms.std()) / math.sqrt(N)
        assert abs(float(terms.mean()) - exact) < 4 * sem + 1e-9 * exact, (t, exact)
    a2, b2 = ab[-1], 1 - ab[-1]
    exact_prior = D / 2 * float(a2 * (M**2 + S**2) + b2 - 1 - torch.log(b2))
    assert float(prior_kl(x0, tab).mean()) == pytest.approx(exact_prior, rel=0.02)


LEVELS = torch.linspace(-1, 1, 256, dtype=torch.float64)
LOG_P = discretized_gaussian_log_likelihood(LEVELS, mean=torch.tensor(M), std=S, num_levels=256,
                                            low=-1.0, high=1.0)  # N(M, S²) on 8-bit levels


def _discrete_optimal_eps(ab: torch.Tensor):
    """The exact ε-predictor for 8-bit data with level probabilities exp(LOG_P): E[x₀|x_t] is a
    softmax-weighted mean over the 256 levels, pixel by pixel."""
    def denoiser(x_t, t, labels=None):
        a2 = ab[t.cpu()].view(-1, 1, 1, 1)
        a, b2 = a2.sqrt(), 1 - a2
        xt = x_t.double()
        logw = LOG_P - (xt.unsqueeze(-1) - a.unsqueeze(-1) * LEVELS) ** 2 / (2 * b2.unsqueeze(-1))
        x0 = (torch.softmax(logw, dim=-1) * LEVELS).sum(-1)
        return ((xt - a * x0) / b2.sqrt()).float()
    return denoiser


def test_bound_of_exact_denoiser_is_near_entropy_and_random_model_is_worse():
    T = 200
    ab = alphas_cumprod(make_betas("linear", T, 1e-4, 0.05))
    g = torch.Generator().manual_seed(1)
    idx = torch.multinomial(LOG_P.exp(), 256 * 16, replacement=True, generator=g)
    x = LEVELS[idx].view(256, 1, 4, 4).float()
    entropy = float(-(LOG_P.exp() * LOG_P).sum()) / math.log(2)  # ≈ 7.63 bits ≤ any NLL
    den = _discrete_optimal_eps(ab)
    kw = dict(progress=False, clip_denoised=False, batch_size=256)
    exact = diffusion_nll(den, x, vlb_tables(ab, "epsilon", "fixed_large"), num_timesteps=None,
                          generator=torch.Generator().manual_seed(0), **kw)
    assert exact["estimator"] == "exact sum" and exact["num_timesteps"] == T - 1
    bpd, sem = exact["nll_bits_per_dim"], exact["nll_bits_per_dim_sem"]
    assert entropy - 3 * sem < bpd < entropy + 0.15
    parts = exact["prior_bpd"] + exact["diffusion_bpd"] + exact["decoder_bpd"]
    assert parts == pytest.approx(bpd, rel=1e-9)
    small = diffusion_nll(den, x, vlb_tables(ab, "epsilon", "fixed_small"), num_timesteps=None,
                          generator=torch.Generator().manual_seed(0), **kw)
    assert small["nll_bits_per_dim"] > bpd + 0.5  # β̃_t is too narrow while x₀ is uncertain

    strat = diffusion_nll(den, x, vlb_tables(ab, "epsilon", "fixed_large"), num_timesteps=10,
                          generator=torch.Generator().manual_seed(2), **kw)
    assert strat["estimator"] == "stratified"
    assert abs(strat["nll_bits_per_dim"] - bpd) < 4 * (strat["nll_bits_per_dim_sem"] + sem)

    def untrained(x_t, t, labels=None):  # an "ε-predictor" that ignores the data
        return torch.tanh(0.5 * x_t + 0.3)

    bad = diffusion_nll(untrained, x, vlb_tables(ab, "epsilon"), num_timesteps=10,
                        progress=False, generator=torch.Generator().manual_seed(0))
    assert bad["nll_bits_per_dim"] > bpd + 1.0


def test_bound_of_random_unet_on_digits_is_finite_and_worse():
    from difflab.metrics.diffusion_nll import tables_for
    from difflab.models.unet import UNet2DModel, UNetConfig
    from difflab.training.objectives import DiffusionConfig

    torch.manual_seed(0)
    unet = UNet2DModel(UNetConfig(in_channels=1, out_channels=1, sample_size=8,
                                  block_out_channels=(8, 16), attention_levels=(False, False),
                                  mid_attention=False, norm_num_groups=4)).eval()
    tab = tables_for(DiffusionConfig(num_train_timesteps=100), "fixed_small")
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def den(x_t, t, labels=None):
        return unet(x_t, t).sample

    res = diffusion_nll(den, x, tab, num_timesteps=4, progress=False, batch_size=4)
    assert math.isfinite(res["nll_bits_per_dim"]) and res["nll_bits_per_dim"] > 8.0
    assert len(res["stratum_bpd"]) == 4


# -------------------------------------------------------------------------- feature classifier

@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    # one cache for the module (the second test reuses the first one's classifier), never ~/.cache
    root = tmp_path_factory.getbasetemp() / "metrics-cache"
    monkeypatch.setenv("DIFFLAB_CACHE", str(root))
    return root / "features"


def test_feature_extractor_trains_caches_and_is_deterministic(cache, tmp_path):
    from difflab.data import load_dataset
    from difflab.metrics.features import get_feature_extractor

    ext = get_feature_extractor("digits", steps=30, progress=False)
    assert ext.path.parent == cache
    assert (ext.path / "model.safetensors").is_file() and ext.test_accuracy > 0.3
    mtime = (ext.path / "model.safetensors").stat().st_mtime_ns
    again = get_feature_extractor("digits", steps=30, progress=False)
    assert not again.trained_now
    assert (ext.path / "model.safetensors").stat().st_mtime_ns == mtime
    assert again.test_accuracy == ext.test_accuracy

    x = load_dataset("digits", "test").images[:50]
    f = ext(x)
    assert f.shape == (50, ext.feature_dim) and torch.equal(f, again(x))
    other = get_feature_extractor("digits", steps=30, progress=False,
                                  cache_dir=tmp_path / "elsewhere")
    assert other.trained_now and torch.equal(other(x), f)  # same seed ⇒ same weights
    assert other.test_accuracy == ext.test_accuracy
    with pytest.raises(DifflabError, match="expects images of shape"):
        ext(torch.zeros(2, 1, 28, 28))


def test_fid_of_images_orders_real_blur_and_noise(cache):
    from difflab.metrics.features import get_feature_extractor
    from difflab.metrics.fid import fid_of_images, reference_fid

    ext = get_feature_extractor("digits", steps=30, progress=False)
    real = reference_fid("digits", extractor=ext)
    blur = reference_fid("digits", lambda x: gaussian_blur(x, 1.0), extractor=ext)
    noise = reference_fid("digits", lambda x: torch.rand(
        x.shape, generator=torch.Generator().manual_seed(0)), extractor=ext)
    assert real["fid"] < blur["fid"] < noise["fid"]
    assert real["n"] == 360 and real["n_ref"] == 1437 and real["split"] == "train"
    out = fid_of_images(torch.rand(40, 1, 8, 8), "digits", n_ref=100, extractor=ext,
                        with_kid=True)
    assert out["n_ref"] == 100 and math.isfinite(out["kid"])
    assert out["feature_extractor"]["test_accuracy"] == ext.test_accuracy


# ----------------------------------------------------------------------------------- Inception

def test_inception_architecture_loads_weights_only_state_dict(tmp_path):
    from difflab.metrics.inception import FIDInceptionV3, load_fid_inception

    torch.manual_seed(0)
    net = FIDInceptionV3()
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)  # a plain tensor file, like pytorch-fid's
    feats = load_fid_inception(path)
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    out = feats(x)
    assert out.shape == (1, 2048)
    with torch.no_grad():
        assert torch.allclose(out, net.eval()(x), atol=1e-5)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960  # torchvision's, 1008 classes


def test_inception_refuses_pickled_objects_and_mismatched_shapes(tmp_path):
    from difflab.metrics.inception import read_state_dict

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"fc.weight": _Unsafe()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(evil)
    assert not _Unsafe.loaded

    from difflab.metrics.inception import load_fid_inception

    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(CheckpointError, match="do not match"):
        load_fid_inception(bad)


class _Unsafe:
    loaded = False

    def __reduce__(self):
        return (_mark_loaded, ())


def _mark_loaded():
    _Unsafe.loaded = True
    return 0
