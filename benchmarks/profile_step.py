"""Where a U-Net training step spends its time: torch.profiler, kernels grouped by kind.

    python benchmarks/profile_step.py --preset ddpm-cifar10 --batch 128 --device cuda --mode bf16
    python benchmarks/profile_step.py --device cuda --mode bf16-cl-compile --cudnn-benchmark on,off
    python benchmarks/profile_step.py                       # CPU, the small 28×28 preset

One warm step, then ``--iters`` profiled steps of the same bare step ``unet_train.py`` times
(AdamW, ε-MSE; ``--mode`` and ``--variant`` as its modes and peers). On a GPU only the
*kernels* are summed (the operators that launch them would count the same time twice), grouped
by kind — convolutions
(cuDNN), matrix products, attention, Triton (torch.compile's fused kernels), PyTorch's own
elementwise / reduction / normalisation kernels, copies and layout changes, the optimizer — and
the step's wall time is timed apart (device idle time = wall − kernel time: launch overhead).
The FLOPs of the convolutions, matrix products and attention (FlopCounterMode) over their kernel
time give the rate the math units reach, the number that bounds the whole step's rate.
``--cudnn-benchmark on,off`` profiles each setting (eager modes need no recompilation);
``--copies`` lists the data-moving operators by input shape (where the layout copies come from)
and the convolutions by input shape (which are slow for their size).
Writes benchmarks/out/profile_step.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    machine,
    parse_variant,
    preset_config,
    print_table,
    sync,
    variant_help,
    write_json,
)
from unet_train import check_mode, make_step, step_flop_counter  # noqa: E402

from difflab.models.unet import PRESETS, UNetConfig  # noqa: E402

# (kind, substrings of the kernel name, lower-cased); the first match wins. Triton kernels come
# first: torch.compile names them after every op they fuse ("..._clone_convolution_...").
KINDS = [
    ("triton reduction", ("triton_red", "triton_per")),
    ("triton pointwise", ("triton_poi", "triton_")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("attention", ("flash", "fmha", "attention", "cudnn_sdpa")),
    ("layout/copy", ("nchwtonhwc", "nhwctonchw", "copy", "transpose")),
    ("convolution", ("conv", "xmma", "implicit_gemm", "dgrad", "wgrad", "fprop", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cublas", "cutlass", "matmul")),
    ("group norm", ("group_norm", "groupnorm", "rowwisemoments", "computefusedparams",
                    "computeinternalgradients", "gammabetabackward")),
    ("reduction", ("reduce_kernel", "reduce")),
    ("elementwise", ("elementwise", "vectorized")),
]
# operators whose kernels only move data: the --copies table says where they come from
COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::cat",
            "aten::to")
MATH_OPS = {"convolution": ("convolution",), "matmul": ("mm", "addmm", "bmm", "baddbmm"),
            "attention": ("attention",)}


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def math_flops(model: torch.nn.Module, cfg: UNetConfig, batch: int) -> dict[str, float]:
    """FLOPs per step of convolutions / matrix products / attention (forward + backward)."""
    fc = step_flop_counter(model, cfg, batch)
    out: dict[str, float] = defaultdict(float)
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        parts = str(op).split(".")  # "aten.convolution_backward" (.default)
        name = parts[1] if len(parts) > 1 else parts[0]
        for kind, keys in MATH_OPS.items():
            if any(k == name or (k in name and kind != "matmul") for k in keys):
                out[kind] += float(n)
                break
    return dict(out)


def wall_ms(step, device: torch.device, iters: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - t0) / iters * 1e3


def is_convolution(op: str) -> bool:
    return op.startswith("aten::") and "convolution" in op


def copy_table(prof, iters: int, top: int, key: str, keep=COPY_OPS.__contains__) -> list[dict]:
    """The data-moving operators (or those ``keep`` names) by input shape, with the (device)
    time of their kernels (the shapes say which tensors: activations, weights; the strides
    are not recorded)."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if keep(e.key) and getattr(e, key) > 0:
            rows.append({"operator": e.key, "input shapes": str(e.input_shapes)[:70],
                         "calls/step": e.count // iters,
                         "ms/step": getattr(e, key) / 1e3 / iters})
    rows.sort(key=lambda r: -r["ms/step"])
    return rows[:top]


def profile_once(step, device: torch.device, iters: int, top: int, flops: dict[str, float],
                 copies: bool = False):
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=copies) as prof:
        for _ in range(iters):
            step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    copy_rows = copy_table(prof, iters, top, key) if copies else []
    conv_rows = copy_table(prof, iters, top, key, is_convolution) if copies else []
    if device.type == "cuda":  # kernels only: an operator's device time is its kernels' time
        cuda = torch.autograd.DeviceType.CUDA
        events = [e for e in prof.key_averages()
                  if e.device_type == cuda and e.self_device_time_total > 0]
    else:
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(getattr(e, key) for e in events)
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        k = kind_of(e.key) if device.type == "cuda" else "operator"
        kinds[k][0] += getattr(e, key)
        kinds[k][1] += e.count
    by_kind = []
    for k, (us, count) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        ms = us / 1e3 / iters
        row = {"kind": k, "kernels/step": count // iters, "ms/step": ms,
               "% of kernel time": 100 * us / total}
        if k in flops and ms > 0:
            row["TFLOP/s"] = flops[k] / (ms / 1e3) / 1e12
        by_kind.append(row)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    top_rows = [{"kernel": e.key[:64], "kind": kind_of(e.key), "calls/step": e.count // iters,
                 "ms/step": getattr(e, key) / 1e3 / iters,
                 "% of kernel time": 100 * getattr(e, key) / total} for e in events[:top]]
    return total / 1e3 / iters, by_kind, top_rows, copy_rows, conv_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--mode", default="fp32",
                    help="fp32 | bf16 (autocast) | bf16-cl-compile (as unet_train.py)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--variant", default="difflab",
                    help="the model, named as unet_train.py's peers (e.g. difflab-nchw, "
                    "diffusers, difflab-fold-gncl-rr6): " + variant_help())
    ap.add_argument("--cudnn-benchmark", default="off",
                    help="comma list of on/off: profile each (cuDNN picks algorithms by timing)")
    ap.add_argument("--copies", action="store_true",
                    help="also list the data-moving operators (copy_, clone, _to_copy, cat...) "
                         "and the convolutions by input shape, with their kernels' device "
                         "time")
    args = ap.parse_args()
    try:
        variant = parse_variant(args.variant)
        check_mode(args.mode)
    except ValueError as e:
        ap.error(str(e))
    device = torch.device(args.device)
    cfg = preset_config(args.preset, device.type)
    torch.manual_seed(0)
    model = variant.build(cfg, device.type)
    flops = math_flops(model, cfg, args.batch)
    variant.apply(device.type)
    step, _ = make_step(model, args.batch, cfg, device, args.mode, variant)
    runs = []
    for bench in args.cudnn_benchmark.split(","):
        torch.backends.cudnn.benchmark = bench == "on" or "bench" in variant.flags
        for _ in range(3):  # warm: compilation, cuDNN's algorithm search, the allocator
            step()
        wall = min(wall_ms(step, device, max(5, args.iters)) for _ in range(3))
        kernel_ms, by_kind, top_rows, copy_rows, conv_rows = profile_once(
            step, device, args.iters, args.top, flops, args.copies)
        what = "kernel" if device.type == "cuda" else "CPU operator"
        print(f"\n{args.preset} batch {args.batch} {args.mode} {args.variant} on {device}, "
              f"cudnn.benchmark {bench}: wall {wall:.2f} ms/step, {what} time "
              f"{kernel_ms:.2f} ms/step"
              + (f" (device idle {100 * max(0.0, 1 - kernel_ms / wall):.0f} %)"
                 if device.type == "cuda" else ""))
        print_table(by_kind)
        print()
        print_table(top_rows)
        if copy_rows:
            print("\ndata-moving operators by input shape:")
            print_table(copy_rows)
        if conv_rows:  # (which convolutions are slow for their size: e.g. 3-channel ones)
            print("\nconvolutions by input shape:")
            print_table(conv_rows)
        runs.append({"cudnn_benchmark": bench, "wall_ms": wall, "kernel_ms": kernel_ms,
                     "by_kind": by_kind, "top": top_rows, "copies": copy_rows,
                     "convolutions": conv_rows})
    print("\nmath FLOPs per step (GFLOP): "
          + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in flops.items()))
    path = write_json("profile_step", {"machine": machine(), "preset": args.preset,
                                       "batch": args.batch, "mode": args.mode,
                                       "variant": args.variant,
                                       "math_flops": flops, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
