"""Text-to-image with latent diffusion ("Stable Diffusion"; Rombach et al. 2022, §3.3 and §4.3).

The loop, top to bottom (the diffusers "Stable Diffusion in 15 lines"):

    c   = text_encoder(tokenize(prompts)).last_hidden_state          (B, 77, D)
    ∅   = text_encoder(tokenize(negative_prompts or ""))              the "unconditional" text
    z_T = randn(B, 4, H/8, W/8) · init_noise_sigma
    for t in scheduler.timesteps:
        ε_∅, ε_c = unet(scale_model_input([z_t, z_t], t), t, [∅, c])  one batch, two halves
        ε   = ε_∅ + g · (ε_c − ε_∅)                                  classifier-free guidance
        z_t = scheduler.step(ε, t, z_t).prev_sample                   (Ho & Salimans 2022, eq. 6)
    x   = vae.decode(z_0 / scaling_factor).sample                     [−1, 1] → [0, 1]

``img2img`` starts the same loop part-way, from the encoded input image noised to the level of
the first kept step (SDEdit, Meng et al. 2022). Any difflab scheduler plugs in; the pipeline
knows nothing about how it steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab._tqdm import tqdm
from difflab.perf import autocast
from difflab.pipelines.image import TrajectoryStep


class TextToImage:
    """tokenizer + text_encoder + unet + vae + scheduler. See the module docstring."""

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler

    # ------------------------------------------------------------------------- utilities

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """f: the VAE halves the resolution len(block_out_channels) − 1 times (SD: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TextToImage:
        """Move (and cast) the three networks; returns self."""
        for model in (self.text_encoder, self.unet, self.vae):
            model.to(device=device, dtype=dtype)
        return self

    @torch.inference_mode()
    def encode_prompt(self, prompts: str | list[str]) -> Tensor:
        """Text embeddings ``(B, 77, D)``: the text encoder's last hidden state."""
        ids = self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts))
        return self.text_encoder(ids.to(self.device)).last_hidden_state.to(self.dtype)

    def _conditioning(self, prompts: list[str], negative_prompt: str | list[str] | None,
                      guided: bool) -> Tensor:
        """[∅; c] (2B, 77, D) when guiding, else c (B, 77, D)."""
        cond = self.encode_prompt(prompts)
        if not guided:
            return cond
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        return torch.cat([self.encode_prompt(negative), cond])

    def _randn(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        """Gaussian noise drawn on the generator's device (so a CPU seed gives the same image
        on every machine), then moved to the pipeline's device and dtype."""
        device = generator.device if generator is not None else self.device
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return noise.to(self.device, self.dtype)

    # --------------------------------------------------------------------------- sampling

    @torch.inference_mode()
    def denoise(self, latents: Tensor, timesteps: Tensor, context: Tensor,
                guidance_scale: float, generator: torch.Generator | None = None,
                progress: bool = False, trajectory: list | None = None,
                mixed_precision: str = "no") -> Tensor:
        """Run the scheduler from ``latents`` over ``timesteps``; ``context`` is [∅; c] when
        ``guidance_scale > 1`` (classifier-free guidance), else c. With a ``trajectory`` list,
        each step appends a :class:`~difflab.pipelines.image.TrajectoryStep` of latents
        (float32, CPU): the input, the (guided) predicted noise, x̂₀ and the output.
        ``mixed_precision`` ("no" | "bf16" | "fp16") autocasts the U-Net's forward only."""
        guided = guidance_scale > 1.0
        for t in tqdm(timesteps, desc="denoising", disable=not progress, leave=False):
            inp = torch.cat([latents, latents]) if guided else latents
            inp = self.scheduler.scale_model_input(inp, t)
            with autocast(self.device.type, mixed_precision):
                eps = self.unet(inp, t, encoder_hidden_states=context).sample
            eps = eps.to(latents.dtype)
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            res = self.scheduler.step(eps, t, latents, generator=generator)
            if trajectory is not None:
                trajectory.append(TrajectoryStep(int(t), *(v.float().cpu() for v in (
                    latents, eps, res.pred_original_sample, res.prev_sample))))
            latents = res.prev_sample
        return latents

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (scaled, as the U-Net sees them) → images (B, 3, H, W) in [0, 1], float32 CPU."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.inference_mode()
    def __call__(self, prompts: str | list[str], num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None,
                 generator: torch.Generator | None = None, progress: bool = False,
                 latents: Tensor | None = None, trajectory: list | None = None,
                 mixed_precision: str = "no") -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] (float32, CPU) for ``prompts``.

        ``height``/``width`` default to the U-Net's training size (SD v1: 512) and must be
        multiples of 8. ``latents`` (B, 4, H/8, W/8) replaces the initial noise (before the
        ``init_noise_sigma`` scaling), e.g. to reuse a starting point. A ``trajectory`` list
        receives every step's latents (see :meth:`denoise`; :meth:`decode` shows them).
        ``mixed_precision`` autocasts the U-Net (see :meth:`denoise`).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}; got {height}×{width}")
        context = self._conditioning(prompts, negative_prompt, guidance_scale > 1.0)

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        shape = (len(prompts), self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = self._randn(shape, generator)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        latents = latents.to(self.device, self.dtype) * self.scheduler.init_noise_sigma
        latents = self.denoise(latents, self.scheduler.timesteps, context, guidance_scale,
                               generator, progress, trajectory, mixed_precision)
        return self.decode(latents)

    @torch.inference_mode()
    def img2img(self, prompts: str | list[str], image: Tensor, strength: float = 0.8,
                num_inference_steps: int = 50, guidance_scale: float = 7.5,
                negative_prompt: str | list[str] | None = None,
                generator: torch.Generator | None = None, progress: bool = False,
                mixed_precision: str = "no") -> Tensor:
        """Redraw ``image`` (B, 3, H, W) in [0, 1] following ``prompts``.

        ``strength`` ∈ (0, 1] is the fraction of the schedule that is run: the encoded image is
        noised to the first of the last ``int(strength · steps)`` timesteps and denoised from
        there (1.0 = start from pure noise level, nearly ignoring the image).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if image.ndim == 3:
            image = image[None]
        if image.shape[0] != len(prompts):
            raise ValueError(f"{image.shape[0]} images for {len(prompts)} prompts")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength} must be in (0, 1]")
        context = self._conditioning(prompts, negative_prompt, guidance_scale > 1.0)

        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device=self.device)
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        if kept < 1:
            raise ValueError(f"strength={strength} × {num_inference_steps} steps leaves no step")
        start = (num_inference_steps - kept) * sched.order
        timesteps = sched.timesteps[start:]
        sched.set_begin_index(start)

        x = (image.to(self.device, self.dtype) * 2 - 1)
        z0 = self.vae.encode(x).latent_dist.sample(generator) * self.vae.config.scaling_factor
        noise = self._randn(tuple(z0.shape), generator)
        latents = sched.add_noise(z0, noise, timesteps[:1].repeat(len(prompts)))
        latents = self.denoise(latents, timesteps, context, guidance_scale, generator, progress,
                               mixed_precision=mixed_precision)
        return self.decode(latents)
