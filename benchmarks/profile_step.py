"""Where a U-Net training step spends its time: torch.profiler's top operators.

    python benchmarks/profile_step.py --preset ddpm-cifar10 --batch 128 --device cuda --mode bf16
    python benchmarks/profile_step.py                       # CPU, the small 28×28 preset

One warm step, then ``--iters`` profiled steps of the same bare step ``unet_train.py`` times
(AdamW, ε-MSE, channels_last). Prints the operators sorted by self time on the device and
writes benchmarks/out/profile_step.json (top operators with their share of the step).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, sync, write_json  # noqa: E402
from unet_train import make_step  # noqa: E402

from difflab.models.unet import PRESETS, UNet2DModel, UNetConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--mode", default="fp32", help="fp32 | bf16 (autocast)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = UNetConfig(**PRESETS[args.preset])
    if args.device == "cpu" and args.preset == "small":
        cfg = UNetConfig(**{**PRESETS["small"], "sample_size": 28})
    torch.manual_seed(0)
    step, _ = make_step(UNet2DModel(cfg), args.batch, cfg, device, args.mode,
                        args.layout == "channels_last")
    step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.iters):
            step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    rows = [{"operator": e.key[:48], "calls/step": e.count // args.iters,
             "ms/step": getattr(e, key) / 1e3 / args.iters,
             "% of step": 100 * getattr(e, key) / total} for e in events[:args.top]]
    print(f"{args.preset} batch {args.batch} {args.mode} {args.layout} on {device}: "
          f"{total / 1e3 / args.iters:.1f} ms of {'device' if device.type == 'cuda' else 'CPU'}"
          " self time per step")
    print_table(rows)
    path = write_json("profile_step", {"machine": machine(), "preset": args.preset,
                                       "batch": args.batch, "mode": args.mode, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
