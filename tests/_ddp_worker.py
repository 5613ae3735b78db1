"""Run by tests/test_distributed.py under ``torchrun`` (P processes) and in-process (P = 1):
a few training steps of a tiny diffusion U-Net on fixed data; the main process saves the
weights (raw and EMA) and the logged losses."""

from __future__ import annotations

import json
import os
import sys

import torch

from difflab.io import save_tensors
from difflab.models.unet import UNet2DModel, UNetConfig
from difflab.training import TrainConfig, train
from difflab.training.objectives import DiffusionConfig, DiffusionObjective

TINY = dict(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            attention_levels=(False, True), norm_num_groups=4, attention_head_dim=8,
            sample_size=8, num_class_embeds=4)
CFG = dict(batch_size=8, lr=1e-2, warmup_steps=1, max_steps=4, progress=False, seed=3,
           ema_decay=0.9, grad_clip=1.0)


def run(out: str, batch_size: int = CFG["batch_size"]) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(1)
    task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig(p_uncond=0.3))
    res = train(task, images, labels, TrainConfig(**{**CFG, "batch_size": batch_size}))
    if res.is_main_process:
        save_tensors(f"{out}.raw.safetensors", res.raw_model.state_dict())
        save_tensors(f"{out}.ema.safetensors", res.model.state_dict())
        with open(f"{out}.losses.json", "w") as f:
            json.dump({"world_size": int(os.environ.get("WORLD_SIZE", 1)),
                       "losses": [h["loss"] for h in res.history]}, f)


if __name__ == "__main__":
    run(sys.argv[1])
