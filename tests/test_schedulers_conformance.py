"""Samplers checked against the math: exact Gaussian denoisers, closed forms, round trips.

Every test body is shared by all schedulers; where a property only holds for some of them, the
selection is made from the public interface (config keys, observed determinism), not by name.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from difflab.schedulers import SCHEDULERS, DDIMScheduler, DDPMScheduler, get_scheduler
from difflab.schedulers.conformance import (
    convergence_table,
    format_table,
    gaussian_model,
    run_sampler,
    standard_noise,
)

NAMES = list(SCHEDULERS)
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
MU = torch.tensor([0.5, -0.3, 0.0, 0.25], dtype=torch.float64)
S = torch.tensor([0.5, 0.2, 1.0, 0.8], dtype=torch.float64)
KARRAS_NAMES = [n for n in NAMES if "use_karras_sigmas" in SCHEDULERS[n]().config]
ZSNR_NAMES = [n for n in NAMES if "rescale_betas_zero_snr" in SCHEDULERS[n]().config]


def is_deterministic(name: str) -> bool:
    """Observed, not declared: two differently seeded one-step runs give the same result."""
    outs = []
    for seed in (0, 1):
        sched = SCHEDULERS[name]()
        sched.set_timesteps(5)
        t = sched.timesteps[0]
        x = torch.ones(1, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs.append(sched.step(0.1 * x, t, x,
                                   generator=torch.Generator().manual_seed(seed)).prev_sample)
    return torch.equal(*outs)


DETERMINISTIC = {n: is_deterministic(n) for n in NAMES}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one intra-op thread is faster, and much faster on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def table() -> list[dict]:
    return convergence_table(steps=(10, 100), mu=MU.tolist(), s=S.tolist(), num_samples=16384)


@pytest.mark.parametrize("name", NAMES)
def test_converges_to_the_gaussian_data(name: str, table: list[dict]) -> None:
    """Mean/std of the samples approach μ, s; for ODE samplers monotonically in NFE."""
    rows = {r["steps"]: r for r in table if r["scheduler"] == name}
    assert rows[100]["error"] < (0.03 if DETERMINISTIC[name] else 0.06), format_table(table)
    assert rows[100]["error"] <= rows[10]["error"] + 1e-3, format_table(table)


def test_higher_order_solvers_beat_euler(table: list[dict]) -> None:
    err = {r["scheduler"]: r["std_err"] for r in table if r["steps"] == 100}
    for name in ("lms", "heun", "dpm++"):
        assert err[name] < err["euler"] / 4, format_table(table)


def test_convergence_table_rows() -> None:
    rows = convergence_table(["euler", "heun"], steps=(4,), num_samples=64)
    assert [(r["scheduler"], r["nfe"]) for r in rows] == [("euler", 4), ("heun", 7)]
    assert "heun" in format_table(rows)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_exact_noise_round_trip(name: str, prediction_type: str) -> None:
    """Fed the true target for a known x₀, every scheduler's x̂₀ is x₀; deterministic ones
    then land exactly on the forward process at the next timestep."""
    sched = get_scheduler(name, prediction_type=prediction_type)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 1.6 - 0.8
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t, t_next = sched.timesteps[0], sched.timesteps[sched.order]
    x_t = sched.add_noise(x0, eps, t.repeat(3))
    target = {"epsilon": eps, "sample": x0,
              "v_prediction": sched.get_velocity(x0, eps, t.repeat(3))}[prediction_type]
    sched.scale_model_input(x_t, t)
    out = sched.step(target, t, x_t, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=1e-9, atol=1e-9)
    if DETERMINISTIC[name]:
        torch.testing.assert_close(out.prev_sample, sched.add_noise(x0, eps, t_next.repeat(3)),
                                   rtol=1e-9, atol=1e-9)


def test_ddim_eta_one_is_ddpm() -> None:
    """σ_t(η=1)² is DDPM's posterior variance β̃_t (DDIM eq. 16), and the whole step is DDPM's."""
    ddim, ddpm = DDIMScheduler(clip_sample=False), DDPMScheduler(clip_sample=False)
    ddim.set_timesteps(20)
    ddpm.set_timesteps(20)
    ab = ddim.alphas_cumprod
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in ddim.timesteps[:-1]:
        t_prev = int(t) - 1000 // 20
        beta_tilde = (1 - ab[t_prev]) / (1 - ab[t]) * (1 - ab[t] / ab[t_prev])
        eps = 0.3 * x
        z = torch.randn_like(x)
        noisy = ddim.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        clean = ddim.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(z)).prev_sample
        std = ((noisy - clean) / z).mean()
        assert float(std**2) == pytest.approx(float(beta_tilde), rel=1e-9)
        same = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
        also = ddim.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(also.prev_sample, same, rtol=1e-9, atol=1e-9)
        x = same


@pytest.mark.parametrize("name", ZSNR_NAMES)
def test_zero_terminal_snr_v_prediction_sampling(name: str) -> None:
    """With ᾱ_T = 0 (Lin et al. 2023) v-prediction sampling from pure noise still converges,
    and without the terminal-SNR bias of the standard schedule."""
    config = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing", "clip_sample": False}
    sched = SCHEDULERS[name].from_config(config)
    assert float(sched.alphas_cumprod[-1]) < 1e-7
    x = run_sampler(sched, gaussian_model(MU, S, sched), standard_noise((16384, 4)), 100,
                    generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert float((x.mean(0) - MU).abs().max()) < 0.03
    assert float((x.std(0) - S).abs().max()) < 0.05


@pytest.mark.parametrize("name", KARRAS_NAMES)
def test_karras_sigmas_with_cosine_schedule(name: str) -> None:
    """Karras σ on the cosine schedule (diffusers 0.42 raises IndexError for DPM++)."""
    sched = SCHEDULERS[name](beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True,
                             prediction_type="v_prediction")
    for n in (5, 10, 25):
        sched.set_timesteps(n)
        sig, ts = sched.sigmas, sched.timesteps.double()
        assert torch.isfinite(sig).all() and sig[-1] == 0
        distinct = torch.unique_consecutive(sig)
        assert bool((distinct[1:] < distinct[:-1]).all()), "sigmas not decreasing"
        assert bool((ts[1:] <= ts[:-1]).all()) and 0 <= float(ts.min()) <= float(ts.max()) <= 999
        assert len(torch.unique(ts)) == n, "repeated timesteps"
    x = run_sampler(sched, gaussian_model(MU, S, sched), standard_noise((4096, 4)), 100)
    assert torch.isfinite(x).all()
    assert float((x.mean(0) - MU).abs().max()) < 0.01
    assert float((x.std(0) - S).abs().max()) < 0.1  # Euler spends most steps at σ > 100 here


# ------------------------------------------------------------------------ interface contracts

@pytest.mark.parametrize("name", NAMES)
def test_step_interface(name: str) -> None:
    """Tuple output, order, dtype preservation, seeding, per-sample generators."""
    sched = SCHEDULERS[name]()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(torch.zeros(1, 1), sched.timesteps[0], torch.zeros(1, 1))
    sched.set_timesteps(6)
    assert len(sched.timesteps) == sched.order * 6 - (sched.order - 1)

    def loop(dtype: torch.dtype, generator: object) -> list:
        sched.set_timesteps(6)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
        x = x * sched.init_noise_sigma
        outs = []
        for t in sched.timesteps:
            out = sched.step(0.2 * sched.scale_model_input(x, t), t, x, generator=generator,
                             return_dict=False)
            assert isinstance(out, tuple) and out[0].dtype == dtype
            x = out[0]
            outs.append(out)
        return outs

    first = loop(torch.float32, torch.Generator().manual_seed(5))
    again = loop(torch.float32, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    # diffusers' tuples: (prev_sample, pred_original_sample), DPM-Solver++ (prev_sample,)
    assert all(len(a) == (1 if name == "dpm++" else 2) for a in first)
    assert all(a[-1] is not None for a in first)
    assert torch.isfinite(loop(torch.float16, None)[-1][0]).all()
    per_sample = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    assert torch.isfinite(loop(torch.float32, per_sample)[-1][0]).all()


@pytest.mark.parametrize("name", NAMES)
def test_begin_index_resumes_mid_schedule(name: str) -> None:
    """img2img: starting at step k with set_begin_index equals finding it from the timestep."""
    results = []
    for use_begin in (False, True):
        sched = SCHEDULERS[name]()
        sched.set_timesteps(10)
        k = 4 * sched.order
        if use_begin:
            sched.set_begin_index(k)
        x = torch.full((1, 4), 0.7) * math.sqrt(1 + 0.5)
        x = sched.add_noise(x, torch.ones_like(x), sched.timesteps[k:k + 1])
        for t in sched.timesteps[k:]:
            x = sched.step(0.2 * sched.scale_model_input(x, t), t, x,
                           generator=torch.Generator().manual_seed(0)).prev_sample
        results.append(x)
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("steps", [10, 100, 1000])
def test_euler_is_ddim_for_epsilon_prediction(steps: int) -> None:
    """Euler in σ-space on x/α *is* DDIM (η = 0): x'/α' = x/α + (σ' − σ)·ε̂ for any ε̂. So the
    two give the same samples for any network, not only an exact one — checked here with an
    arbitrary nonlinear ε̂ on the cosine schedule, up to 1000 steps (benchmarks/RESULTS.md
    reports one FID row for both at 1000 steps on the strength of this)."""
    common = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading")
    ddim = get_scheduler("ddim", **common, clip_sample=False)
    euler = get_scheduler("euler", **common)

    def eps_hat(x: torch.Tensor, t) -> torch.Tensor:  # not an exact denoiser: any ε̂ will do
        return torch.tanh(1.5 * x) + 0.3 * torch.sin(x * float(t) / 250.0)

    x_T = standard_noise((64, 4), seed=3)
    a = run_sampler(ddim, eps_hat, x_T, steps)
    b = run_sampler(euler, eps_hat, x_T, steps)
    assert torch.equal(ddim.timesteps, euler.timesteps.to(ddim.timesteps.dtype))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dpm_solver_survives_a_grid_with_repeated_timesteps() -> None:
    """λ-clipped linspace grids at 1000 steps repeat five timesteps (diffusers' own grid too;
    diffusers then returns NaN): difflab takes those steps at first order and still samples
    the right distribution."""
    sched = get_scheduler("dpm++", beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1,
                          timestep_spacing="linspace")
    sched.set_timesteps(1000)
    assert len(torch.unique(sched.timesteps)) < len(sched.timesteps)  # the case is exercised
    x = run_sampler(sched, gaussian_model(MU, S, sched), standard_noise((4096, 4), seed=5), 1000)
    assert torch.isfinite(x).all()
    mean_err, std_err = (x.mean(0) - MU).abs().max(), (x.std(0) - S).abs().max()
    assert mean_err < 0.02 and std_err < 0.03


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 100])
def test_clipped_euler_is_ddim_with_the_clipped_model_output(spacing: str, steps: int) -> None:
    """With x̂₀ clipped, Euler's derivative (x̃ − clip(x̂₀))/σ is the ε re-derived from the
    clipped x̂₀, so clipped Euler is DDIM with ``clip_sample`` and ``use_clipped_model_output``
    — for any ε̂, on the leading grid and on the trailing one that starts where ᾱ ≈ 0."""
    common = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing, clip_sample=True,
                  clip_sample_range=1.0)
    ddim, euler = get_scheduler("ddim", **common), get_scheduler("euler", **common)

    def eps_hat(x: torch.Tensor, t) -> torch.Tensor:  # pushes x̂₀ outside [−1, 1] often
        return torch.tanh(1.5 * x) + 0.3 * torch.sin(x * float(t) / 250.0)

    x_T = standard_noise((64, 4), seed=4)
    a = run_sampler(ddim, eps_hat, x_T, steps, use_clipped_model_output=True)
    b = run_sampler(euler, eps_hat, x_T, steps)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    unclipped = run_sampler(get_scheduler("euler", **{**common, "clip_sample": False}), eps_hat,
                            x_T, steps)
    assert (unclipped - b).abs().max() > 0.1  # the clip did something here


@pytest.mark.parametrize("name", ["euler", "euler_a", "lms", "heun"])
def test_sigma_samplers_clip_x0_when_asked(name: str) -> None:
    """Every σ-space sampler keeps x̂₀ in ±clip_sample_range when ``clip_sample`` is on (and
    only then), and its samples then stay in the range too for a model that overshoots."""
    def overshooting(x: torch.Tensor, t) -> torch.Tensor:  # ε̂ = −3x: x̂₀ far outside [−1, 1]
        return -3.0 * x

    for clip in (False, True):
        sched = get_scheduler(name, beta_schedule="squaredcos_cap_v2", clip_sample=clip,
                              clip_sample_range=0.5)
        sched.set_timesteps(8)
        x = standard_noise((256, 2), seed=1) * sched.init_noise_sigma
        x0_max = 0.0
        for t in sched.timesteps:
            out = sched.step(overshooting(sched.scale_model_input(x, t), t), t, x,
                             generator=torch.Generator().manual_seed(0))
            x, x0_max = out.prev_sample, max(x0_max, float(out.pred_original_sample.abs().max()))
        if clip:
            assert x0_max <= 0.5 + 1e-12
            assert float(x.abs().max()) <= 0.5 + 1e-6 or name == "euler_a"
        else:
            assert x0_max > 0.5


def test_first_order_sde_dpm_solver_is_ddpm() -> None:
    """SDE-DPM-Solver++(1) with x̂₀ = the model's is exactly ancestral DDPM: the mean
    (σ_t/σ_s)e^{−h} x + α_t(1 − e^{−2h}) x̂₀ and variance σ_t²(1 − e^{−2h}) are the posterior
    q(x_t | x_s, x̂₀) of DDPM eq. 7 written in λ = log(α/σ). (On the trailing grid, where
    both schedulers visit the same timesteps.)"""
    sde = get_scheduler("dpm++", algorithm_type="sde-dpmsolver++", solver_order=1,
                        timestep_spacing="trailing")
    ddpm = DDPMScheduler(clip_sample=False, timestep_spacing="trailing")
    sde.set_timesteps(20)
    ddpm.set_timesteps(20)
    torch.testing.assert_close(sde.timesteps, ddpm.timesteps)
    # float32: both draw z in float32 from the generator, so equal seeds give equal noise
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ddpm.timesteps):
        eps = 0.3 * x + 0.1 * torch.sin(x)
        want = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        got = sde.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        x = want


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_dpm_solver_converges_to_the_gaussian_data(solver_type: str) -> None:
    """Driven by the exact denoiser, SDE-DPM-Solver++(2M) samples have the data's moments
    (Monte-Carlo error of 16,384 samples ≈ 0.01), and more steps do not make them worse."""
    rows = convergence_table(["dpm++"], steps=(10, 100), mu=MU.tolist(), s=S.tolist(),
                             num_samples=16384, config={"algorithm_type": "sde-dpmsolver++",
                                                        "solver_type": solver_type})
    errs = {r["steps"]: r["error"] for r in rows}
    assert errs[100] < 0.03, format_table(rows)
    assert errs[100] <= errs[10] + 1e-3, format_table(rows)


def test_sde_dpm_solver_noise_is_seeded_and_checked() -> None:
    """Same generator seed ⇒ same step; another seed ⇒ another step; the ODE solver refuses
    variance_noise (it would silently ignore it)."""
    def one(seed: int, **kw) -> torch.Tensor:
        s = get_scheduler("dpm++", **kw)
        s.set_timesteps(10)
        x = torch.ones(1, 4)
        return s.step(0.1 * x, s.timesteps[0], x,
                      generator=torch.Generator().manual_seed(seed)).prev_sample
    sde = {"algorithm_type": "sde-dpmsolver++"}
    assert torch.equal(one(0, **sde), one(0, **sde))
    assert not torch.equal(one(0, **sde), one(1, **sde))
    assert torch.equal(one(0), one(1))
    ode = get_scheduler("dpm++")
    ode.set_timesteps(10)
    with pytest.raises(ValueError, match="variance_noise"):
        ode.step(torch.zeros(1, 4), ode.timesteps[0], torch.ones(1, 4),
                 variance_noise=torch.zeros(1, 4))
