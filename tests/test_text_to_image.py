"""The TextToImage pipeline reproduces diffusers' StableDiffusionPipeline image for image.

A tiny random Stable Diffusion (U-Net, AutoencoderKL, CLIP text encoder, CLIP tokenizer) is
built with diffusers/transformers, saved with ``save_pretrained(safe_serialization=True)`` and
loaded with ``difflab.interop.load_pipeline``; both pipelines then sample from the same seed
with each of the seven schedulers. ``tiny_sd`` is shared with tests/test_interop.py.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from difflab.interop import load_pipeline
from difflab.pipelines.text_to_image import TextToImage
from test_tokenizer import write_clip_vocab

PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the fog"]
SIZE = 16  # pixels: tiny U-Net latents 8×8 with a 2-level VAE (f = 2)
TOL = 1e-4

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            norm_num_groups=8, attention_head_dim=4)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
           layers_per_block=1, norm_num_groups=8, sample_size=SIZE,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                 set_alpha_to_one=False)
# difflab registry name → diffusers class name
SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "lms": "LMSDiscreteScheduler",
              "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "heun": "HeunDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler"}


def _perturb(model: torch.nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


@lru_cache(maxsize=1)
def tiny_sd() -> tuple[object, Path, Path, dict]:
    """(diffusers pipeline, saved diffusers folder, tokenizer vocab folder, configs) — built
    once per test process; ``configs`` are the single-file loader's config dicts."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(tempfile.mkdtemp(prefix="difflab-tiny-sd-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    vocab_dir = write_clip_vocab(root / "vocab")
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=77)
    vocab = tokenizer.get_vocab()
    text_cfg = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                    bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                    pad_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET)
    vae = diffusers.AutoencoderKL(**VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    for model, scale in ((unet, 0.05), (vae, 0.02), (text_encoder, 0.02)):
        _perturb(model, scale)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(**SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "diffusers", safe_serialization=True)
    configs = {"unet": dict(UNET), "vae": dict(VAE, scaling_factor=0.18215),
               "text_encoder": text_cfg, "scheduler": dict(SCHEDULER)}
    return pipe, root / "diffusers", vocab_dir, configs


def diffusers_images(pipe, scheduler: str, seed: int = 0, **kw) -> torch.Tensor:
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(SCHEDULER)
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("guidance_scale", 7.5)
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS, height=SIZE, width=SIZE, generator=g, output_type="pt", **kw).images


def difflab_images(ours: TextToImage, scheduler: str, seed: int = 0, **kw) -> torch.Tensor:
    from difflab.schedulers import SCHEDULERS as REGISTRY

    ours.scheduler = REGISTRY[scheduler].from_config(SCHEDULER)
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("guidance_scale", 7.5)
    return ours(PROMPTS, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed),
                **kw)


@pytest.fixture(scope="module")
def pipes():
    pipe, folder, _, _ = tiny_sd()
    return pipe, load_pipeline(folder)


def test_loaded_components(pipes):
    _, ours = pipes
    from difflab.models.autoencoder_kl import AutoencoderKL
    from difflab.models.clip_text import CLIPTextModel
    from difflab.models.tokenizer import CLIPTokenizer
    from difflab.models.unet_condition import UNet2DConditionModel
    from difflab.schedulers import DDIMScheduler

    assert isinstance(ours.unet, UNet2DConditionModel) and isinstance(ours.vae, AutoencoderKL)
    assert isinstance(ours.text_encoder, CLIPTextModel)
    assert isinstance(ours.tokenizer, CLIPTokenizer)
    assert isinstance(ours.scheduler, DDIMScheduler)  # the folder's scheduler_config.json
    assert ours.vae.config.scaling_factor == 0.18215
    assert ours.encode_prompt(PROMPTS).shape == (2, 77, 32)


def test_prompt_embeddings_match(pipes):
    pipe, ours = pipes
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert (ref - ours.encode_prompt(PROMPTS)).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_images_match_diffusers(pipes, scheduler):
    pipe, ours = pipes
    ref = diffusers_images(pipe, scheduler)
    got = difflab_images(ours, scheduler)
    assert got.shape == (2, 3, SIZE, SIZE) and got.dtype == torch.float32
    assert 0 <= got.min() and got.max() <= 1
    assert ref.std() > 0.01  # a real image, not a constant
    assert (ref - got).abs().max() <= TOL


def test_negative_prompt_and_no_guidance_match(pipes):
    pipe, ours = pipes
    neg = ["blurry", "low quality"]
    ref = diffusers_images(pipe, "euler", negative_prompt=neg, guidance_scale=5.0)
    assert (ref - difflab_images(ours, "euler", negative_prompt=neg,
                                 guidance_scale=5.0)).abs().max() <= TOL
    ref = diffusers_images(pipe, "ddim", guidance_scale=1.0)
    assert (ref - difflab_images(ours, "ddim", guidance_scale=1.0)).abs().max() <= TOL


def test_img2img_matches_diffusers(pipes):
    import diffusers

    from difflab.schedulers import SCHEDULERS as REGISTRY

    pipe, ours = pipes
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    for name in ("ddim", "euler", "dpm++"):
        img2img.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(SCHEDULER)
        ref = img2img(PROMPTS, image=image, strength=0.6, num_inference_steps=5,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
        ours.scheduler = REGISTRY[name].from_config(SCHEDULER)
        got = ours.img2img(PROMPTS, image, strength=0.6, num_inference_steps=5,
                           generator=torch.Generator().manual_seed(0))
        assert (ref - got).abs().max() <= TOL


def test_same_seed_same_images_and_checks(pipes):
    _, ours = pipes
    a = difflab_images(ours, "euler_a", seed=5)
    b = difflab_images(ours, "euler_a", seed=5)
    c = difflab_images(ours, "euler_a", seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(PROMPTS, num_inference_steps=1, height=15, width=16)
    with pytest.raises(ValueError, match="negative prompts"):
        ours(PROMPTS, num_inference_steps=1, negative_prompt=["x"])
    with pytest.raises(ValueError, match="strength"):
        ours.img2img(PROMPTS, torch.rand(2, 3, 16, 16), strength=0.0)


def test_trajectory_records_every_step_and_ends_at_the_image(pipes):
    """``trajectory=[]`` collects each step's latents without changing the images: the first
    input is the scaled start noise, each output is the next input, the last one decodes to
    the returned images, and x̂₀ is what the scheduler implied from the (guided) noise."""
    _, ours = pipes
    plain = difflab_images(ours, "ddim", seed=3)
    traj: list = []
    images = difflab_images(ours, "ddim", seed=3, trajectory=traj)
    assert torch.equal(images, plain) and len(traj) == 4
    start = ours._randn(tuple(traj[0].x_t.shape), torch.Generator().manual_seed(3))
    torch.testing.assert_close(traj[0].x_t, start * ours.scheduler.init_noise_sigma)
    for a, b in zip(traj, traj[1:]):
        assert torch.equal(a.prev_sample, b.x_t) and a.t > b.t
    torch.testing.assert_close(ours.decode(traj[-1].prev_sample), images)
    s, ab = traj[1], float(ours.scheduler.alphas_cumprod[traj[1].t])
    x0 = (s.x_t - (1 - ab) ** 0.5 * s.model_output) / ab**0.5  # DDIM's x̂₀ from ε̂
    torch.testing.assert_close(s.pred_x0, x0.clamp(-1, 1) if ours.scheduler.config.get(
        "clip_sample") else x0, rtol=1e-4, atol=1e-4)


def test_bf16_unet_gives_the_float32_noise_to_bf16_rounding(pipes):
    """``mixed_precision="bf16"`` autocasts the U-Net only: the first step's noise prediction
    from the same start is the float32 one up to bf16 rounding, in float32, and the result is
    deterministic. (Unguided: guidance 7.5 would multiply the rounding of ε_c − ε_u.)"""
    _, ours = pipes
    ref: list = []
    low: list = []
    kw = dict(seed=3, num_inference_steps=1, guidance_scale=1.0)
    difflab_images(ours, "ddim", trajectory=ref, **kw)
    a = difflab_images(ours, "ddim", trajectory=low, mixed_precision="bf16", **kw)
    b = difflab_images(ours, "ddim", mixed_precision="bf16", **kw)
    assert torch.equal(a, b)
    assert torch.equal(ref[0].x_t, low[0].x_t) and low[0].model_output.dtype == torch.float32
    rel = (low[0].model_output - ref[0].model_output).norm() / ref[0].model_output.norm()
    assert 1e-4 < rel < 3e-2


def test_sde_dpm_solver_images_match_diffusers(pipes):
    """The stochastic DPM-Solver++ draws its per-step noise from the pipeline's generator in
    diffusers' order, so the whole guided text-to-image run matches the peer."""
    import diffusers

    from difflab.schedulers import DPMSolverMultistepScheduler

    pipe, ours = pipes
    cfg = {**SCHEDULER, "algorithm_type": "sde-dpmsolver++"}
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    ours.scheduler = DPMSolverMultistepScheduler.from_config(cfg)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=7.5)
    ref = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    got = ours(PROMPTS, generator=torch.Generator().manual_seed(0), **kw)
    assert (ref - got).abs().max() <= TOL
    ours.scheduler = DPMSolverMultistepScheduler.from_config(SCHEDULER)  # the ODE, same start
    ode = ours(PROMPTS, generator=torch.Generator().manual_seed(0), **kw)
    assert (got - ode).abs().max() > 10 * TOL  # the per-step noise is really there
