"""Quality race contestant 3: denoising-diffusion-pytorch's ``Trainer`` with its README recipe.

Runs in its **own venv** (torchvision does not import beside difflab's torch 2.13.0 CPU build),
made by ``bash benchmarks/setup_peers.sh`` (default /work/peervenv)::

    /work/peervenv/bin/python -m venv /work/peervenv     # (what setup_peers.sh does)
    /work/peervenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/peervenv/bin/pip install denoising-diffusion-pytorch==2.3.4

This file imports no difflab code; of the benchmarks' helpers only ``_race_sampling`` (torch
and safetensors alone). ``benchmarks/quality_race.py``
calls it with the peer venv's python:

    python race_ddpm_pytorch.py train --png-dir DIR --minutes 20 --out /tmp/race/ddpm-pytorch
    python race_ddpm_pytorch.py sample --out /tmp/race/ddpm-pytorch --n 5000

``train --steps S`` replays a budget: exactly the S optimiser steps the budget reached on the
CPU (the Trainer's ``train_num_steps``); the Trainer (Accelerate) trains on a GPU when there is
one, and ``sample --device cuda`` samples there.

The recipe is the README's "Trainer" example, unchanged except where noted:
``Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=False)`` (the README's ``flash_attn=True``
needs CUDA), ``channels=1`` (Fashion-MNIST is grey; the Trainer then reads PNGs as "L");
``GaussianDiffusion(image_size=32, timesteps=1000, sampling_timesteps=50)`` with the library's
defaults (v-prediction, sigmoid β schedule, DDIM η = 0 when sampling_timesteps < timesteps);
``Trainer(train_batch_size=32, gradient_accumulate_every=2, train_lr=8e-5, ema_decay=0.995,
amp=False, calculate_fid=False)`` with its other defaults (Adam betas (0.9, 0.99), constant LR,
gradient clipping 1.0, EMA every 10 steps after 100, random horizontal flip, a DataLoader with
``cpu_count()`` worker processes). Its data are a folder of PNGs (the Fashion-MNIST train split
zero-padded to 32×32, written by quality_race.py before the budget starts); samples are cropped
back to 28×28.

Budget: ``train_num_steps`` is set far beyond reach and a wall-clock check after every
optimiser step (wrapped around the Trainer's EMA update, which it calls once per step) ends
``Trainer.train()``; ``save_and_sample_every`` is beyond reach too, so no budget is spent on
sampling or on its ``torch.save`` checkpoints. The EMA weights (the ones the README samples) are
written as safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from _race_sampling import sample_to_file  # the script's folder is on sys.path

UNET = dict(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=False, channels=1)
DIFFUSION = dict(image_size=32, timesteps=1000, sampling_timesteps=50)
TRAINER = dict(train_batch_size=32, gradient_accumulate_every=2, train_lr=8e-5,
               ema_decay=0.995, amp=False, calculate_fid=False)
NEVER = 10 ** 9  # train_num_steps / save_and_sample_every beyond any budget


class _BudgetReached(Exception):
    pass


def _threads() -> None:
    torch.set_num_threads(int(os.environ.get("RACE_THREADS", "2")))


def _diffusion():
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    return GaussianDiffusion(Unet(**UNET), **DIFFUSION)


def train(png_dir: Path, out: Path, minutes: float | None, seed: int,
          steps: int | None = None) -> dict:
    """Train until ``minutes`` of loop have passed, or for exactly ``steps`` steps."""
    from denoising_diffusion_pytorch import Trainer
    from safetensors.torch import save_file

    _threads()
    torch.manual_seed(seed)
    diffusion = _diffusion()
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(diffusion, str(png_dir), train_num_steps=steps or NEVER,
                      save_and_sample_every=NEVER, results_folder=str(out / "results"),
                      **TRAINER)
    losses: list[float] = []  # per micro-batch (before the 1/accumulate scaling)
    diffusion.register_forward_hook(lambda m, inp, loss: losses.append(float(loss.detach())))
    budget = minutes * 60 if minutes is not None else float("inf")
    ema_update = trainer.ema.update
    t0 = time.perf_counter()

    def update_then_check() -> None:  # called once per optimiser step, after step += 1
        ema_update()
        if time.perf_counter() - t0 >= budget:
            raise _BudgetReached

    trainer.ema.update = update_then_check
    try:
        trainer.train()
    except _BudgetReached:
        pass
    seconds = time.perf_counter() - t0
    ema = trainer.ema.ema_model
    save_file({k: v.detach().contiguous().clone() for k, v in ema.state_dict().items()},
              str(out / "ema.safetensors"))
    tail = losses[-2 * TRAINER["gradient_accumulate_every"] * 50:]
    per_step = TRAINER["train_batch_size"] * TRAINER["gradient_accumulate_every"]
    res = {"contestant": "ddpm-pytorch", "steps": trainer.step, "train_seconds": seconds,
           "batch_size": per_step, "img_per_s": trainer.step * per_step / seconds,
           "final_loss": sum(tail) / max(len(tail), 1),
           "parameters": sum(p.numel() for p in diffusion.model.parameters()),
           "recipe": {"unet": UNET, "diffusion": DIFFUSION, "trainer": TRAINER,
                      "objective": diffusion.objective},
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "device": str(trainer.device)}
    (out / "train.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


@torch.inference_mode()
def sample(out: Path, n: int, seed: int, batch: int, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    _threads()
    diffusion = _diffusion()
    diffusion.load_state_dict(load_file(str(out / "ema.safetensors")), strict=True)
    diffusion.eval().to(device)

    def draw(b: int, i: int) -> torch.Tensor:
        torch.manual_seed(seed * 1_000_003 + i)  # the library samples from the global RNG
        return diffusion.sample(batch_size=b)  # (B, 1, 32, 32) in [0, 1]

    return sample_to_file(draw, out, n, batch, "ddpm-pytorch",
                          f"DDIM eta=0, {DIFFUSION['sampling_timesteps']} steps (EMA)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--png-dir", type=Path, required=True)
    budget = t.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget of the loop")
    budget.add_argument("--steps", type=int, help="exact step count (a replayed budget)")
    s = sub.add_parser("sample")
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--batch", type=int, default=250)
    s.add_argument("--device", default="cpu")
    for p in (t, s):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "train":
        print(json.dumps(train(a.png_dir, a.out, a.minutes, a.seed, a.steps)))
    else:
        print(json.dumps(sample(a.out, a.n, a.seed, a.batch, a.device)))


if __name__ == "__main__":
    main()
