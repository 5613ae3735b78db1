"""Quality race contestant 2: diffusers' unconditional-training recipe on Fashion-MNIST.

A transcription of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
with its defaults, run by ``benchmarks/quality_race.py`` in a subprocess (difflab's venv, which
has diffusers):

    python benchmarks/race_diffusers.py train --minutes 20 --out /tmp/race/diffusers
    python benchmarks/race_diffusers.py sample --out /tmp/race/diffusers --n 5000

``train --steps S --device cuda`` replays a budget on a GPU: the S steps that the budget reached
on the CPU, same recipe (quality_race.py ``--replay-steps``).

What is the script's, unchanged:
- ``UNet2DModel(layers_per_block=2, block_out_channels=(128, 128, 256, 256, 512, 512),
  down (Down×4, AttnDown, Down), up (Up, AttnUp, Up×4))``;
- ``DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")``;
- AdamW(lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8), gradient clipping at 1.0,
  ``get_scheduler("cosine", num_warmup_steps=500, num_training_steps=len(loader) · num_epochs)``
  with the script's ``num_epochs=100`` — the LR horizon is the recipe's, not the budget's, so at
  a 20-minute budget the LR is still near its peak (diffusers' recipe has no notion of a
  wall-clock budget; difflab's re-fits its cosine horizon to the budget);
- ``EMAModel(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3/4)``, stepped every step;
  the EMA weights are the ones sampled (as the script's pipeline does);
- batch 16, shuffled epochs, random horizontal flip (the script's ``--random_flip``, used by its
  README command), images normalised to [-1, 1], ε-prediction MSE loss, fp32.

What differs, and why:
- **32×32×1 instead of 64×64×3.** Fashion-MNIST is 28×28 grey: images are zero-padded (black,
  the data's background) by 2 px to 32×32, the smallest size this six-level U-Net accepts
  (32 → 1 at the bottom); the script's 64 default would upsample, cost ≈4× the compute per step
  and so quarter the steps reached in the budget. One channel instead of the script's
  ``convert("RGB")`` (three equal channels carry nothing more). Samples are cropped back to
  28×28 for scoring.
- Data come from difflab's in-memory Fashion-MNIST tensors instead of a PIL/``datasets``
  pipeline (same pixels; the per-image PIL transforms would only cost time).
- The loop ends at the wall-clock budget (checked after every step; model build and data
  preparation are outside it).
- **Sampling:** the script's ``DDPMPipeline`` runs 1000 DDPM steps; for this ~114 M-parameter
  net that is unaffordable on a CPU, so samples use ``DDIMPipeline`` (DDIM, η = 0, 50 steps,
  the scheduler built from the training scheduler's config) on the EMA weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _race_sampling import PAD, sample_to_file  # the script's folder is on sys.path

UNET_KW = dict(
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D",
                      "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
                    "UpBlock2D"),
)
RECIPE = dict(batch_size=16, num_epochs=100, learning_rate=1e-4, lr_scheduler="cosine",
              lr_warmup_steps=500, adam_beta1=0.95, adam_beta2=0.999, adam_weight_decay=1e-6,
              adam_epsilon=1e-8, ema_inv_gamma=1.0, ema_power=3 / 4, ema_max_decay=0.9999,
              ddpm_num_steps=1000, ddpm_beta_schedule="linear", prediction_type="epsilon",
              max_grad_norm=1.0)


def _threads() -> None:
    torch.set_num_threads(int(os.environ.get("RACE_THREADS", "2")))


def train(out: Path, minutes: float | None, seed: int, data: str, steps: int | None = None,
          device: str = "cpu") -> dict:
    """Train until ``minutes`` of loop have passed, or for exactly ``steps`` steps."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from difflab.data import load_dataset

    _threads()
    torch.manual_seed(seed)
    r = RECIPE
    images = load_dataset(data, "train").images  # (N, 1, 28, 28) in [-1, 1]
    images = F.pad(images, (PAD,) * 4, value=-1.0)  # (N, 1, 32, 32), black border
    n, c, h, _ = images.shape
    model = UNet2DModel(sample_size=h, in_channels=c, out_channels=c, **UNET_KW).to(device)
    images = images.to(device)
    noise_scheduler = DDPMScheduler(num_train_timesteps=r["ddpm_num_steps"],
                                    beta_schedule=r["ddpm_beta_schedule"],
                                    prediction_type=r["prediction_type"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=r["learning_rate"],
                                  betas=(r["adam_beta1"], r["adam_beta2"]),
                                  weight_decay=r["adam_weight_decay"], eps=r["adam_epsilon"])
    steps_per_epoch = math.ceil(n / r["batch_size"])  # len(train_dataloader)
    lr_scheduler = get_scheduler(r["lr_scheduler"], optimizer=optimizer,
                                 num_warmup_steps=r["lr_warmup_steps"],
                                 num_training_steps=steps_per_epoch * r["num_epochs"])
    ema = EMAModel(model.parameters(), decay=r["ema_max_decay"], use_ema_warmup=True,
                   inv_gamma=r["ema_inv_gamma"], power=r["ema_power"],
                   model_cls=UNet2DModel, model_config=model.config)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    step, budget = 0, (minutes * 60 if minutes is not None else math.inf)
    max_steps = steps if steps is not None else math.inf
    model.train()
    t0 = time.perf_counter()
    done = False
    while not done:
        perm = torch.randperm(n, generator=g)  # DataLoader(shuffle=True): last batch ragged
        for i in range(0, n, r["batch_size"]):
            clean = images[perm[i:i + r["batch_size"]].to(device)]
            flip = torch.rand(len(clean), generator=g) < 0.5  # RandomHorizontalFlip
            flip = flip.to(device)
            clean = torch.where(flip[:, None, None, None], clean.flip(-1), clean)
            noise = torch.randn(clean.shape, generator=g).to(device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                      (len(clean),), generator=g).long().to(device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            pred = model(noisy, timesteps).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), r["max_grad_norm"])
            optimizer.step()
            lr_scheduler.step()
            ema.step(model.parameters())
            optimizer.zero_grad()
            step += 1
            losses.append(loss.item())
            if time.perf_counter() - t0 >= budget or step >= max_steps:
                done = True
                break
    seconds = time.perf_counter() - t0
    ema.copy_to(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "unet", safe_serialization=True)
    noise_scheduler.save_pretrained(out / "scheduler")
    tail = losses[-100:]
    res = {"contestant": "diffusers", "steps": step, "train_seconds": seconds,
           "batch_size": r["batch_size"], "img_per_s": step * r["batch_size"] / seconds,
           "final_loss": sum(tail) / len(tail), "final_lr": lr_scheduler.get_last_lr()[0],
           "ema_decay": ema.cur_decay_value if hasattr(ema, "cur_decay_value") else None,
           "parameters": sum(p.numel() for p in model.parameters()), "recipe": r,
           "threads": torch.get_num_threads(), "device": device}
    (out / "train.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


@torch.inference_mode()
def sample(out: Path, n: int, seed: int, steps: int, batch: int, device: str = "cpu") -> dict:
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
    _threads()
    unet = UNet2DModel.from_pretrained(out / "unet").eval().to(device)
    ddpm = DDPMScheduler.from_pretrained(out / "scheduler")
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(ddpm.config))
    pipe.set_progress_bar_config(disable=True)

    def draw(b: int, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        x = pipe(batch_size=b, generator=g, eta=0.0, num_inference_steps=steps,
                 output_type="np").images  # (B, H, W, C) float in [0, 1]
        return torch.from_numpy(x).permute(0, 3, 1, 2)  # (B, C, H, W)

    return sample_to_file(draw, out, n, batch, "diffusers",
                          f"DDIM eta=0, {steps} steps (EMA weights)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    budget = t.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget of the loop")
    budget.add_argument("--steps", type=int, help="exact step count (a replayed budget)")
    t.add_argument("--data", default="fashion-mnist")
    s = sub.add_parser("sample")
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--batch", type=int, default=250)
    for p in (t, s):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.cmd == "train":
        print(json.dumps(train(a.out, a.minutes, a.seed, a.data, a.steps, a.device)))
    else:
        print(json.dumps(sample(a.out, a.n, a.seed, a.steps, a.batch, a.device)))


if __name__ == "__main__":
    main()
