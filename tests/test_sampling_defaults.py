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
