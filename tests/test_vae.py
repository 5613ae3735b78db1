"""DiagonalGaussian closed forms, the VAE, and its likelihood bounds (ELBO ≤ IWAE)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits

from difflab.errors import ConfigError
from difflab.metrics.likelihood import elbo, evaluate_likelihood, iwae_nll, to_bits_per_dim
from difflab.models.base import MODEL_REGISTRY
from difflab.models.distributions import (
    DiagonalGaussian,
    discretized_gaussian_log_likelihood,
    standard_normal_log_prob,
)
from difflab.models.vae import VAE, VAEConfig


def digits() -> torch.Tensor:
    """scikit-learn digits as (1797, 1, 8, 8) in [-1, 1] (17 intensity levels)."""
    return torch.tensor(load_digits().data, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- DiagonalGaussian ------------------------------------------------------------------------

def random_gaussian(seed: int, shape=(3, 4)) -> DiagonalGaussian:
    g = gen(seed)
    return DiagonalGaussian(torch.randn(shape, generator=g, dtype=torch.float64),
                            torch.randn(shape, generator=g, dtype=torch.float64) * 0.7)


@pytest.mark.parametrize("against", ["prior", "gaussian"])
def test_kl_closed_form_matches_monte_carlo(against):
    q = random_gaussian(0)
    p = None if against == "prior" else random_gaussian(1)
    n = 200_000
    z = q.sample(gen(2), num_samples=n)  # (n, 3, 4)
    log_p = standard_normal_log_prob(z, 1) if p is None else p.log_prob(z)
    ratio = q.log_prob(z) - log_p  # (n, 3): samples of log q/p
    mc, se = ratio.mean(0), ratio.std(0) / math.sqrt(n)
    kl = q.kl(p)
    assert kl.shape == (3,)
    assert torch.all((kl - mc).abs() < 4 * se), (kl, mc, se)
    # and the closed form agrees with torch.distributions to round-off
    ref_p = torch.distributions.Normal(torch.zeros(3, 4, dtype=torch.float64), 1.0) if p is None \
        else torch.distributions.Normal(p.mean, p.std)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q.mean, q.std), ref_p)
    torch.testing.assert_close(kl, ref.sum(1))


def test_log_prob_and_nll_match_torch_normal():
    q = random_gaussian(3, shape=(2, 3, 4, 4))
    z = q.sample(gen(4))
    ref = torch.distributions.Normal(q.mean, q.std).log_prob(z).sum((1, 2, 3))
    torch.testing.assert_close(q.log_prob(z), ref)
    torch.testing.assert_close(q.nll(z), -ref)
    assert q.kl().shape == (2,)
    assert torch.equal(q.mode(), q.mean)


def test_same_generator_same_sample():
    q = random_gaussian(0)
    assert torch.equal(q.sample(gen(7)), q.sample(gen(7)))
    assert not torch.equal(q.sample(gen(7)), q.sample(gen(8)))


def test_reparameterisation_gradient_reaches_mean_and_logvar():
    mean = torch.randn(5, 3, requires_grad=True)
    logvar = torch.randn(5, 3, requires_grad=True)
    q = DiagonalGaussian(mean, logvar)
    z = q.sample(gen(1))
    z.sum().backward()
    eps = torch.randn(5, 3, generator=gen(1))
    # z = μ + exp(½ log σ²) ε  ⇒  ∂z/∂μ = 1,  ∂z/∂log σ² = ½ σ ε
    torch.testing.assert_close(mean.grad, torch.ones(5, 3))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_gaussian_is_a_probability_mass(levels):
    grid = torch.linspace(0, 1, levels, dtype=torch.float64)[:, None]  # (L, 1)
    mean = torch.tensor([-0.7, 0.0, 0.33, 0.5, 1.0, 3.0], dtype=torch.float64)
    for std in (1e-3, 0.05, 0.5, 5.0):
        logp = discretized_gaussian_log_likelihood(grid, mean=mean, std=std, num_levels=levels)
        assert torch.isfinite(logp).all()
        total = torch.logsumexp(logp, dim=0)  # log Σ_levels P = 0
        torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-9, rtol=0)


def test_discretized_gaussian_python_floats_stay_float64():
    """σ = 0.1 given as a Python float is 0.1 in float64, not float32's 0.1000000015."""
    x = torch.tensor([1.0], dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, mean=0.3, std=0.1, num_levels=2)
    exact = math.log(0.5 * math.erfc(2.0 / math.sqrt(2.0)))  # last bin: 1 − Φ((0.5 − 0.3)/0.1)
    assert abs(float(got) - exact) < 1e-12


def test_discretized_gaussian_gradients_are_finite():
    mean = torch.tensor([-5.0, 0.0, 0.5, 7.0], requires_grad=True)
    x = torch.tensor([0.0, 1.0, 0.5, 1.0])
    discretized_gaussian_log_likelihood(x, mean=mean, std=0.1, num_levels=256).sum().backward()
    assert torch.isfinite(mean.grad).all()


# ---- VAE -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,hidden,channels,size", [
    ("mlp", (32,), 1, 8), ("conv", (8, 16), 1, 28), ("conv", (8, 16, 16), 3, 28),
    ("conv", (8, 16), 3, 32)])
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_vae_shapes(arch, hidden, channels, size, likelihood):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(arch=arch, hidden=hidden, in_channels=channels, image_size=size,
                        latent_dim=5, likelihood=likelihood))
    x = torch.rand(4, channels, size, size) * 2 - 1
    q = vae.encode(x)
    assert isinstance(q, DiagonalGaussian) and q.mean.shape == (4, 5)
    assert vae.decode(q.sample(gen())).shape == x.shape
    out = vae.training_loss({"images": x, "labels": torch.zeros(4, dtype=torch.long)}, gen())
    assert set(out) == {"loss", "recon", "kl"} and out["loss"].dim() == 0
    assert vae.sample(3, gen()).shape == (3, channels, size, size)
    path = vae.interpolate(x[0], x[1], steps=5)
    assert path.shape == (5, channels, size, size)
    torch.testing.assert_close(path[0], vae(x[:1])[0], atol=1e-5, rtol=1e-5)
    assert vae.interpolate(x[:2], x[2:], steps=3).shape == (3, 2, channels, size, size)
    for bad in ((x[0], x[1], 1), (x[0], x[1], 0), (x[:2], x[:3], 3), (x[0], x[:1], 3)):
        with pytest.raises(ValueError, match="steps|same shape"):
            vae.interpolate(*bad)
    with pytest.raises(ValueError, match="positive"):
        vae.sample(0)


def test_vae_randomness_is_seeded():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(16,), image_size=8, likelihood="bernoulli", latent_dim=3))
    batch = {"images": digits()[:16], "labels": torch.zeros(16, dtype=torch.long)}
    a, b = vae.training_loss(batch, gen(3)), vae.training_loss(batch, gen(3))
    assert torch.equal(a["loss"], b["loss"])
    assert torch.equal(vae.sample(4, gen(1)), vae.sample(4, gen(1)))


def test_bernoulli_binarisation():
    x = torch.full((2000, 1, 1, 1), 0.4)  # p = 0.7
    dyn = VAE(VAEConfig(image_size=1, hidden=(4,), likelihood="bernoulli"))
    t = dyn.likelihood_targets(x, gen(0))
    assert set(t.unique().tolist()) <= {0.0, 1.0} and abs(t.mean().item() - 0.7) < 0.04
    assert torch.equal(t, dyn.likelihood_targets(x, gen(0)))
    thr = VAE(VAEConfig(image_size=1, hidden=(4,), likelihood="bernoulli", binarize="threshold"))
    assert torch.equal(thr.likelihood_targets(x), torch.ones_like(x))


def train(vae: VAE, x: torch.Tensor, steps: int, lr: float = 3e-3, bs: int = 256,
          seed: int = 0) -> list[float]:
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    g = gen(seed)
    losses = []
    for i in range(steps):
        idx = torch.randint(len(x), (bs,), generator=g)
        out = vae.training_loss({"images": x[idx], "labels": torch.zeros(bs, dtype=torch.long)}, g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        del i
    return losses


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_vae_training_lowers_the_loss(likelihood):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(64,), image_size=8, latent_dim=4, likelihood=likelihood,
                        num_levels=17, C=20.0))
    losses = train(vae, digits(), 150)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


@pytest.fixture(scope="module")
def trained_vae() -> VAE:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(64,), image_size=8, latent_dim=4, likelihood="bernoulli",
                        binarize="threshold"))
    train(vae, digits()[:1500], 400)
    return vae.eval()


def test_iwae_bound_is_tighter_than_elbo_and_improves_with_k(trained_vae):
    x = digits()[1500:1700]
    t = trained_vae.likelihood_targets(x)
    with torch.no_grad():
        nelbo = -elbo(trained_vae, x, gen(0), targets=t)
    nll = {k: iwae_nll(trained_vae, x, k=k, batch_k=64, generator=gen(k), targets=t)
           for k in (1, 10, 100, 1000)}
    # k = 1 is an unbiased estimate of −ELBO (MC log-ratio instead of the analytic KL)
    diff = nll[1] - nelbo
    assert diff.mean().abs() < 4 * diff.std() / math.sqrt(len(diff))
    # NLL_iwae ≤ −ELBO, and non-increasing in k (within noise: 0.05 nats of ~25)
    means = [nll[k].mean().item() for k in (1, 10, 100, 1000)]
    assert means[-1] < nelbo.mean().item()
    assert all(b <= a + 0.05 for a, b in zip(means, means[1:])), means
    assert means[-1] < means[0] - 0.2, means  # measured: 20.22 → 19.85


def test_evaluate_likelihood_reports_nats_and_bits(trained_vae):
    x = digits()[1700:1760]
    r = evaluate_likelihood(trained_vae, x, k=50, generator=gen(0), progress=False,
                            batch_size=25, batch_k=20)
    assert r["likelihood_kind"] == "Bernoulli on pixels binarised by thresholding (x+1)/2 at 0.5"
    assert r["num_images"] == 60 and r["data_dim"] == 64 and r["k"] == 50
    assert 0 < r["iwae_nll_nats"] <= r["nelbo_nats"]
    assert r["iwae_nll_bits_per_dim"] == pytest.approx(r["iwae_nll_nats"] / (64 * math.log(2)))
    assert to_bits_per_dim(64 * math.log(2), 64) == pytest.approx(1.0)
    assert trained_vae.training is False


def test_gaussian_vae_nll_is_a_proper_code_length():
    """Discretised-Gaussian NLL of 17-level data is ≥ 0 nats (a mass, not a density)."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(64,), image_size=8, latent_dim=4, num_levels=17, C=20.0))
    train(vae, digits()[:1500], 100)
    r = evaluate_likelihood(vae, digits()[1500:1540], k=20, generator=gen(0), progress=False)
    assert "discretised Gaussian" in r["likelihood_kind"]
    assert 0 < r["iwae_nll_nats"] <= r["nelbo_nats"] + 0.5
    assert r["iwae_nll_bits_per_dim"] < math.log2(17)  # beats the uniform code on 17 levels


@pytest.mark.parametrize("arch,hidden", [("mlp", (16,)), ("conv", (4, 8))])
def test_vae_save_load_identical(tmp_path, arch, hidden):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(arch=arch, hidden=hidden, image_size=8, latent_dim=3, C=7.5,
                        beta=0.5, likelihood="bernoulli"))
    vae.save_pretrained(tmp_path / "vae")
    again = VAE.from_pretrained(tmp_path / "vae")
    assert again.config == vae.config
    x = digits()[:5]
    assert torch.equal(again(x), vae(x))
    assert torch.equal(again.sample(2, gen(1)), vae.sample(2, gen(1)))
    assert MODEL_REGISTRY["VAE"] is VAE


@pytest.mark.parametrize("field,value", [
    ("arch", "rnn"), ("likelihood", "poisson"), ("C", 0.0), ("beta", -1.0),
    ("binarize", "sometimes"), ("num_levels", 1), ("hidden", ()), ("latent_dim", 0),
    ("image_size", 2.5)])
def test_vae_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        VAEConfig(**{field: value})


def test_vae_config_json_round_trip():
    cfg = VAEConfig(arch="conv", hidden=(8, 16), likelihood="bernoulli", beta=4.0)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg


def test_posterior_variance_is_bounded_by_the_prior():
    """log σ² ≤ 0 whatever the input: an unusual image cannot blow the KL up (it once hit 2e8)."""
    from difflab.models.vae import VAE, VAEConfig

    torch.manual_seed(0)
    vae = VAE(VAEConfig(arch="mlp", in_channels=1, image_size=8, latent_dim=4, hidden=(32,)))
    with torch.no_grad():
        for p in vae.encoder.parameters():
            p.mul_(50.0)  # an encoder driven far out of its usual range
        q = vae.encode(torch.ones(3, 1, 8, 8))
    assert q.logvar.max() <= 0.0
    assert torch.isfinite(q.kl()).all()
