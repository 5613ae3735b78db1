"""Pixel-space sampling: the reverse process with any scheduler, optional class guidance.

The loop, top to bottom (the diffusers "15 lines", for images instead of latents):

    x_T = randn · init_noise_sigma
    for t in scheduler.timesteps:
        inp = scale_model_input(x_t, t)
        out = unet([inp, inp], t, class_labels=[null, y])          # one batch, two halves
        out = out_u + g · (out_c − out_u)                            # classifier-free guidance
        x_t = scheduler.step(out, t, x_t).prev_sample
    return (x_0 + 1) / 2                                             # [−1, 1] → [0, 1]
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from difflab._tqdm import tqdm
from difflab.errors import ConfigError
from difflab.perf import autocast


@dataclass
class TrajectoryStep:
    """One denoising step of the "misconception" figure (all tensors (B, C, H, W))."""

    t: int
    x_t: torch.Tensor  # the input of this step
    model_output: torch.Tensor  # the network's prediction: the *whole* noise (ε), or v, or x̂₀
    pred_x0: torch.Tensor  # the implied clean image x̂₀
    prev_sample: torch.Tensor  # x_{t−1}: the scheduler removed only part of the noise


@dataclass
class SampleOutput:
    images: torch.Tensor  # (B, C, H, W) in [0, 1]
    trajectory: list[TrajectoryStep] = field(default_factory=list)


class ImagePipeline:
    """Couples a pixel-space U-Net and a scheduler. Neither knows the other."""

    def __init__(self, unet: nn.Module, scheduler: object) -> None:
        self.unet = unet
        self.scheduler = scheduler

    @torch.inference_mode()
    def __call__(self, n: int, *, num_inference_steps: int = 50,
                 generator: torch.Generator | None = None,
                 class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 image_size: int | None = None, return_trajectory: bool = False,
                 progress: bool = False, eta: float | None = None,
                 mixed_precision: str = "no") -> SampleOutput:
        """``mixed_precision`` ("no" | "bf16" | "fp16"): autocast for the network's forward
        only; guidance and the scheduler's update stay in the sample's dtype (float32)."""
        unet, sched = self.unet, self.scheduler
        cfg = unet.config
        size = image_size or cfg.sample_size
        dev = next(unet.parameters()).device
        dtype = next(unet.parameters()).dtype
        sched.set_timesteps(num_inference_steps, device=dev)
        x = torch.randn((n, cfg.in_channels, size, size), generator=generator,
                        device=generator.device if generator is not None else dev)
        x = (x.to(dev) * sched.init_noise_sigma).to(dtype)
        if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # match an NHWC model

        null = None
        if getattr(cfg, "num_class_embeds", None):
            null = cfg.num_class_embeds - 1
            if class_labels is None:
                class_labels = torch.full((n,), null, dtype=torch.long)
            class_labels = class_labels.to(dev)
        guided = class_labels is not None and guidance_scale != 1.0
        labels_in = torch.cat([torch.full_like(class_labels, null), class_labels]) if guided \
            else class_labels
        step_kw = {"generator": generator}
        if eta is not None:
            if "eta" not in inspect.signature(sched.step).parameters:
                raise ConfigError(f"eta is a DDIM option; {type(sched).__name__} has none "
                                  "(sample with the ddim scheduler to set it)")
            step_kw["eta"] = eta

        trajectory = []
        for t in tqdm(sched.timesteps, desc="sampling", disable=not progress, leave=False):
            inp = sched.scale_model_input(x, t)
            with autocast(dev.type, mixed_precision):
                out = unet(torch.cat([inp, inp]) if guided else inp, t,
                           class_labels=labels_in).sample
            out = out.to(x.dtype)
            if guided:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            res = sched.step(out, t, x, **step_kw)
            if return_trajectory:
                trajectory.append(TrajectoryStep(int(t), x.float().cpu(), out.float().cpu(),
                                                 res.pred_original_sample.float().cpu(),
                                                 res.prev_sample.float().cpu()))
            x = res.prev_sample
        images = ((x.float() + 1) / 2).clamp(0, 1)
        return SampleOutput(images=images, trajectory=trajectory)
