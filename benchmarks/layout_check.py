"""Which convolutions of a U-Net training step get their gradient in the wrong memory layout.

    python benchmarks/layout_check.py                       # DDPM-CIFAR-10 preset, CPU
    python benchmarks/layout_check.py --gpu-path            # the CUDA code path, traced on a CPU
    python benchmarks/layout_check.py --device cuda         # on a GPU

A convolution's backward (cuDNN's, oneDNN's) needs its incoming gradient dense and in its
input's memory format; where it is not, PyTorch copies it inside the backward (cuDNN's
``cudnn_convolution_backward`` starts with ``grad_output.to(input.suggest_memory_format())``).
The step is traced the way torch.compile traces it (AOTAutograd, fake tensors: the strides
inductor then keeps for the convolution backward's inputs) and each convolution backward is
classified by the layout of its incoming gradient and, where that differs from the input's, by
the operator that made the gradient.

``--gpu-path`` follows on a CPU the code path a GPU takes: oneDNN off, no C++ GroupNorm kernel,
nearest upsampling + 3×3 convolution instead of the folded transposed convolution.
``--variants`` compares difflab as it is with difflab without its layout-keeping gradients
(``dense_gradient`` and ``upsample_nearest2x`` replaced by their plain PyTorch forms) and with
the layout-keeping GroupNorm of compiled models (``gncl``:
``difflab.nn.fused.COMPILED_CHANNELS_LAST_GROUP_NORM``).

``--inductor`` also compiles each variant with inductor and counts the activation buffers of the
generated code by layout: the traced strides do not show the layouts inductor picks itself
(``python benchmarks/layout_check.py --gpu-path --inductor``, ~4 min on a 2-core CPU).
Writes benchmarks/out/layout_check.json.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

import difflab.models.unet as unet_module  # noqa: E402
import difflab.nn.blocks as blocks  # noqa: E402
from difflab.models.unet import PRESETS, UNet2DModel, UNetConfig  # noqa: E402
from difflab.nn import Upsample, fused  # noqa: E402


def layout(t: torch.Tensor) -> str:
    if t.dim() != 4:
        return "-"
    if t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "nchw" if t.is_contiguous() else "strided"


def plain_forms() -> list:
    """Patches that put back torch.cat's and F.interpolate's own gradients."""
    return [mock.patch.object(unet_module, "dense_gradient", lambda x: x),
            mock.patch.object(blocks, "upsample_nearest2x",
                              lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"))]


def _model(cfg: UNetConfig, device: torch.device, fmt: torch.memory_format,
           gpu_path: bool) -> UNet2DModel:
    model = UNet2DModel(cfg).to(device, memory_format=fmt).train()
    if gpu_path:
        for m in model.modules():
            if isinstance(m, Upsample):
                m.fold_on = frozenset()
    return model


def _batch(cfg: UNetConfig, batch: int, device: torch.device, fmt: torch.memory_format):
    size = cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, size, size, device=device).contiguous(memory_format=fmt)
    return x, torch.randn(x.shape, device=device), torch.randint(0, 1000, (batch,), device=device)


def classify(cfg: UNetConfig, batch: int, device: torch.device, precision: str,
             channels_last: bool, gpu_path: bool) -> dict[str, object]:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    graphs: dict[str, torch.fx.Graph] = {}

    def keep(name: str):
        def compiler(gm, _inputs):
            graphs[name] = gm.graph
            return make_boxed_func(gm.forward)
        return compiler

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _model(cfg, device, fmt, gpu_path)
    x, noise, t = _batch(cfg, batch, device, fmt)
    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                           decompositions=select_decomp_table())  # inductor's own
    torch._dynamo.reset()
    step = torch.compile(model, backend=backend, fullgraph=True)
    with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
        out = step(x, t).sample
    (out.float() - noise).square().mean().backward()
    torch._dynamo.reset()

    grads: Counter[str] = Counter()
    makers: Counter[str] = Counter()
    for n in graphs["backward"].nodes:
        if n.target is torch.ops.aten.convolution_backward.default:
            grad, inp = n.args[0].meta["val"], n.args[1].meta["val"]
            # one channel or one pixel: both layouts are the same memory
            same = layout(grad) == layout(inp) or min(grad.shape[1], grad[0, 0].numel()) == 1
            grads["as its input" if same else f"{layout(grad)}, input {layout(inp)}"] += 1
            if not same:
                makers[str(n.args[0].target).split(".")[-2]] += 1
    return {"convolution_backward": sum(grads.values()), "gradient layout": dict(grads),
            "made by": dict(makers)}


_ALLOC = re.compile(r"empty_strided_\w+\(\((\d+), (\d+), (\d+), (\d+)\), "
                    r"\((\d+), (\d+), (\d+), (\d+)\), torch\.(\w+)\)")


def inductor_buffers(cfg: UNetConfig, batch: int, device: torch.device, precision: str,
                     gpu_path: bool) -> dict[str, dict[str, int]]:
    """Compile the channels-last training step with inductor and count, in the code it
    generates (forward and backward), the activation buffers (batch × C × H × W, C and H·W > 1)
    it allocates, by layout and dtype. The fake-tensor strides of the traced graph do not show
    where inductor picks its own layout: a buffer whose layout it may choose is laid out NCHW as
    soon as a reshape needs it contiguous, e.g. the (N, C, H·W) views of PyTorch's GroupNorm
    backward decomposition."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = _model(cfg, device, torch.channels_last, gpu_path)
    x, noise, t = _batch(cfg, batch, device, torch.channels_last)
    step = torch.compile(model, fullgraph=True)

    def run() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            out = step(x, t).sample
        (out.float() - noise).square().mean().backward()

    _, codes = run_and_get_code(run)
    torch._dynamo.reset()
    counts = {}
    for name, code in zip(("forward", "backward"), codes):
        c: Counter[str] = Counter()
        for m in _ALLOC.finditer(code[code.find("def call("):]):
            size, stride = [int(v) for v in m.groups()[:4]], [int(v) for v in m.groups()[4:8]]
            if size[0] == batch and size[1] > 1 and size[2] * size[3] > 1:
                kind = "channels_last" if stride[1] == 1 else "nchw" if stride[3] == 1 else "other"
                c[f"{kind} {m.group(9)}"] += 1
        counts[name] = dict(sorted(c.items()))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ddpm-cifar10", choices=sorted(PRESETS))
    ap.add_argument("--size", type=int, default=None, help="image size (default: the preset's)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    ap.add_argument("--gpu-path", action="store_true",
                    help="on a CPU, follow the code path of a GPU (see the module docstring)")
    ap.add_argument("--variants", default="difflab,plain,gncl",
                    help="difflab: as it is; plain: torch.cat's and F.interpolate's own gradients; "
                    "gncl: with the layout-keeping GroupNorm of compiled models")
    ap.add_argument("--inductor", action="store_true",
                    help="also compile each variant with inductor (minutes on a CPU) and count "
                    "the activation buffers of its generated code by layout")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = UNetConfig(**PRESETS[args.preset])
    if args.size:
        cfg = UNetConfig(**{**PRESETS[args.preset], "sample_size": args.size})

    rows = []
    for variant in args.variants.split(","):
        with ExitStack() as stack:
            if args.gpu_path:
                torch.backends.mkldnn.enabled = False
                stack.enter_context(mock.patch.object(fused, "_kernel_ready", lambda: False))
            if variant == "plain":
                for patch in plain_forms():
                    stack.enter_context(patch)
            if variant == "gncl":  # the layout-keeping GroupNorm while compiling
                stack.enter_context(mock.patch.object(
                    fused, "COMPILED_CHANNELS_LAST_GROUP_NORM", frozenset({device.type})))
            res = classify(cfg, args.batch, device, args.precision, args.layout == "channels_last",
                           args.gpu_path)
            if args.inductor:
                res["inductor buffers"] = inductor_buffers(cfg, args.batch, device,
                                                           args.precision, args.gpu_path)
        rows.append({"variant": variant, **res})
        print(f"{variant}: {res['convolution_backward']} convolution backwards, incoming "
              f"gradient {res['gradient layout']}, the others made by {res['made by'] or '-'}")
        if args.inductor:
            print(f"  inductor's activation buffers: {res['inductor buffers']}")
    print_table([{"variant": r["variant"], "conv backwards": r["convolution_backward"],
                  "gradient not in the input's layout": r["convolution_backward"]
                  - r["gradient layout"].get("as its input", 0),
                  **({f"NCHW buffers, {g}": sum(v for k, v in r["inductor buffers"][g].items()
                                                if k.startswith("nchw"))
                      for g in ("forward", "backward")} if args.inductor else {})}
                 for r in rows])
    print(f"preset {args.preset}, {cfg.sample_size}×{cfg.sample_size}, batch {args.batch}, "
          f"{args.precision}, {args.layout}, device {args.device}"
          + (" (GPU code path)" if args.gpu_path else ""))
    path = write_json("layout_check", {"machine": machine(), "args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
