"""The playground (`difflab serve`): checkpoint discovery, every tab's callback on tiny models
saved with the real save functions, input validation, and the "no checkpoint" error. The
browser drives the same app in tests/test_browser.py."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from _app_models import make_tiny_models
from difflab.app import callbacks as cb
from difflab.app import load_playground
from difflab.cli import main
from difflab.errors import CheckpointError, ConfigError, DifflabError
from difflab.runs.autoencoders import decode_images, encode_codes
from difflab.schedulers import SCHEDULERS
from difflab.schedulers.schedules import alphas_cumprod, make_betas
from difflab.viz import make_grid


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("app"), ldm=True)


@pytest.fixture(scope="module")
def pg(root):
    return load_playground([root / "vae", root / "ae", root / "ddpm", root / "ldm"])


# ------------------------------------------------------------------------------ loading
def test_finds_every_model_and_the_test_images(pg):
    assert set(pg.autoencoders) == {"vae", "ae"} and set(pg.diffusion) == {"ddpm", "ldm"}
    assert pg.autoencoders["vae"].is_vae and not pg.autoencoders["ae"].is_vae
    assert pg.autoencoders["vae"].span == 2.0
    z = encode_codes(pg.autoencoders["ae"].model, pg.test_images).abs()
    assert pg.autoencoders["ae"].span == pytest.approx(float(torch.quantile(z.flatten(), 0.99)),
                                                       rel=0.05)
    assert list(pg.autoencoders) == ["vae", "ae"]  # VAEs first
    assert pg.diffusion["ddpm"].class_names == [str(i) for i in range(10)]
    assert pg.diffusion["ldm"].kind == "ldm" and pg.diffusion["ldm"].captioner is not None
    assert pg.data_name == "digits" and pg.test_images.shape == (64, 1, 8, 8)


def test_a_demo_style_parent_folder_is_searched_one_level_down(pg, tmp_path):
    root = make_tiny_models(tmp_path)
    p = load_playground([root])
    assert set(p.autoencoders) == {f"{root.name}/vae", f"{root.name}/ae"}
    assert set(p.diffusion) == {f"{root.name}/ddpm"}


def test_a_folder_trained_model_shows_its_folders_test_images(root, tmp_path):
    """data.json of a model trained on an image folder records the folder's path: the app
    finds its images there (the folder's bare name is no data set)."""
    import json
    import shutil

    import numpy as np
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    shutil.copytree(root / "vae", tmp_path / "vae")
    info = tmp_path / "vae" / "model" / "data.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "name": "imgs",
                                "path": str(tmp_path / "imgs")}))
    p = load_playground([tmp_path / "vae"])
    assert p.data_name == str(tmp_path / "imgs") and p.test_images.shape == (5, 1, 8, 8)


def test_no_checkpoint_says_which_command_makes_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "runs/demo" in err and "`difflab demo`" in err
    with pytest.raises(CheckpointError, match="difflab demo"):
        load_playground(None, demo_dir=tmp_path / "runs" / "demo")


@pytest.mark.parametrize("argv", [["serve", "--ckpt", "{tmp}/missing"],
                                  ["serve", "--ckpt", "{tmp}"]])
def test_bad_folders_exit_2_one_line(argv, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err and str(tmp_path) in err


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_bad_port_is_an_argparse_error(port, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", port])
    assert e.value.code == 2 and "port number" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- VAE
def test_sliders_decode_that_point_and_ignore_dims_the_model_lacks(pg):
    e = pg.autoencoders["vae"]
    pic = cb.decode_latent(e, [0.5, -1.0, 0.25, 1.5, 1.5])  # 5 sliders, 3-d model
    x = decode_images(e.model, torch.tensor([[0.5, -1.0, 0.25]]), e.image_shape)
    assert np.array_equal(pic, make_grid(x, 1, padding=0, scale=cb.TILE // 8))
    assert pic.shape == (112, 112, 1) and pic.std() > 1
    with pytest.raises(ConfigError, match="z2"):
        cb.decode_latent(e, [0.0, 100.0])
    with pytest.raises(ConfigError, match="z1"):
        cb.decode_latent(e, [math.nan])


def test_clicking_a_tile_centre_decodes_the_code_drawn_there(pg):
    e, n = pg.autoencoders["vae"], cb.PLANE_N
    values = [0.0, 0.0, 0.7]
    plane = cb.plane_image(e, values)
    side = plane.shape[0]
    tile = side // n
    codes = cb.plane_latents(e, values)
    for i, j in [(0, 0), (3, 11), (n - 1, n - 1), (7, 7)]:  # column i, row j
        z1, z2 = cb.click_to_latent((i + 0.5) * tile, (j + 0.5) * tile, side, side, e.span)
        assert (z1, z2) == pytest.approx(codes[j * n + i, :2].tolist(), abs=1e-6)
        assert codes[j * n + i, 2] == pytest.approx(0.7)
        x = decode_images(e.model, codes[j * n + i:j * n + i + 1], e.image_shape)
        drawn = plane[j * tile:(j + 1) * tile, i * tile:(i + 1) * tile]
        assert np.array_equal(drawn, make_grid(x, 1, padding=0, scale=tile // 8))
    assert cb.click_to_latent(0, 0, side, side, e.span) == (-e.span, e.span)  # clipped corner
    with pytest.raises(ConfigError, match="outside"):
        cb.click_to_latent(side + 5, 0, side, side, e.span)


def test_interpolation_strip_starts_and_ends_at_the_chosen_images(pg):
    e, imgs = pg.autoencoders["vae"], pg.test_images
    strip = cb.interpolate(e, imgs, 3, 5, 6)
    scale = 64 // 8
    assert strip.shape == ((8 + 4) * scale, (8 * 8 + 2 * 9) * scale, 1)
    ends = make_grid(imgs[[3, 5]], 2, scale=scale)
    tile = (8 + 2) * scale
    assert np.array_equal(strip[:, :tile], ends[:, :tile])  # A first
    assert np.array_equal(strip[:, -tile:], ends[:, -tile:])  # B last
    for bad, match in [((3, 64, 6), "image B"), ((-1, 5, 6), "image A"), ((3, 5, 1), "steps"),
                       ((3, 5, 33), "steps"), ((1.5, 5, 6), "whole number")]:
        with pytest.raises(ConfigError, match=match):
            cb.interpolate(e, imgs, *bad)
    with pytest.raises(ConfigError, match="--data"):
        cb.interpolate(e, imgs[:, :, :4, :4], 0, 1, 4)  # images of another size
    assert np.array_equal(cb.test_image(imgs, 63), make_grid(imgs[63:], 1, padding=0,
                                                              scale=cb.TILE // 8))
    with pytest.raises(ConfigError, match="image index"):
        cb.test_image(imgs, 64)
    with pytest.raises(ConfigError, match="--data"):
        cb.test_image(None, 0)


# ---------------------------------------------------------------------------- Diffusion
def test_sampling_is_seeded_class_conditional_and_shows_the_trajectory(pg):
    e = pg.diffusion["ddpm"]
    kw = dict(scheduler="ddim", steps=4, n=3, guidance=3.0)
    a = cb.sample(e, seed=1, class_name="7", **kw)
    assert np.array_equal(a.grid, cb.sample(e, seed=1, class_name="7", **kw).grid)
    assert not np.array_equal(a.grid, cb.sample(e, seed=2, class_name="7", **kw).grid)
    assert not np.array_equal(a.grid, cb.sample(e, seed=1, class_name="2", **kw).grid)
    u = cb.sample(e, seed=1, class_name=cb.UNCONDITIONAL, **kw)
    assert not np.array_equal(a.grid, u.grid)
    assert a.grid.std() > 5 and a.trajectory.shape[0] == 4 * (8 + 2) * 8 + 2 * 8
    assert len(a.frames) == 4 and a.frames[0].shape == ((8 + 2) * 2 * 8 + 16, (3 * 10 + 2) * 8, 1)


def test_animation_is_a_gif_with_one_frame_per_step(pg, tmp_path):
    res = cb.sample(pg.diffusion["ddpm"], scheduler="euler", steps=5, n=2)
    path = cb.save_animation(res.frames, tmp_path / "a.gif")
    with Image.open(path) as im:
        assert im.format == "GIF" and im.n_frames == 5


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_samples(pg, name):
    res = cb.sample(pg.diffusion["ddpm"], scheduler=name, steps=3, n=2, seed=0)
    assert res.grid.std() > 5 and len(res.frames) >= 1


@pytest.mark.parametrize("kw, match", [
    (dict(scheduler="pndm"), "scheduler"), (dict(steps=0), "steps"), (dict(steps=251), "steps"),
    (dict(n=65), "number of images"), (dict(guidance=-1.0), "guidance"),
    (dict(guidance=math.inf), "guidance"), (dict(seed=-3), "seed"), (dict(seed=2**31), "seed"),
    (dict(class_name="eleven"), "unknown class")])
def test_sampling_inputs_are_validated(pg, kw, match):
    with pytest.raises(ConfigError, match=match):
        cb.sample(pg.diffusion["ddpm"], **{"steps": 2, "n": 1, **kw})


def test_latent_diffusion_needs_a_known_prompt_and_is_seeded(pg):
    e = pg.diffusion["ldm"]
    a = cb.sample(e, scheduler="dpm++", steps=2, n=2, seed=0, prompt="a seven", guidance=3.0)
    b = cb.sample(e, scheduler="dpm++", steps=2, n=2, seed=0, prompt="a seven", guidance=3.0)
    assert np.array_equal(a.grid, b.grid) and np.array_equal(a.trajectory, b.trajectory)
    # the trajectory figure as for pixel models: 4 rows (x_t, noise, x̂₀, x_{t−1}) × 2 steps
    side = e.model.unet.config.sample_size * e.model.vae_scale_factor
    scale = max(1, 64 // side)
    assert a.trajectory.shape[:2] == (4 * (side + 2) * scale + 2 * scale,
                                      2 * (side + 2) * scale + 2 * scale)
    assert len(a.frames) == 2 and a.trajectory.std() > 5
    c = cb.sample(e, scheduler="euler", steps=2, n=2, seed=0, prompt="a seven", guidance=3.0)
    assert not np.array_equal(a.grid, c.grid)  # the sampler really changed
    again = cb.sample(e, scheduler="dpm++", steps=2, n=2, seed=0, prompt="a seven",
                      guidance=3.0)  # after euler: still the saved (SDE) DPM-Solver++
    assert np.array_equal(a.grid, again.grid)
    assert e.model.scheduler.config["algorithm_type"] == "sde-dpmsolver++"
    with pytest.raises(ConfigError, match="prompt"):
        cb.sample(e, steps=2, n=1, prompt="  ")
    with pytest.raises(ConfigError, match="characters"):
        cb.sample(e, steps=2, n=1, prompt="a seven " * 40)
    with pytest.raises(DifflabError, match="never appeared"):
        cb.sample(e, steps=2, n=1, prompt="a purple giraffe")


# ---------------------------------------------------------------------------- Schedules
def test_schedule_plot_and_the_noised_image(pg):
    assert cb.schedule_plot(["linear", "sigmoid"]).shape[2] == 3
    x0 = pg.test_images[0]
    grid, caption = cb.noised(x0, ["linear", "squaredcos_cap_v2"], 0)
    tile = 8 * cb.TILE // 8 + 2 * (cb.TILE // 8)
    assert np.abs(grid[:, tile:2 * tile].astype(int) - grid[:, :tile].astype(int)).max() <= 6
    ab = alphas_cumprod(make_betas("linear", 1000, beta_start=1e-4, beta_end=0.02))
    _, caption = cb.noised(x0, ["linear"], 700)
    assert f"ᾱ_t = {float(ab[700]):.4f}" in caption
    late, _ = cb.noised(x0, ["linear"], 999, seed=1)
    assert not np.array_equal(late, cb.noised(x0, ["linear"], 999, seed=2)[0])
    for args, match in [(([], 10), "at least one"), ((["cosine"], 10), "unknown schedule"),
                        ((["linear"], 1000), "t=1000"), ((["linear"], -1), "t=-1")]:
        with pytest.raises(ConfigError, match=match):
            cb.noised(x0, *args)
    with pytest.raises(ConfigError, match="at least one"):
        cb.schedule_plot([])


# ------------------------------------------------------------------------------ the app
def test_app_builds_with_a_queue_of_one(pg):
    pytest.importorskip("gradio")
    from difflab.app.ui import build_app

    demo = build_app(pg)
    assert demo._queue.default_concurrency_limit == 1
    assert not demo.analytics_enabled


def test_app_builds_without_test_images(root):
    """Only a latent diffusion model (or data that cannot be loaded here): no test images, the
    schedules tab noises its one built-in image (it crashed building a 0…0 slider)."""
    pytest.importorskip("gradio")
    from difflab.app.ui import build_app

    pg = load_playground([root / "ldm"])
    assert pg.test_images is None
    build_app(pg)


def test_guidance_needs_label_dropout(pg, monkeypatch):
    """Like `difflab sample`: guidance on a class-conditional model trained without label
    dropout is refused (its null class was never trained), guidance 1 samples."""
    e = pg.diffusion["ddpm"]
    if not e.conditional:
        pytest.skip("the tiny DDPM is unconditional")
    monkeypatch.setattr(e.model.diffusion, "p_uncond", 0.0)
    with pytest.raises(ConfigError, match="label dropout"):
        cb.sample(e, steps=2, n=1, class_name=e.class_names[0], guidance=3.0)
    cb.sample(e, steps=2, n=1, class_name=e.class_names[0], guidance=1.0)


def test_a_taken_port_is_one_line_exit_2(root, capsys):
    pytest.importorskip("gradio")
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--ckpt", str(root / "vae"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("difflab: error: cannot serve on 127.0.0.1:") and "Traceback" \
        not in "".join(err)
