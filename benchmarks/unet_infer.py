"""U-Net sampling throughput (one denoiser evaluation per image): difflab vs diffusers, one run.

    python benchmarks/unet_infer.py                      # CPU, the 'small' 28×28 preset
    python benchmarks/unet_infer.py --batches 64,500 --allocators default,keep

Sampling cost is NFE × this number. Both models come from the same config (equal parameter
counts) and run under ``torch.inference_mode`` in float32: difflab channels_last, as its
sampler runs it; diffusers NCHW, as ``DDPMPipeline`` runs it. ``--allocators`` repeats the
measurement in a child process per glibc setting: ``default``, or ``keep`` (what the difflab
CLI sets, ``difflab.perf.keep_freed_memory``). Peers are interleaved, medians reported.
``--precisions no,bf16`` also times both under bf16 autocast (``difflab sample
--mixed-precision bf16``). Writes benchmarks/out/unet_infer.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_table, time_fn, write_json  # noqa: E402
from unet_train import diffusers_unet  # noqa: E402

from difflab.models.unet import PRESETS, UNet2DModel, UNetConfig  # noqa: E402
from difflab.perf import autocast, keep_freed_memory  # noqa: E402


def measure(args: argparse.Namespace) -> list[dict]:
    if args.allocator == "keep" and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() did not apply (not glibc?)")
    cfg = UNetConfig(**{**PRESETS[args.preset], "sample_size": args.size})
    models = {}
    for peer in args.peers.split(","):
        torch.manual_seed(0)
        m = UNet2DModel(cfg) if peer == "difflab" else diffusers_unet(cfg)
        if peer == "difflab":
            m = m.to(memory_format=torch.channels_last)
        models[peer] = m.eval()
    rows = []
    for b in (int(v) for v in args.batches.split(",")):
        x = torch.randn(b, cfg.in_channels, args.size, args.size)
        t = torch.full((b,), 500)
        inputs = {p: (x.contiguous(memory_format=torch.channels_last) if p == "difflab" else x)
                  for p in models}
        runs = [(p, prec) for prec in args.precisions.split(",") for p in models]
        times = {r: [] for r in runs}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for p, prec in runs:
                    def call(m=models[p], x=inputs[p], t=t, prec=prec):
                        with autocast("cpu", prec):
                            return m(x, t)
                    times[p, prec].append(time_fn(call, torch.device("cpu"), iters=args.iters,
                                                  warmup=1))
        for p, prec in runs:
            sec = median(times[p, prec])
            rows.append({"allocator": args.allocator, "precision": prec, "batch": b,
                         "model": p, "img/s": b / sec, "ms per image": 1e3 * sec / b})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--size", type=int, help="image side (default: the preset's sample_size)")
    ap.add_argument("--batches", default="64,250")
    ap.add_argument("--peers", default="difflab,diffusers")
    ap.add_argument("--allocators", default="default,keep")
    ap.add_argument("--precisions", default="no", help="autocast precisions: no,bf16")
    ap.add_argument("--allocator", help=argparse.SUPPRESS)  # child process: one setting
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.size is None:
        args.size = PRESETS[args.preset].get("sample_size", 28)
    if args.allocator:
        print(json.dumps(measure(args)))
        return
    rows = []
    for alloc in args.allocators.split(","):
        cmd = [sys.executable, __file__, "--allocator", alloc] + [
            f"--{k}={getattr(args, k)}" for k in
            ("preset", "size", "batches", "peers", "iters", "rounds", "precisions")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:  # the child's own error, not just its exit status
            sys.exit(f"unet_infer.py ({alloc} allocator) failed:\n{proc.stderr[-2000:]}")
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    base = {(r["batch"], r["precision"], r["allocator"]): r["img/s"] for r in rows
            if r["model"] == "diffusers"}
    for r in rows:
        key = (r["batch"], r["precision"], r["allocator"])
        r["vs diffusers (same allocator, precision)"] = r["img/s"] / base[key] \
            if key in base else None
    print(f"preset {args.preset} {args.size}×{args.size}, inference_mode, "
          f"{torch.get_num_threads()} threads")
    print_table(rows)
    path = write_json("unet_infer", {"machine": machine(), "preset": args.preset,
                                     "size": args.size, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
