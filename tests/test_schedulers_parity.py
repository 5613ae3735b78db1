"""Parity with diffusers 0.42.1, the oracle, for all seven schedulers.

How the comparison is made (one body for every scheduler, no per-class branches):

- ``test_tables_match_diffusers``: our float64 β/ᾱ/σ tables against diffusers' float32 ones, to
  the precision float32 allows (its cumulative product drifts by ~1e-5 relative).
- ``test_sampling_loop_parity``: the algorithms. The oracle is given our float64 ᾱ table (so
  the float32 drift above does not mask or fake anything), both libraries see the same sample
  and the same fake model output at every step (teacher forcing), and we assert timesteps,
  sigmas, init_noise_sigma, every scale_model_input, every prev_sample and pred_original_sample
  to 1e-5 of the step's operand scale max(|x_t|, |result|); stochastic samplers get
  identically seeded generators.
- ``test_end_to_end_parity``: stock diffusers, free-running loops, Stable Diffusion's schedule:
  the final samples agree to 1e-4, the user-visible level.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import diffusers
import pytest
import torch

from difflab.schedulers import SCHEDULERS

logging.getLogger("diffusers").setLevel(logging.ERROR)

ORACLES: dict[str, type] = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "lms": diffusers.LMSDiscreteScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    "heun": diffusers.HeunDiscreteScheduler,
    "dpm++": diffusers.DPMSolverMultistepScheduler,
}
HAS_KARRAS = {"lms", "euler", "heun", "dpm++"}
STEP_VARIANTS: dict[str, list[dict[str, Any]]] = {"ddim": [{"eta": 0.0}, {"eta": 0.5}]}
BETA_RANGES = {"linear": {}, "squaredcos_cap_v2": {},
               "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012}}
SHAPE = (2, 1, 4, 4)
TOL = 1e-5


def oracle_supports(name: str, config: dict[str, Any]) -> bool:
    """Combinations diffusers 0.42.1 itself cannot run (so there is nothing to compare)."""
    if name == "euler_a" and config["prediction_type"] == "sample":
        return False  # NotImplementedError in diffusers
    if name == "dpm++" and config.get("use_karras_sigmas") and \
            config["beta_schedule"] == "squaredcos_cap_v2":
        return False  # IndexError in diffusers (see test_schedules' Karras+cosine test)
    return True


@dataclass
class Case:
    name: str
    config: dict[str, Any]
    steps: int
    step_kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in {**self.config, **self.step_kwargs}.items())
        return f"{self.name}-{self.steps}-{extra}"


def grid() -> list[Case]:
    cases = []
    for name in ORACLES:
        for schedule, prediction, spacing, steps in itertools.product(
                BETA_RANGES, ["epsilon", "v_prediction", "sample"],
                ["leading", "trailing", "linspace"], [10, 25]):
            offsets = [0, 1] if spacing == "leading" else [0]
            for offset, karras in itertools.product(offsets, [False, True]):
                if karras and name not in HAS_KARRAS:
                    continue
                config = {"beta_schedule": schedule, **BETA_RANGES[schedule],
                          "prediction_type": prediction, "timestep_spacing": spacing,
                          "steps_offset": offset}
                if karras:
                    config["use_karras_sigmas"] = True
                if not oracle_supports(name, config):
                    continue
                for kwargs in STEP_VARIANTS.get(name, [{}]):
                    cases.append(Case(name, config, steps, kwargs))
    return cases + FEATURE_CASES


_ZSNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
         "timestep_spacing": "trailing"}
FEATURE_CASES = [
    Case("ddpm", {"variance_type": "fixed_large"}, 10),
    Case("ddpm", {"clip_sample": False, "beta_schedule": "sigmoid"}, 25),
    Case("ddpm", {"thresholding": True, "sample_max_value": 1.5}, 10),
    Case("ddpm", _ZSNR, 10),
    Case("ddpm", {}, 1),
    Case("ddim", {"set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}, 50),
    Case("ddim", {"thresholding": True}, 10, {"eta": 1.0}),
    Case("ddim", {"clip_sample_range": 0.5}, 10, {"use_clipped_model_output": True}),
    Case("ddim", _ZSNR, 10),
    Case("ddim", {}, 1),
    Case("euler", {"final_sigmas_type": "sigma_min"}, 10),
    Case("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, 10),
    Case("euler", _ZSNR, 10),
    Case("euler", {}, 1),
    Case("euler_a", _ZSNR, 10),
    Case("heun", {"clip_sample": True, "prediction_type": "sample"}, 10),
    Case("heun", {}, 1),
    Case("lms", {}, 10, {"order": 2}),
    Case("lms", {}, 50),
    Case("dpm++", {"solver_order": 1}, 10),
    Case("dpm++", {"solver_type": "heun"}, 10),
    Case("dpm++", {"final_sigmas_type": "sigma_min"}, 10),
    Case("dpm++", {"euler_at_final": True, "lower_order_final": False}, 20),
    Case("dpm++", {"lower_order_final": False}, 20),
    Case("dpm++", {"thresholding": True, "sample_max_value": 2.0}, 10),
    Case("dpm++", _ZSNR, 10),
    Case("dpm++", {}, 1),
    Case("dpm++", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 20),
    Case("dpm++", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
                   "timestep_spacing": "leading"}, 25),
    Case("dpm++", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
                   "timestep_spacing": "trailing"}, 25),
    Case("dpm++", {"algorithm_type": "sde-dpmsolver++"}, 20),
    Case("dpm++", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, 10),
    Case("dpm++", {"algorithm_type": "sde-dpmsolver++", "solver_order": 1}, 10),
    Case("dpm++", {"algorithm_type": "sde-dpmsolver++", "thresholding": True,
                   "sample_max_value": 1.0, "timestep_spacing": "trailing",
                   "beta_schedule": "squaredcos_cap_v2"}, 20),
    Case("dpm++", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, 10),
    # the last σ (σ_min) exceeds the rebuilt Karras σ_min by one ulp: e^{−2h} > 1
    Case("dpm++", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True,
                   "final_sigmas_type": "sigma_min"}, 3),
]
GRID = grid()


def fake_model(x: torch.Tensor, t: Any, T: int = 1000) -> torch.Tensor:
    """A deterministic, smooth, nonlinear stand-in for a network: f(x, t)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.5 * x + 0.3 * torch.sin(3.0 * x + 2.0 * t / T)


def assert_close(ours: Any, ref: Any, what: str, scale: float = 0.0) -> None:
    """max|ours − ref| ≤ TOL · max(|ref|, scale, 1e-12)."""
    ours = torch.as_tensor(ours, dtype=torch.float64)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = float((ours - ref).abs().max()) if ours.numel() else 0.0
    bound = TOL * max(float(ref.abs().max()) if ref.numel() else 0.0, scale, 1e-12)
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e}"


def make_pair(case: Case, inject_tables: bool) -> tuple[Any, Any]:
    ours = SCHEDULERS[case.name](**case.config)
    ref = ORACLES[case.name](**case.config)
    if inject_tables:  # the oracle's algorithm on our float64 schedule table
        ref.betas, ref.alphas = ours.betas.clone(), ours.alphas.clone()
        ref.alphas_cumprod = ours.alphas_cumprod.clone()
    ours.set_timesteps(case.steps)
    ref.set_timesteps(case.steps)
    return ours, ref


def step_kwargs(scheduler: Any, case: Case, seed: int) -> dict[str, Any]:
    kwargs = dict(case.step_kwargs)
    if "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return kwargs


@pytest.mark.parametrize("case", GRID, ids=str)
def test_sampling_loop_parity(case: Case) -> None:
    ours, ref = make_pair(case, inject_tables=True)
    assert_close(ours.timesteps, ref.timesteps, "timesteps")
    if hasattr(ref, "sigmas"):
        assert_close(ours.sigmas, ref.sigmas, "sigmas")
    assert_close(ours.init_noise_sigma, ref.init_noise_sigma, "init_noise_sigma")

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * ref.init_noise_sigma
    kw_ours, kw_ref = step_kwargs(ours, case, seed=1), step_kwargs(ref, case, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (t, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps, strict=True)):
            model_in_ref = ref.scale_model_input(x, t_ref)
            assert_close(ours.scale_model_input(x, t), model_in_ref, f"step {i} model input")
            eps = fake_model(model_in_ref, t_ref)
            out = ours.step(eps, t, x, **kw_ours)
            out_ref = ref.step(eps, t_ref, x, **kw_ref)
            scale = float(x.abs().max())
            assert_close(out.prev_sample, out_ref.prev_sample, f"step {i} prev_sample", scale)
            if getattr(out_ref, "pred_original_sample", None) is not None:
                assert_close(out.pred_original_sample, out_ref.pred_original_sample,
                             f"step {i} pred_original_sample", scale)
            x = out_ref.prev_sample


@pytest.mark.parametrize("name", ORACLES)
@pytest.mark.parametrize("schedule", list(BETA_RANGES))
def test_tables_match_diffusers(name: str, schedule: str) -> None:
    """Our float64 tables equal diffusers' float32 ones to float32's precision."""
    config = {"beta_schedule": schedule, **BETA_RANGES[schedule]}
    ours, ref = SCHEDULERS[name](**config), ORACLES[name](**config)
    assert_close(ours.betas, ref.betas, "betas")
    ratio = ours.alphas_cumprod / ref.alphas_cumprod.double()
    assert float((ratio - 1).abs().max()) < 2e-5, "alphas_cumprod"
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    assert_close(ours.timesteps, ref.timesteps, "timesteps")
    if hasattr(ref, "sigmas"):  # elementwise, to 2e-5 of max(σ, 1)
        diff = (ours.sigmas - ref.sigmas.double()).abs()
        assert bool((diff <= 2e-5 * ref.sigmas.double().clamp(min=1.0)).all()), "sigmas"


@pytest.mark.parametrize("name", ORACLES)
def test_end_to_end_parity(name: str) -> None:
    """Stock diffusers, own trajectories, SD's schedule: the final samples agree."""
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "steps_offset": 1, "timestep_spacing": "leading"}
    case = Case(name, config, 25)
    ours, ref = make_pair(case, inject_tables=False)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    finals = []
    for sched in (ours, ref):
        x = noise * sched.init_noise_sigma
        kwargs = step_kwargs(sched, case, seed=1)
        for t in sched.timesteps:
            x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x,
                           **kwargs).prev_sample
        finals.append(x)
    err = float((finals[0] - finals[1]).abs().max() / finals[1].abs().max())
    assert err < 1e-4, f"final sample relative error {err:.2e}"


@pytest.mark.parametrize("name", ORACLES)
def test_add_noise_parity(name: str) -> None:
    """Forward process at timesteps of the schedule (the only ones σ-space samplers accept)."""
    case = Case(name, {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                       "beta_end": 0.012}, 10)
    ours, ref = make_pair(case, inject_tables=True)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    pick = torch.tensor([0, len(ref.timesteps) - 1])
    assert_close(ours.add_noise(x0, noise, ours.timesteps[pick]),
                 ref.add_noise(x0, noise, ref.timesteps[pick]), "add_noise")


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_add_noise_parity_training_timesteps(name: str) -> None:
    """The training-time forward process at arbitrary t, before any set_timesteps."""
    ours, ref = SCHEDULERS[name](), ORACLES[name]()
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), "add_noise")
    assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), "velocity")


@pytest.mark.parametrize("name", ORACLES)
def test_config_keys_and_files_interchange(name: str, tmp_path: Any) -> None:
    """Same config keys as diffusers (plus difflab's declared extensions, which diffusers'
    loader ignores); each library loads the other's scheduler_config.json."""
    ours, ref = SCHEDULERS[name](prediction_type="v_prediction"), ORACLES[name]()
    ref_keys = {k for k in ref.config if not k.startswith("_")}
    extensions = type(ours).extensions
    assert not extensions & ref_keys  # an extension diffusers has would need parity instead
    shared = {k for k in ours.config if not k.startswith("_")} - extensions
    assert shared <= ref_keys
    assert ref_keys - shared == set(type(ours).unsupported)

    ours.save_config(tmp_path / "ours")
    loaded_ref = ORACLES[name].from_pretrained(tmp_path / "ours")
    assert {k: loaded_ref.config[k] for k in shared} == {k: ours.config[k] for k in shared}

    ref.save_config(tmp_path / "ref")
    loaded = type(ours).from_pretrained(tmp_path / "ref")
    assert {k: loaded.config[k] for k in shared} == {k: ref.config[k] for k in shared}
    assert all(loaded.config[k] == getattr(type(ours).config_class(), k) for k in extensions)


def test_lambda_min_clipped_starts_the_grid_where_lambda_allows():
    """The clip moves the noisiest timestep down to where log(α/σ) ≥ the threshold."""
    from difflab.schedulers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1,
                                    timestep_spacing="linspace")
    s.set_timesteps(20)
    ab = s.alphas_cumprod
    lam = 0.5 * (ab.log() - (1 - ab).log())
    t0 = int(s.timesteps[0])
    assert lam[t0] >= -5.1 - 1e-6 and t0 < 999
    assert lam[min(t0 + 2, 999)] < -5.1  # and not further down than needed


SWAP_SOURCES: list[dict[str, Any]] = [
    {},  # every key at the source's defaults: the target keeps its own
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
     "prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 1,
     "variance_type": "fixed_large"},  # DDPM's: DPM-Solver++ takes the config all the same
    {"clip_sample": True, "beta_schedule": "squaredcos_cap_v2"},  # DDPM's / DDIM's own key
]


@pytest.mark.parametrize("source", list(ORACLES))
def test_from_config_swaps_like_diffusers(source: str) -> None:
    """``Target.from_config(source.config)`` gives the target the config diffusers gives it:
    keys left at the source's defaults (``_use_default_values``) take the target's defaults
    (Euler's ``linspace`` grid, not DDIM's ``leading``), the keys set carry over, and DDPM's
    ``clip_sample`` never turns on difflab's x̂₀ clipping in a σ-space sampler."""
    for kwargs in SWAP_SOURCES:
        keys = set(inspect.signature(ORACLES[source]).parameters) & \
            set(SCHEDULERS[source]().config)  # DPM-Solver++ takes DDPM's variance_type unread
        kwargs = {k: v for k, v in kwargs.items() if k in keys}
        ours_src, ref_src = SCHEDULERS[source](**kwargs), ORACLES[source](**kwargs)
        for target, oracle in ORACLES.items():
            ours, ref = SCHEDULERS[target].from_config(ours_src.config), \
                oracle.from_config(ref_src.config)
            public = {k: v for k, v in ours.config.items() if not k.startswith("_")}
            for k in set(public) - type(ours).extensions:
                assert public[k] == ref.config[k], (source, kwargs, target, k)
            for k in type(ours).extensions:  # diffusers' class lacks them: difflab's default
                assert public[k] == getattr(type(ours).config_class(), k), (source, target, k)
