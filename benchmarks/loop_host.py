"""Host time of the training loop's own per-step parts (EMA step, gradient clipping, AdamW).

    python benchmarks/loop_host.py --preset ddpm-cifar10

On a GPU the host only queues kernels, and a small model's step is as fast as the host can
queue it; what the loop adds around the model is then time per step. This measures it on the
CPU with the preset's module tree (same modules, same parameter count) at 4 channels per
group, so that the arithmetic is negligible and what is left is host work: Python, dispatch,
per-tensor bookkeeping. Best of 5 repeats; then the whole loop's step (``train``: the model's
forward and backward, AdamW, clipping, EMA, guard) on that model at batch 2, 8×8 images.
Writes benchmarks/out/loop_host.json.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

from difflab.models.unet import PRESETS, unet_from_preset  # noqa: E402
from difflab.training.ema import EMA  # noqa: E402


def shrunk(preset: str) -> torch.nn.Module:
    """The preset's U-Net with 4, 8, 12, ... channels per level (4 groups of GroupNorm)."""
    levels = len(PRESETS[preset]["block_out_channels"])
    head = PRESETS[preset].get("attention_head_dim", 32)
    return unet_from_preset(preset, block_out_channels=tuple(4 * (i + 1) for i in range(levels)),
                            norm_num_groups=4, attention_head_dim=None if head is None else 4)


def whole_step(preset: str, steps: int = 60) -> float:
    """Seconds per step of difflab's training loop on the shrunk model (float32, EMA, clipping,
    the sync-free guard a GPU runs), timed by the loss calls from step 20 on, best of 3."""
    from train_loop import TimedObjective

    from difflab.training import TrainConfig, train
    from difflab.training.objectives import DiffusionConfig

    best = float("inf")
    for _ in range(3):
        torch.manual_seed(0)
        net = shrunk(preset)
        task = TimedObjective(net, DiffusionConfig())
        task.stamps = []
        c = net.config.in_channels
        images = torch.rand(64, c, 8, 8) * 2 - 1
        cfg = TrainConfig(batch_size=2, max_steps=steps, progress=False, lazy_guard=True,
                          mixed_precision="no", warmup_steps=5)
        train(task, images, torch.zeros(64, dtype=torch.long), cfg)
        s = task.stamps
        best = min(best, (s[-1] - s[20]) / (len(s) - 1 - 20))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ddpm-cifar10", choices=sorted(PRESETS))
    ap.add_argument("--number", type=int, default=300, help="calls per repeat")
    args = ap.parse_args()
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = shrunk(args.preset).to(memory_format=torch.channels_last)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    ema = EMA(model, 0.999)
    made, ok = torch.zeros((), dtype=torch.float64), torch.tensor(True)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    acc = Accelerator(cpu=True)
    parts = {
        "EMA step, device weight (the GPU's sync-free guard)":
            lambda: ema.update(model, weight=ok, made=made, params=params),
        "EMA step, host weight": lambda: ema.update(model, params=params),
        "EMA step, host weight, no params list": lambda: ema.update(model),
        "gradient clipping (Accelerate)": lambda: acc.clip_grad_norm_(params, 1.0),
        "gradient clipping (torch)": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "fused AdamW step": opt.step,
    }
    rows = []
    for name, fn in parts.items():
        fn()  # first call: lookups, optimizer state
        t = min(timeit.repeat(fn, number=args.number, repeat=5)) / args.number
        rows.append({"part": name, "host µs per step": t * 1e6})
    rows.append({"part": "whole training step (train(), the GPU's sync-free guard, batch 2 "
                         "at 8×8)", "host µs per step": whole_step(args.preset) * 1e6})
    print(f"{args.preset} module tree: {len(params)} parameters, "
          f"{sum(p.numel() for p in params)} elements")
    print_table(rows)
    path = write_json("loop_host", {"machine": machine(), "preset": args.preset,
                                    "parameters": len(params), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
