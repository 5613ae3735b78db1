"""Noise schedules: closed forms, monotonicity, SNR, config round trips, errors and plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from difflab.errors import ConfigError
from difflab.schedulers import (
    SCHEDULERS,
    DDIMScheduler,
    EulerDiscreteScheduler,
    Scheduler,
    get_scheduler,
)
from difflab.schedulers import schedules as S
from difflab.viz.schedules import plot_forward_process, plot_schedules

T = 1000
PRESETS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012),
           "squaredcos_cap_v2": (1e-4, 0.02), "sigmoid": (1e-4, 0.02)}
NAMES = list(SCHEDULERS)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- closed forms

def test_linear_and_scaled_linear_closed_forms() -> None:
    betas = S.make_betas("linear", T, 1e-4, 0.02)
    assert betas.dtype == torch.float64
    expected = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
    np.testing.assert_allclose(S.alphas_cumprod(betas).numpy(), expected, rtol=1e-12)
    scaled = S.make_betas("scaled_linear", T, 0.00085, 0.012)
    np.testing.assert_allclose(scaled.numpy(),
                               np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2, rtol=1e-12)
    np.testing.assert_allclose(float(S.alphas_cumprod(betas)[-1]), 4.0358e-5, rtol=1e-3)


def test_cosine_schedule_closed_form() -> None:
    """ᾱ_t = f(t+1)/f(0), f(u) = cos²((u/T + s)/(1 + s)·π/2) (Nichol & Dhariwal eq. 17)."""
    ab = S.alphas_cumprod(S.make_betas("squaredcos_cap_v2", T))
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * math.pi / 2) ** 2
    uncapped = slice(0, T - 1)  # only the very last β hits the 0.999 cap
    np.testing.assert_allclose(ab.numpy()[uncapped], (f[1:] / f[0])[uncapped], rtol=1e-10)
    assert float(S.make_betas("squaredcos_cap_v2", T).max()) == pytest.approx(0.999)


def test_sigmoid_closed_form() -> None:
    betas = S.make_betas("sigmoid", T, 1e-4, 0.02)
    ramp = np.linspace(-6, 6, T)
    np.testing.assert_allclose(betas.numpy(), 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-ramp)),
                               rtol=1e-12)


@pytest.mark.parametrize("name", list(PRESETS))
def test_schedules_are_monotone(name: str) -> None:
    betas = S.make_betas(name, T, *PRESETS[name])
    ab = S.alphas_cumprod(betas)
    assert bool((betas[1:] >= betas[:-1]).all()) and bool((betas > 0).all())
    assert bool((ab[1:] < ab[:-1]).all()) and 0 < float(ab[-1]) < float(ab[0]) < 1
    lam = S.log_snr(ab)
    assert bool((lam[1:] < lam[:-1]).all())
    sig = S.sigmas_from_alphas_cumprod(ab)
    assert bool((sig[1:] > sig[:-1]).all())


def test_snr_and_log_snr() -> None:
    ab = S.alphas_cumprod(S.make_betas("linear", T, 1e-4, 0.02))
    torch.testing.assert_close(S.snr(ab), ab / (1 - ab))
    torch.testing.assert_close(S.log_snr(ab), torch.log(S.snr(ab)))
    torch.testing.assert_close(S.sigmas_from_alphas_cumprod(ab), S.snr(ab).rsqrt())
    # log-SNR stays accurate where 1 − ᾱ cancels: ᾱ = 1 − 1e-12
    near_one = torch.tensor([1 - 1e-12], dtype=torch.float64)
    assert float(S.log_snr(near_one)) == pytest.approx(math.log(1e12), rel=1e-3)


def test_rescale_zero_terminal_snr() -> None:
    """Lin et al. 2023, Alg. 1: ᾱ_T = 0, ᾱ_0 kept, √ᾱ an affine map of the original."""
    betas = S.make_betas("scaled_linear", T, 0.00085, 0.012)
    rescaled = S.rescale_zero_terminal_snr(betas)
    ab, ab0 = S.alphas_cumprod(rescaled), S.alphas_cumprod(betas)
    assert float(ab[-1]) == 0.0
    assert float(ab[0]) == pytest.approx(float(ab0[0]), rel=1e-12)
    slope = (ab.sqrt()[1:-1] - ab.sqrt()[0]) / (ab0.sqrt()[1:-1] - ab0.sqrt()[0])
    torch.testing.assert_close(slope, torch.full_like(slope, float(slope[0])))
    assert bool((ab[1:] < ab[:-1]).all())


def test_add_noise_forward_process() -> None:
    ab = S.alphas_cumprod(S.make_betas("linear", T))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = S.add_noise(x0, eps, t, ab)
    for i in range(3):
        a = float(ab[t[i]])
        torch.testing.assert_close(x_t[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i])
    assert S.add_noise(x0.half(), eps.half(), t, ab).dtype == torch.float16


def test_timestep_spacings() -> None:
    """Lin et al. 2023, Table 2, with T = 1000 and 10 steps."""
    lead = S.spaced_timesteps("leading", T, 10, steps_offset=1)
    assert lead.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    trail = S.spaced_timesteps("trailing", T, 10)
    assert trail.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    lin = S.spaced_timesteps("linspace", T, 10)
    assert lin[0] == 999 and lin[-1] == 0 and np.allclose(np.diff(lin), -111)


def test_karras_sigmas_and_sigma_to_t() -> None:
    sig = S.karras_sigmas(0.03, 14.6, 8)
    assert sig[0] == pytest.approx(14.6) and sig[-1] == pytest.approx(0.03)
    assert bool((np.diff(sig) < 0).all())
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(S.make_betas("linear", T))).numpy()
    np.testing.assert_allclose(S.sigma_to_t(table[[0, 17, 500, 999]], table),
                               [0, 17, 500, 999], atol=1e-9)
    # between table entries t is linear in log σ
    mid = math.exp(0.5 * (math.log(table[10]) + math.log(table[11])))
    assert float(S.sigma_to_t(np.array([mid]), table)[0]) == pytest.approx(10.5)


# ---------------------------------------------------------------------- errors and config

@pytest.mark.parametrize("field, value", [("beta_schedule", "cosine"),
                                          ("prediction_type", "eps"),
                                          ("timestep_spacing", "uniform")])
@pytest.mark.parametrize("name", NAMES)
def test_bad_names_are_config_errors(name: str, field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=field) as err:
        SCHEDULERS[name](**{field: value})
    assert "choose one of" in str(err.value)


def test_other_config_errors() -> None:
    with pytest.raises(ConfigError, match="linear"):
        S.make_betas("quadratic", T)
    with pytest.raises(ConfigError, match="'ddim'"):
        get_scheduler("plms")
    with pytest.raises(ConfigError, match="unknown field"):
        DDIMScheduler(beta_strat=0.001)
    with pytest.raises(ConfigError, match="use_beta_sigmas"):
        EulerDiscreteScheduler(use_beta_sigmas=True)
    with pytest.raises(ConfigError, match="trained_betas"):
        DDIMScheduler(trained_betas=[0.1, 0.2])
    with pytest.raises(ConfigError, match="solver_order"):
        get_scheduler("dpm++", solver_order=3)
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        DDIMScheduler(num_train_timesteps=1000.0)
    with pytest.raises(ConfigError, match="use_karas_sigmas"):
        EulerDiscreteScheduler.from_config({}, use_karas_sigmas=True)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name: str, tmp_path) -> None:
    sched = get_scheduler(name, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type="v_prediction", steps_offset=1)
    cfg = sched.config
    assert isinstance(cfg, dict) and json.loads(json.dumps(cfg)) == cfg
    assert cfg.num_train_timesteps == 1000 and cfg.beta_schedule == "scaled_linear"  # diffusers'
    with pytest.raises(AttributeError, match="no key"):
        getattr(cfg, "no_such_key")  # noqa: B009
    rebuilt = type(sched).from_config(cfg)
    assert rebuilt.config == cfg
    torch.testing.assert_close(rebuilt.alphas_cumprod, sched.alphas_cumprod)

    path = sched.save_config(tmp_path)
    saved = json.loads(path.read_text())
    assert path.name == "scheduler_config.json" and saved["_class_name"] == type(sched).__name__
    assert "_use_default_values" not in saved  # a file's keys are all given (as diffusers')
    public = {k: v for k, v in cfg.items() if k != "_use_default_values"}
    for loaded in (type(sched).from_pretrained(tmp_path), Scheduler.from_pretrained(tmp_path)):
        assert type(loaded) is type(sched) and loaded.config["_use_default_values"] == []
        assert {k: v for k, v in loaded.config.items() if k != "_use_default_values"} == public


def test_from_config_swaps_schedulers_and_takes_arrays(tmp_path) -> None:
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    euler = EulerDiscreteScheduler.from_config(ddim.config, use_karras_sigmas=True)
    assert euler.config["beta_schedule"] == "scaled_linear" and euler.config["use_karras_sigmas"]
    euler = EulerDiscreteScheduler.from_config(euler.config, use_karras_sigmas=False)
    assert not euler.config["use_karras_sigmas"]
    betas = np.asarray(ddim.betas)
    custom = DDIMScheduler(trained_betas=betas)
    assert isinstance(custom.config["trained_betas"], list)
    torch.testing.assert_close(custom.alphas_cumprod, ddim.alphas_cumprod)
    (tmp_path / "scheduler_config.json").write_text('{"_class_name": "PNDMScheduler"}')
    with pytest.raises(ConfigError, match="_class_name"):
        Scheduler.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------- plots

def test_plot_schedules_writes_png(tmp_path) -> None:
    path = plot_schedules(tmp_path / "schedules.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_forward_process_writes_png(tmp_path) -> None:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    image = torch.stack([xx, yy, xx * yy])  # (3, 16, 16) in [-1, 1]
    path = plot_forward_process(image, tmp_path / "forward.png", ts=(0, 250, 500, 999))
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    path = plot_forward_process(image[:1], tmp_path / "gray.png", schedules=["linear"], ts=[10])
    assert path.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="C, H, W"):
        plot_forward_process(image[None], tmp_path / "bad.png")


def test_linear_destroys_information_earlier_than_cosine() -> None:
    """What the forward-process grid shows: at mid-chain the linear schedule keeps far less
    signal (√ᾱ) than the cosine one."""
    ab = {n: S.alphas_cumprod(S.make_betas(n, T, *PRESETS[n])) for n in PRESETS}
    assert float(ab["linear"][500].sqrt()) < 0.3 < 0.65 < float(ab["squaredcos_cap_v2"][500].sqrt())
