"""The playground's computations, as plain functions: numbers in, uint8 pictures out.

The web UI (:mod:`difflab.app.ui`) only wires widgets to these functions, so they are tested
without a browser. Bad input raises a :class:`~difflab.errors.DifflabError` (mostly
``ConfigError``) with a one-line message; the UI shows it as a ``gr.Error``. Sampling goes
through the library's pipelines (:func:`difflab.runs.diffusion.sample_images`,
:class:`~difflab.pipelines.TextToImage`); the schedule pictures through
:mod:`difflab.viz.schedules`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from difflab.app.checkpoints import AutoencoderEntry, DiffusionEntry
from difflab.errors import ConfigError
from difflab.viz import make_grid

# Limits of the inputs (a CPU has to answer each request in seconds to minutes).
MAX_SLIDERS = 8  # latent sliders shown: the first k dimensions
PLANE_N = 15  # the latent plane is decoded on a PLANE_N × PLANE_N grid
MAX_INTERP_STEPS = 32
MAX_STEPS = 250  # sampling steps (enough for DDPM on a strided chain; seconds per step on CPU)
MAX_IMAGES = 64
MAX_GUIDANCE = 20.0
MAX_SEED = 2**31 - 1
MAX_PROMPT_CHARS = 300
UNCONDITIONAL = "(unconditional)"
TILE = 112  # displayed size (pixels) of one decoded image


def _check_int(name: str, value: float | int | None, lo: int, hi: int) -> int:
    if value is None or not math.isfinite(float(value)) or float(value) != int(value):
        raise ConfigError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
    if not lo <= int(value) <= hi:
        raise ConfigError(f"{name}={int(value)} is out of range [{lo}, {hi}]")
    return int(value)


def _check_float(name: str, value: float | None, lo: float, hi: float) -> float:
    if value is None or not math.isfinite(float(value)) or not lo <= float(value) <= hi:
        raise ConfigError(f"{name}={value!r} is out of range [{lo:g}, {hi:g}]")
    return float(value)


def _scale(side: int, target: int = TILE) -> int:
    return max(1, target // side)


# ------------------------------------------------------------------------------ VAE tab
def latent_vector(entry: AutoencoderEntry, values: Sequence[float]) -> Tensor:
    """z (1, k): the slider values in the first dimensions, 0 (the prior mean) elsewhere."""
    k = entry.latent_dim
    if len(values) > k:
        values = values[:k]  # the UI has sliders for the widest model; extra ones are ignored
    limit = 10 * entry.span
    z = torch.zeros(1, k)
    for i, v in enumerate(values):
        z[0, i] = _check_float(f"z{i + 1}", v, -limit, limit)
    return z


def decode_latent(entry: AutoencoderEntry, values: Sequence[float]) -> np.ndarray:
    """The decoded image (H', W', C) uint8 of the latent point given by the sliders."""
    from difflab.runs.autoencoders import decode_images

    x = decode_images(entry.model, latent_vector(entry, values), entry.image_shape)
    return make_grid(x, 1, padding=0, scale=_scale(entry.image_shape[-1]))


def plane_latents(entry: AutoencoderEntry, values: Sequence[float], n: int = PLANE_N) -> Tensor:
    """(n·n, k) codes on the plane of z₁ (left → right) and z₂ (top → bottom, decreasing) over
    [−span, span]; the other dimensions keep the slider values. Same layout as
    :func:`difflab.runs.autoencoders.latent_plane`."""
    if entry.latent_dim < 2:
        raise ConfigError(f"the latent plane needs at least 2 latent dimensions; this model "
                          f"has {entry.latent_dim}")
    axis = torch.linspace(-entry.span, entry.span, n)
    zz = torch.stack(torch.meshgrid(axis, axis.flip(0), indexing="xy"), -1).reshape(-1, 2)
    z = latent_vector(entry, values).repeat(n * n, 1)
    z[:, :2] = zz
    return z


def plane_side(entry: AutoencoderEntry, n: int = PLANE_N) -> int:
    """Width (= height) in pixels of :func:`plane_image`: n tiles enlarged to ≥ 48 px each."""
    side = entry.image_shape[-1]
    return n * side * _scale(side, 48)


def plane_image(entry: AutoencoderEntry, values: Sequence[float], n: int = PLANE_N) -> np.ndarray:
    """The decoded latent plane as one picture (n tiles a side, no padding) to click on."""
    from difflab.runs.autoencoders import decode_images

    x = decode_images(entry.model, plane_latents(entry, values, n), entry.image_shape)
    return make_grid(x, n, padding=0, scale=plane_side(entry, n) // (n * entry.image_shape[-1]))


def click_to_latent(x: float, y: float, width: int, height: int, span: float,
                    n: int = PLANE_N) -> tuple[float, float]:
    """(z₁, z₂) under pixel (x, y) of the plane picture: tile centres are the decoded points,
    so the centre of tile (i, j) maps back exactly onto the code decoded there."""
    if not (0 <= x <= width and 0 <= y <= height):
        raise ConfigError(f"click ({x}, {y}) is outside the {width}×{height} plane")
    step = 2 * span / (n - 1)
    z1 = -span + (x / width * n - 0.5) * step
    z2 = span - (y / height * n - 0.5) * step
    return (float(np.clip(z1, -span, span)), float(np.clip(z2, -span, span)))


def pick(images: Tensor | None, index: float | int) -> Tensor:
    """Test image ``index`` (C, H, W), checked."""
    if images is None:
        raise ConfigError("no test images: start the app with --data NAME")
    return images[_check_int("image index", index, 0, len(images) - 1)]


def test_image(images: Tensor | None, index: float | int) -> np.ndarray:
    """One test image, enlarged for display."""
    x = pick(images, index)
    return make_grid(x[None], 1, padding=0, scale=_scale(x.shape[-1]))


def interpolate(entry: AutoencoderEntry, images: Tensor | None, i: float | int,
                j: float | int, steps: float | int) -> np.ndarray:
    """Decodes of the straight line between the codes of test images i and j: a strip with
    the two originals at its ends."""
    from difflab.runs.autoencoders import interpolate_codes

    if images is None:
        raise ConfigError("no test images: start the app with --data NAME")
    if tuple(images.shape[1:]) != entry.image_shape:
        raise ConfigError(f"the test images are {tuple(images.shape[1:])}, the model's "
                          f"{entry.image_shape}; start the app with --data naming its data set")
    a = _check_int("image A", i, 0, len(images) - 1)
    b = _check_int("image B", j, 0, len(images) - 1)
    steps = _check_int("steps", steps, 2, MAX_INTERP_STEPS)
    line = interpolate_codes(entry.model, images[a], images[b], steps)
    strip = torch.cat([images[a:a + 1], line, images[b:b + 1]])
    return make_grid(strip, len(strip), scale=_scale(entry.image_shape[-1], 64))


# ------------------------------------------------------------------------ Diffusion tab
@dataclass
class DiffusionResult:
    grid: np.ndarray  # (H, W, C) uint8: the samples
    trajectory: np.ndarray | None  # x_t / predicted output / x̂₀ / x_{t−1} figure (pixel models)
    frames: list[np.ndarray]  # animation frames: x_t above x̂₀ at each step (pixel models)


def _scheduler_name(name: str) -> str:
    from difflab.schedulers import SCHEDULERS

    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler={name!r} is not allowed; choose one of {list(SCHEDULERS)}")
    return name


def sample(entry: DiffusionEntry, *, scheduler: str = "dpm++", steps: float | int = 25,
           seed: float | int = 0, guidance: float = 3.0, n: float | int = 8,
           class_name: str | None = None, prompt: str | None = None,
           progress: bool = False) -> DiffusionResult:
    """Sample ``n`` images from a pixel or latent diffusion model (deterministic in ``seed``).

    Pixel models also return the trajectory figure and animation frames; ``class_name`` picks
    the class of a class-conditional model (guidance applies to it), ``prompt`` is the text of
    a latent diffusion model. ``progress`` shows a tqdm bar (the UI turns it into its own).
    """
    scheduler = _scheduler_name(scheduler)
    steps = _check_int("steps", steps, 1, MAX_STEPS)
    seed = _check_int("seed", seed, 0, MAX_SEED)
    n = _check_int("number of images", n, 1, MAX_IMAGES)
    guidance = _check_float("guidance", guidance, 0.0, MAX_GUIDANCE)
    if entry.kind == "ldm":
        return _sample_ldm(entry, scheduler, steps, seed, guidance, n, prompt, progress)

    from difflab.runs.diffusion import check_guidance, sample_images, trajectory_figure

    labels = None
    if class_name not in (None, "", UNCONDITIONAL):
        if not entry.conditional:
            raise ConfigError("this model is unconditional; it has no classes")
        if class_name not in entry.class_names:
            raise ConfigError(f"unknown class {class_name!r}; classes: {entry.class_names}")
        labels = torch.full((n,), entry.class_names.index(class_name), dtype=torch.long)
        check_guidance(guidance, entry.model, True, "this model")  # as `difflab sample`
    res = sample_images(entry.model, n, scheduler=scheduler, steps=steps, seed=seed,
                        class_labels=labels, guidance_scale=guidance if labels is not None
                        else 1.0, return_trajectory=True, progress=progress)
    side = res.images.shape[-1]
    grid = make_grid(res.images * 2 - 1, min(n, 8), scale=_scale(side, 84))
    kind = entry.model.diffusion.prediction_type
    return DiffusionResult(grid, trajectory_figure(res.trajectory, prediction_type=kind),
                           trajectory_frames(res.trajectory))


def trajectory_frames(traj: list, n_show: int = 8, max_frames: int = 50) -> list[np.ndarray]:
    """One frame per step (at most ``max_frames``): the first ``n_show`` samples' x_t in the
    top row, the predicted x̂₀ below — the prediction is sharp long before x_t is."""
    idx = torch.linspace(0, len(traj) - 1, min(max_frames, len(traj))).round().long().tolist()
    frames = []
    for i in idx:
        x_t, x0 = traj[i].x_t[:n_show], traj[i].pred_x0[:n_show]
        tiles = torch.cat([x_t, x0]).clamp(-1, 1)
        frames.append(make_grid(tiles, len(x_t), scale=_scale(tiles.shape[-1], 64)))
    return frames


def save_animation(frames: list[np.ndarray], path: str | Path, ms_per_frame: int = 120) -> Path:
    """An animated GIF of the frames (the last one held for a second)."""
    if not frames:
        raise ConfigError("no frames to animate")
    path = Path(path)
    ims = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    durations = [ms_per_frame] * (len(ims) - 1) + [1000]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=durations, loop=0)
    return path


def _ldm_scheduler(entry: DiffusionEntry, name: str):
    """The pipeline's saved scheduler config under the sampler ``name``: what ``difflab sample
    --scheduler NAME`` builds (``from_config`` of the loaded config, whatever ran before)."""
    from difflab.schedulers import SCHEDULERS

    return SCHEDULERS[name].from_config(entry.scheduler_config)


def _sample_ldm(entry: DiffusionEntry, scheduler: str, steps: int, seed: int, guidance: float,
                n: int, prompt: str | None, progress: bool) -> DiffusionResult:
    from difflab.runs.ldm import check_prompt

    if not prompt or not prompt.strip():
        raise ConfigError("this is a text-to-image model: type a prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ConfigError(f"the prompt has {len(prompt)} characters; at most "
                          f"{MAX_PROMPT_CHARS}")
    pipe = entry.model
    check_prompt(prompt, entry.captioner, pipe)  # words the model never saw, too many tokens
    pipe.scheduler = _ldm_scheduler(entry, scheduler)  # safe: one sampling request at a time
    g = torch.Generator().manual_seed(seed)
    h = pipe.unet.config.sample_size
    traj: list | None = [] if h * h <= MAX_LDM_TRAJECTORY_LATENT**2 else None
    images = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=max(guidance, 1.0),
                  generator=g, progress=progress, trajectory=traj)
    grid = make_grid(images * 2 - 1, min(n, 8), scale=_scale(images.shape[-1], 84))
    if not traj:  # a large model (SD): decoding every step would take minutes on a CPU
        return DiffusionResult(grid, None, [])
    from difflab.runs.diffusion import trajectory_figure

    shown = decoded_trajectory(pipe, traj)
    return DiffusionResult(grid, trajectory_figure(shown), trajectory_frames(shown))


MAX_LDM_TRAJECTORY_LATENT = 32  # latent side up to which the app decodes the trajectory


def decoded_trajectory(pipe, traj: list, n_show: int = 8, max_steps: int = 50) -> list:
    """A latent trajectory in pixels, for the same figure and animation as pixel models: at
    most ``max_steps`` evenly spaced steps, the first ``n_show`` samples; x_t, x̂₀ and x_{t−1}
    go through the VAE decoder, the predicted latent noise is shown as its first channels
    (enlarged to the image size), since decoding noise means nothing."""
    from difflab.pipelines.image import TrajectoryStep

    idx = torch.linspace(0, len(traj) - 1, min(max_steps, len(traj))).round().long().tolist()
    out = []
    for i in idx:
        s = traj[i]
        lat = torch.cat([s.x_t[:n_show], s.pred_x0[:n_show], s.prev_sample[:n_show]])
        x_t, x0, prev = (pipe.decode(lat.to(pipe.device, pipe.dtype)) * 2 - 1).chunk(3)
        noise = s.model_output[:n_show]
        c = x_t.shape[1]
        noise = noise[:, :c] if noise.shape[1] >= c else noise[:, :1].expand(-1, c, -1, -1)
        noise = torch.nn.functional.interpolate(noise, size=x_t.shape[-2:], mode="nearest")
        out.append(TrajectoryStep(s.t, x_t, noise, x0, prev))
    return out


# ------------------------------------------------------------------------ Schedules tab
def schedule_names() -> list[str]:
    from difflab.viz.schedules import SCHEDULE_PRESETS

    return list(SCHEDULE_PRESETS)


def _check_schedules(names: Sequence[str]) -> list[str]:
    allowed = schedule_names()
    if not names:
        raise ConfigError(f"pick at least one schedule of {allowed}")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ConfigError(f"unknown schedule {bad[0]!r}; choose from {allowed}")
    return list(names)


def schedule_plot(names: Sequence[str], num_train_timesteps: int = 1000) -> np.ndarray:
    """β_t, ᾱ_t and log-SNR of the chosen schedules (the figure of ``difflab plot schedules``)."""
    from difflab.viz.schedules import plot_schedules

    names = _check_schedules(names)
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_schedules(Path(tmp) / "schedules.png", names, num_train_timesteps)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))


def noised(image: Tensor, names: Sequence[str], t: float | int, seed: float | int = 0,
           num_train_timesteps: int = 1000) -> tuple[np.ndarray, str]:
    """x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε for each schedule (same ε), after x₀; and a line per
    schedule giving ᾱ_t and the SNR ᾱ_t/(1−ᾱ_t).

    ``image: (C, H, W)`` in [−1, 1].
    """
    from difflab.schedulers.schedules import add_noise, alphas_cumprod, make_betas
    from difflab.viz.schedules import LABELS, SCHEDULE_PRESETS

    names = _check_schedules(names)
    t = _check_int("t", t, 0, num_train_timesteps - 1)
    seed = _check_int("seed", seed, 0, MAX_SEED)
    x0 = image.detach().cpu().to(torch.float64)[None]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)
    tiles, lines = [x0], []
    for name in names:
        ab = alphas_cumprod(make_betas(name, num_train_timesteps, **SCHEDULE_PRESETS[name]))
        tiles.append(add_noise(x0, eps, torch.tensor([t]), ab))
        a = float(ab[t])
        snr = a / (1 - a) if a < 1 else math.inf
        lines.append(f"{LABELS.get(name, name)}: ᾱ_t = {a:.4f}, SNR = {snr:.3g}")
    grid = make_grid(torch.cat(tiles).float().clamp(-1, 1), len(tiles),
                     scale=_scale(image.shape[-1]))
    caption = f"t = {t}: x₀, then " + "; ".join(lines)
    return grid, caption


def fallback_image(side: int = 28) -> Tensor:
    """A (1, side, side) ring in [−1, 1], noised in the schedules tab when no data set loads."""
    r = torch.linspace(-1, 1, side)
    d = (r[None, :] ** 2 + r[:, None] ** 2).sqrt()
    return torch.where((d > 0.35) & (d < 0.7), 1.0, -1.0)[None]
