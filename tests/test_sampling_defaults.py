"""Sampling defaults of pixel-space models: x̂₀ clipped to the data range, grid from t = T."""

import torch

from difflab.models.unet import UNet2DModel, UNetConfig
from difflab.runs.diffusion import PIXEL_SAMPLING_DEFAULTS, DiffusionModelBundle, sample_images
from difflab.training.objectives import DiffusionConfig

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(False, False),
            norm_num_groups=4, attention_head_dim=8, sample_size=8)


def _bundle():
    torch.manual_seed(0)
    unet = UNet2DModel(UNetConfig(**TINY)).eval()  # untrained: x̂₀ far outside [-1, 1]
    return DiffusionModelBundle(unet, DiffusionConfig(), {"name": "digits", "class_names": [],
                                                          "image_shape": [1, 8, 8]})


def test_clipping_samplers_start_at_T_and_keep_x0_in_the_data_range():
    b = _bundle()
    for name in PIXEL_SAMPLING_DEFAULTS:
        s = b.scheduler(name)
        s.set_timesteps(10)
        assert int(s.timesteps[0]) == 999, name  # trailing: the grid starts at pure noise
        out = sample_images(b, 4, scheduler=name, steps=10, return_trajectory=True)
        x0 = torch.stack([st.pred_x0 for st in out.trajectory])
        assert x0.abs().max() <= 1.0 + 1e-6, name  # clipped (DPM++: thresholding at 1)
        raw = sample_images(b, 4, scheduler=name, steps=10, return_trajectory=True,
                            overrides={"clip_sample": False} if name != "dpm++" else
                            {"thresholding": False})
        assert max(st.pred_x0.abs().max() for st in raw.trajectory) > 1.5, name


def test_overrides_win_over_the_defaults():
    s = _bundle().scheduler("ddim", timestep_spacing="leading", clip_sample=False)
    assert s.cfg.timestep_spacing == "leading" and s.cfg.clip_sample is False


def test_pixel_dpm_solver_default_is_the_sde_form_and_seeded():
    """dpm++ on a pixel model samples the reverse SDE (fresh noise each step): the same seed
    gives the same images, another seed other images, and the ODE form stays one override
    away (it differs from the SDE with the same start)."""
    b = _bundle()
    cfg = b.scheduler("dpm++").cfg
    assert (cfg.algorithm_type, cfg.solver_type) == ("sde-dpmsolver++", "heun")
    one = sample_images(b, 2, scheduler="dpm++", steps=5, seed=0).images
    assert torch.equal(one, sample_images(b, 2, scheduler="dpm++", steps=5, seed=0).images)
    assert not torch.equal(one, sample_images(b, 2, scheduler="dpm++", steps=5, seed=1).images)
    ode = sample_images(b, 2, scheduler="dpm++", steps=5, seed=0,
                        overrides={"algorithm_type": "dpmsolver++"}).images
    assert not torch.equal(one, ode)


def test_readme_api_snippet_runs_on_a_saved_model(tmp_path, monkeypatch):
    """The README's "diffusers-style API" block, run as written on a saved (untrained) model:
    a DDPM config swapped into DPM-Solver++ keeps the model's noise schedule."""
    import re
    import types
    from pathlib import Path

    from difflab.runs.diffusion import save_bundle

    b = _bundle()
    data = types.SimpleNamespace(name="digits", class_names=[], image_shape=(1, 8, 8))
    save_bundle(tmp_path / "runs" / "fm", b.unet, b.diffusion, data)
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("## The diffusers-style API", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    code = code.replace("(16, 1, 28, 28)", "(2, 1, 8, 8)")  # the tiny model's images
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["images"].shape == (2, 1, 8, 8) and scope["images"].isfinite().all()
    sched = scope["sched"]
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    torch.testing.assert_close(sched.alphas_cumprod, b.scheduler("ddpm").alphas_cumprod)


def test_trajectory_row_two_is_drawn_as_the_network_output_it_is():
    """ε and v are unit-variance fields (drawn at a third of their value); an x̂₀-model's
    output is an image and is drawn as one."""
    from difflab.pipelines.image import TrajectoryStep
    from difflab.runs.diffusion import trajectory_figure

    z = torch.zeros(1, 1, 8, 8)
    traj = [TrajectoryStep(t, z, torch.full_like(z, 0.9), z, z) for t in (3, 2, 1)]
    side = 8 * 8 + 2 * 8  # one tile (scale 8) with its 1-px border, scaled
    for kind, value in (("epsilon", 0.3), ("v_prediction", 0.3), ("sample", 0.9)):
        fig = trajectory_figure(traj, prediction_type=kind)
        tile = fig[side + side // 2, side // 2]  # row 2 (the output), column 1, its centre
        assert abs(int(tile[0]) - round((value + 1) / 2 * 255)) <= 1, kind
