"""Throughput of difflab's whole training loop (``difflab.training.train``), not just the U-Net.

    python benchmarks/train_loop.py --preset ddpm-cifar10 --batch 128 --device cuda \\
        --configs bf16,bf16-compile,bf16-ro --steps 60

Runs the real loop (Accelerate, AdamW, EMA, gradient clipping, the non-finite guard, LR
schedule) on synthetic data of the preset's shape (small: 1×28×28, ddpm-cifar10: 3×32×32)
with the ε objective and reports the steady-state images/s from a step about half-way (the
first steps compile and select kernels; :func:`steady_start`) to the end of the run. Set
against ``unet_train.py``'s bare-step numbers this shows what the loop costs. Writes
benchmarks/out/train_loop.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Variant,
    machine,
    parse_variant,
    print_table,
    report_failure,
    variant_help,
    write_json,
)

from difflab.models.unet import PRESETS, UNetConfig  # noqa: E402
from difflab.training import TrainConfig, loop, train  # noqa: E402
from difflab.training.objectives import DiffusionConfig, DiffusionObjective  # noqa: E402


class TimedObjective(DiffusionObjective):
    """The ε objective, stamping the wall clock at every call (when the host starts a step;
    on a GPU it may be steps ahead of the device, except right after a read-back)."""

    stamps: list[float]

    def training_loss(self, batch, generator):
        self.stamps.append(time.perf_counter())
        return super().training_loss(batch, generator)


_LOOP_PARTS = ("fp32", "bf16", "compile", "ro", "sync", "det")


def loop_variant(config: str) -> Variant:
    """The model variant a config names beside the loop's own parts (ValueError if unknown)."""
    rest = [p for p in config.split("-") if p not in _LOOP_PARTS]
    return parse_variant("-".join(["difflab", *rest]))


def steady_start(steps: int) -> int:
    """The step whose start the steady-state rate is timed from, to the end of the run: the
    last read-back at or before half the steps (the host has just waited for the GPU there;
    from an arbitrary step's start, with the sync-free guard, the host's lead over the device
    would count as speed), the middle step when there is none after the first steps."""
    every = getattr(loop, "READ_BACK_STEPS", 16)  # (16 before it had a name: gpu.sh's loop17)
    k = steps // 2 // every * every
    return k if k else steps // 2


def run(cfg: UNetConfig, batch: int, steps: int, config: str, device: str) -> dict:
    parts = config.split("-")
    mp = "bf16" if parts[0] == "bf16" else "no"
    compile_mode = "default" if "compile" in parts else "reduce-overhead" if "ro" in parts \
        else "no"
    lazy = False if "sync" in parts else None  # -sync: the per-step host-synced guard
    deterministic = "det" in parts  # -det: --deterministic (repeatable kernels)
    # the other parts name a variant of difflab's model as unet_train.py's peers do, e.g.
    # -gncl-rr6 (benchmarks/_common.py, VARIANT_SUFFIXES); inductor settings go to --compile
    variant = loop_variant(config)
    dev_type = torch.device(device).type
    variant.apply(dev_type)
    options = variant.inductor_options(dev_type)
    loop.COMPILE_OPTIONS = {dev_type: options} if options else {}
    torch.manual_seed(0)
    task = TimedObjective(variant.build(cfg, dev_type), DiffusionConfig())
    task.stamps = []
    n = batch * 8
    images = torch.rand(n, cfg.in_channels, cfg.sample_size, cfg.sample_size) * 2 - 1
    labels = torch.zeros(n, dtype=torch.long)
    tc = TrainConfig(batch_size=batch, lr=2e-4, max_steps=steps, mixed_precision=mp,
                     compile=compile_mode, progress=False, warmup_steps=10, lazy_guard=lazy,
                     deterministic=deterministic, channels_last=variant.channels_last,
                     bf16_weights="w16" in variant.flags)
    t0 = time.perf_counter()
    train(task, images, labels, tc)
    end = time.perf_counter()  # (the loop's last read-back waited for the device)
    total = end - t0
    s = task.stamps
    start = steady_start(len(s))
    steady = (len(s) - start) / (end - s[start])
    return {"config": config, "steps": steps, "img/s (steady)": steady * batch,
            "first-step s": s[1] - s[0] if len(s) > 1 else None, "total s": total,
            "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--configs", default="fp32", help="comma list: fp32, bf16, bf16-compile, "
                    "bf16-ro (reduce-overhead: CUDA graphs); a -sync suffix uses the guard "
                    "that syncs with the host every step (the CPU default), -det trains "
                    "with --deterministic (e.g. bf16-det, bf16-ro-det); any suffix of "
                    "unet_train.py's difflab peers names the model variant (e.g. "
                    "bf16-ro-gncl-rr6): " + variant_help())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cuda", "cpu"],
                    help="must be the device the loop picks (Accelerate: CUDA when there is "
                         "one): it labels the rows and selects the compile options")
    args = ap.parse_args()
    if (args.device == "cuda") != torch.cuda.is_available():  # Accelerate decides, not us
        ap.error(f"--device {args.device}: the training loop runs on "
                 f"{'cuda' if torch.cuda.is_available() else 'cpu'} on this machine")
    for config in args.configs.split(","):
        try:
            loop_variant(config)
        except ValueError as e:
            ap.error(f"config {config!r}: {e}")
    cfg = UNetConfig(**PRESETS[args.preset])
    rows = []
    for config in args.configs.split(","):
        try:
            rows.append(run(cfg, args.batch, args.steps, config, args.device))
        except Exception as e:  # noqa: BLE001 - one failing config must not end the others
            report_failure(config, e)
            continue
        print_table(rows[-1:])
    print_table(rows)
    path = write_json("train_loop", {"machine": machine(), "preset": args.preset,
                                     "batch": args.batch, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
