"""Run by tests/test_distributed.py under ``torchrun`` (P processes) and in-process (P = 1):
a few training steps of a tiny model on fixed data; the main process saves the weights (raw
and EMA) and the logged losses.

Models: ``unet`` — a tiny diffusion U-Net (per-row noise, timesteps, label drops); ``clip`` — a
tiny CLIP on generated captions (a contrastive loss: each row is compared with every row of
the global batch). For ``clip`` the main process also saves the gradient of the first global
batch at initialisation, averaged over processes as DDP does (``.grad.safetensors``): Adam is
almost blind to a gradient's scale, the weights alone would not show a wrong one.

    python -m torch.distributed.run --standalone --nproc_per_node 2 _ddp_worker.py OUT [unet|clip]
"""

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
TINY_CLIP = dict(image_channels=(8, 16), norm_num_groups=4, text_width=16, text_layers=1,
                 text_heads=2, projection_dim=8)
CLIP_CFG = dict(batch_size=8, lr=3e-3, warmup_steps=1, max_steps=3, progress=False, seed=3,
                ema_decay=0.9, grad_clip=1.0)


def _save(out: str, res, extra: dict | None = None) -> None:
    save_tensors(f"{out}.raw.safetensors", res.raw_model.state_dict())
    save_tensors(f"{out}.ema.safetensors", res.model.state_dict())
    with open(f"{out}.losses.json", "w") as f:
        json.dump({"world_size": int(os.environ.get("WORLD_SIZE", 1)),
                   "losses": [h["loss"] for h in res.history], **(extra or {})}, f)


def run(out: str, batch_size: int = CFG["batch_size"]) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(1)
    task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig(p_uncond=0.3))
    res = train(task, images, labels, TrainConfig(**{**CFG, "batch_size": batch_size}))
    if res.is_main_process:
        _save(out, res)


def _clip_task(data):
    from difflab.runs.clip import CaptionedCLIP, build_clip

    torch.manual_seed(1)
    model, tokenizer, captioner = build_clip(data, **TINY_CLIP)
    return CaptionedCLIP(model, captioner, tokenizer)


def run_clip(out: str, batch_size: int = CLIP_CFG["batch_size"]) -> None:
    from difflab.data import load_dataset
    from difflab.rng import BatchShard, ShardedGenerator

    data = load_dataset("digits").subset(48)
    res = train(_clip_task(data), data.images, data.labels,
                TrainConfig(**{**CLIP_CFG, "batch_size": batch_size}))
    # The gradient of one global batch at initialisation, as DDP averages it (train() left the
    # process group up): process r computes its rows, the gradients are summed and divided by P.
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    b = batch_size // world
    task = _clip_task(data)
    gen = ShardedGenerator("cpu", BatchShard(rank * b, (rank + 1) * b, batch_size)
                           if world > 1 else None)
    gen.manual_seed(7)
    rows = slice(rank * b, (rank + 1) * b)
    logs = task.training_loss({"images": data.images[:batch_size][rows],
                               "labels": data.labels[:batch_size][rows]}, gen)
    logs["loss"].backward()
    grads = {k: p.grad.detach().clone() for k, p in task.named_parameters()
             if p.grad is not None}
    loss = logs["loss"].detach().clone()
    if world > 1:
        import torch.distributed as dist

        for v in (*grads.values(), loss):
            dist.all_reduce(v)
            v /= world
    if res.is_main_process:
        save_tensors(f"{out}.grad.safetensors", grads)
        _save(out, res, {"first_loss": float(loss)})


if __name__ == "__main__":
    from difflab.training import close_process_group

    {"unet": run, "clip": run_clip}[sys.argv[2] if len(sys.argv) > 2 else "unet"](sys.argv[1])
    close_process_group()
