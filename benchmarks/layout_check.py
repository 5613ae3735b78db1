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
``difflab.nn.fused.COMPILED_CHANNELS_LAST_GROUP_NORM``; ``gnops``: the same in plain operators,
its backward derived by autograd).

``--gpu-path`` also computes GroupNorm the way CUDA autocast does, in float32 (CPU autocast keeps
it in bf16), and with ``--inductor`` lets inductor decide what to store by its GPU rules
(``gpu_realize_rules``); variant ``gn16`` keeps GroupNorm in bf16
(``LOW_PRECISION_GPU_GROUP_NORM``), ``gncl-gn16`` both; a ``fold`` variant (or suffix:
``gncl-fold``) keeps the folded upsampling on the GPU path (``Upsample.fold_on``), ``w16``
holds the convolution and linear weights in bf16 (``difflab.training.precision``), ``tpsplit``
projects the time embedding block by block on the GPU path (``nn.blocks.GROUPED_TIME_PROJECTIONS``,
which ``--gpu-path`` otherwise sets as for CUDA: all blocks in one product).

``--inductor`` also compiles each variant with inductor and counts the activation buffers of the
generated code by layout: the traced strides do not show the layouts inductor picks itself
(``python benchmarks/layout_check.py --gpu-path --inductor``, ~4 min on a 2-core CPU). It also
sums the bytes each kernel of the generated code must read and write (inductor's own count:
every buffer once per kernel, the best case), split into the convolutions / matrix products /
attention (extern kernels) and the fused elementwise and reduction kernels, the memory-bound
rest. ``--extrapolate 128`` compiles again at twice ``--batch`` and extrapolates the bytes
linearly to batch 128, with the time they take at ``--bandwidth`` (default: an H100 SXM's
3.35 TB/s): the floor of the memory-bound part of a training step on that GPU; each fused
kernel is also extrapolated on its own and timed as no less than ``--kernel-us`` (a kernel's
fixed cost), which counts what the many small kernels (weight casts, per-channel statistics)
cost beyond their bytes.
Writes benchmarks/out/layout_check.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GROUP_NORM_FORMS, machine, print_table, write_json  # noqa: E402

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


def cuda_autocast_forms() -> list:
    """Patches that make CPU autocast compute GroupNorm as CUDA autocast does: in float32 (it is
    on CUDA autocast's float32 list), unless ``LOW_PRECISION_GPU_GROUP_NORM``."""
    group_norm = F.group_norm
    half = (torch.bfloat16, torch.float16)

    def widen(x: torch.Tensor) -> bool:
        return (x.dtype in half and torch.is_autocast_enabled(x.device.type)
                and not fused.LOW_PRECISION_GPU_GROUP_NORM)

    def cuda_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        if not widen(x):
            return group_norm(x, num_groups, weight, bias, eps)
        with torch.autocast(x.device.type, enabled=False):
            return group_norm(x.float(), num_groups, weight, bias, eps)

    return [mock.patch.object(F, "group_norm", cuda_group_norm),
            mock.patch.object(fused, "autocast_group_norm_dtype",
                              lambda x: torch.float32 if widen(x) else x.dtype)]


@contextmanager
def gpu_realize_rules():
    """Make inductor decide by its GPU rules on CPU tensors too: which elementwise results to
    store rather than recompute in each consumer (its CPU rules, the only users of
    ``ir.is_cpu`` in torch 2.13, store every reused result that computes an exp, sigmoid or
    tanh, and use other read and operation-count limits), and how to concatenate (its CPU
    lowering always copies input by input; a GPU's concatenates simple inputs in one pointwise
    kernel, up to ``max_pointwise_cat_inputs``): ``cat``'s lowering is rebuilt from its own
    source with the device test answered "not a CPU"."""
    import inspect
    import textwrap

    import torch._inductor.ir as inductor_ir
    import torch._inductor.lowering as lowering

    src = textwrap.dedent(inspect.getsource(lowering.cat.__wrapped__))
    src = src[src.index("def cat("):]
    device_test = 'cpu_device = inputs[0].get_device().type == "cpu"'
    if device_test not in src:
        raise RuntimeError("gpu_realize_rules: inductor's cat lowering changed; update the patch")
    namespace = dict(vars(lowering))
    exec(compile(src.replace(device_test, "cpu_device = False"), "<gpu cat>", "exec"), namespace)
    gpu_cat = lowering._register_lowering(
        torch.ops.aten.cat, namespace["cat"], broadcast=False,
        type_promotion_kind=lowering.ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT,
        convert_input_to_bool=False, lowering_dict={})
    with mock.patch.object(inductor_ir, "is_cpu", lambda _node: False), \
            mock.patch.dict(lowering.lowerings, {torch.ops.aten.cat: gpu_cat,
                                                 torch.ops.aten.cat.default: gpu_cat}):
        yield


# variant "fold": the GPU path with folded upsampling (difflab.nn.Upsample.fold_on) kept;
# "w16": the conv/linear weights held in bf16 (difflab.training.precision.BF16Weights)
_KEEP_FOLD = False
_BF16_WEIGHTS = False


def _model(cfg: UNetConfig, device: torch.device, fmt: torch.memory_format,
           gpu_path: bool) -> UNet2DModel:
    model = UNet2DModel(cfg).to(device, memory_format=fmt).train()
    if gpu_path and not _KEEP_FOLD:
        for m in model.modules():
            if isinstance(m, Upsample):
                m.fold_on = frozenset()
    if _BF16_WEIGHTS:
        from difflab.training.precision import BF16Weights

        BF16Weights(model)
    return model


def _diffusers_model(cfg: UNetConfig, device: torch.device, fmt: torch.memory_format,
                     _gpu_path: bool) -> torch.nn.Module:
    from unet_train import diffusers_unet

    return diffusers_unet(cfg).to(device, memory_format=fmt).train()


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


def _origin_ops(node) -> str:
    """The ATen operators a scheduler node (a kernel) was made of, by count."""
    origins = {o for sn in node.get_nodes() if sn.node is not None
               for o in sn.node.get_origins()}
    ops = Counter(getattr(o.target, "_opname", None) or str(o.target)
                  for o in origins if o.op == "call_function")
    return " ".join(f"{k}×{v}" if v > 1 else k for k, v in ops.most_common())


def _by_origin(kernels) -> dict[str, dict]:
    """Each kernel's bytes and operators under a name that another compile of the same step at
    another batch size gives the same kernel: the FX nodes it was made of (inductor may order
    the kernels differently), numbered where several kernels share them (a split reduction)."""
    out: dict[str, dict] = {}
    groups: dict[str, list] = {}
    for node, nbytes in kernels:
        names = sorted({o.name for sn in node.get_nodes() if sn.node is not None
                        for o in sn.node.get_origins()})
        groups.setdefault(hashlib.sha1(" ".join(names).encode()).hexdigest()[:16],
                          []).append((nbytes, _origin_ops(node)))
    for key, group in groups.items():
        for i, (nbytes, ops) in enumerate(sorted(group, key=lambda g: g[0])):
            out[f"{key}.{i}"] = {"bytes": nbytes, "ops": ops}
    return out


@contextmanager
def graph_metrics():
    """The metrics inductor logs per compiled graph (a list, one dict per graph, filled while
    compiling): it counts the bytes of each kernel only when its metrics log is on."""
    import torch._inductor.compile_fx as compile_fx

    metrics: list[dict] = []

    class Log:
        def isEnabledFor(self, _level) -> bool:
            return True

        def info(self, _msg, graph_metrics) -> None:
            metrics.append(graph_metrics)

    with mock.patch.object(compile_fx, "inductor_metrics_log", Log()):
        yield metrics


def split_kernels(graph: dict) -> tuple[list[int], list[tuple[object, int]]]:
    """A graph's metrics → the extern kernels' bytes and the generated kernels as (scheduler
    node, bytes): no "nop" nodes (a concatenation whose inputs are written in place by their
    producers launches nothing and moves no bytes). A CPU compile may merge several of these
    nodes into one C++ function; on a GPU each is a kernel."""
    from torch._inductor.scheduler import ExternKernelSchedulerNode, NopKernelSchedulerNode

    nodes = graph["nodes_num_elem"]  # (scheduler node, bytes // 4)
    extern = [4 * b for n, b in nodes if isinstance(n, ExternKernelSchedulerNode)]
    fused = [(n, 4 * b) for n, b in nodes
             if not isinstance(n, (ExternKernelSchedulerNode, NopKernelSchedulerNode))]
    return extern, fused


def inductor_buffers(cfg: UNetConfig, batch: int, device: torch.device, precision: str,
                     gpu_path: bool, options: dict | None = None,
                     top: int = 0) -> dict[str, dict]:
    """Compile the channels-last training step with inductor and count, in the code it
    generates (forward and backward), the activation buffers (batch × C × H × W, C and H·W > 1)
    it allocates, by layout and dtype, and the bytes its kernels move ("traffic"). The
    fake-tensor strides of the traced graph do not show where inductor picks its own layout: a
    buffer whose layout it may choose is laid out NCHW as soon as a reshape needs it
    contiguous, e.g. the (N, C, H·W) views of PyTorch's GroupNorm backward decomposition."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = _model(cfg, device, torch.channels_last, gpu_path)
    x, noise, t = _batch(cfg, batch, device, torch.channels_last)
    step = torch.compile(model, fullgraph=True)

    def run() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            out = step(x, t).sample
        (out.float() - noise).square().mean().backward()

    with ExitStack() as stack:
        metrics = stack.enter_context(graph_metrics())
        # no FX graph cache: a cache hit would skip the count
        stack.enter_context(inductor_config.patch(fx_graph_cache=False, **(options or {})))
        if gpu_path and device.type == "cpu":
            stack.enter_context(gpu_realize_rules())
        _, codes = run_and_get_code(run)
    torch._dynamo.reset()
    traffic = {}
    for name, m in zip(("forward", "backward"), metrics):
        extern, fused = split_kernels(m)
        kernels = _by_origin(fused)
        traffic[name] = {"bytes": m["num_bytes_accessed"], "extern bytes": sum(extern),
                         "fused kernels": len(fused), "extern kernels": len(extern),
                         "fused kernel bytes": kernels,
                         "largest fused": sorted(kernels.values(),
                                                 key=lambda k: -k["bytes"])[:top]}
    counts: dict[str, dict] = {"traffic": traffic}
    for name, code in zip(("forward", "backward"), codes):
        c: Counter[str] = Counter()
        for m in _ALLOC.finditer(code[code.find("def call("):]):
            size, stride = [int(v) for v in m.groups()[:4]], [int(v) for v in m.groups()[4:8]]
            if size[0] == batch and size[1] > 1 and size[2] * size[3] > 1:
                kind = "channels_last" if stride[1] == 1 else "nchw" if stride[3] == 1 else "other"
                c[f"{kind} {m.group(9)}"] += 1
        counts[name] = dict(sorted(c.items()))
    return counts


def extrapolate(small: dict, large: dict, batch: int, target: int) -> dict[str, float]:
    """Bytes per step at ``target`` from the counts at ``batch`` and ``2 * batch``: weights and
    optimizer state are fixed, activations grow linearly with the batch."""
    out = {}
    for key in ("bytes", "extern bytes"):
        at = [sum(r["traffic"][g][key] for g in ("forward", "backward")) for r in (small, large)]
        out[key] = at[0] + (at[1] - at[0]) * (target - batch) / batch
    out["fused bytes"] = out["bytes"] - out["extern bytes"]
    # each fused kernel on its own, matched across the two compiles by the FX nodes it was made
    # of, where both made the same kernels (the batch changed no fusion decision)
    per = [{(g, k): v for g in ("forward", "backward")
            for k, v in r["traffic"][g]["fused kernel bytes"].items()} for r in (small, large)]
    if per[0].keys() == per[1].keys():
        out["fused kernels"] = [
            {"bytes": v["bytes"] + (per[1][k]["bytes"] - v["bytes"]) * (target - batch) / batch,
             "ops": v["ops"], "graph": k[0]} for k, v in per[0].items()]
    else:
        out["fused kernels unmatched"] = len(per[0].keys() ^ per[1].keys())
    return out


def kernel_floor(kernel_bytes: list[float], bandwidth: float, min_s: float) -> dict[str, float]:
    """Time of the fused kernels if each takes its bytes at ``bandwidth`` but no less than
    ``min_s`` (a GPU kernel's fixed cost: start, a wave of blocks, drain — a few µs even inside
    a CUDA graph), and how much of it the small kernels take."""
    small = [b for b in kernel_bytes if b / bandwidth < min_s]
    return {"kernels": len(kernel_bytes), "below the floor": len(small),
            "ms": 1e3 * sum(max(b / bandwidth, min_s) for b in kernel_bytes),
            "ms of the small ones": 1e3 * min_s * len(small)}


@contextmanager
def _onednn_off():
    """oneDNN off for the block, back as it was after (``torch.backends.mkldnn.flags`` would
    also set oneDNN's TF32 switch, which warns on CPUs)."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


LAYOUT_WORDS = frozenset({"difflab", "plain", "diffusers", "fold", "w16", "tpsplit", "gn16",
                          "gnoff"})


def check_variant(variant: str) -> str:
    """A --variants entry is dash-joined words of :data:`LAYOUT_WORDS` and GroupNorm forms;
    anything else (another script's suffix, a typo) is an error, not a plain difflab row."""
    unknown = [w for w in variant.split("-") if w not in LAYOUT_WORDS | set(GROUP_NORM_FORMS)]
    if unknown:
        raise ValueError(f"variant {variant!r}: unknown word(s) {unknown}; this script knows "
                         f"{sorted(LAYOUT_WORDS | set(GROUP_NORM_FORMS))}")
    return variant


def variant_patches(variant: str, device: torch.device, gpu_path: bool) -> list:
    """The patches (context managers) that make the model and switches a --variants entry
    names (``--gpu-path``: also the GPU's code path on a CPU; turns oneDNN off)."""
    patches = []
    if gpu_path:
        patches.append(_onednn_off())
        patches.append(mock.patch.object(fused, "_kernel_ready", lambda: False))
        if device.type == "cpu":
            patches += cuda_autocast_forms()
    if variant == "plain":
        patches += plain_forms()
    if variant == "diffusers":  # the peer, same configuration and layout
        patches.append(mock.patch.object(sys.modules[__name__], "_model", _diffusers_model))
    if "fold" in variant.split("-"):  # folded upsampling on the GPU path too
        patches.append(mock.patch.object(sys.modules[__name__], "_KEEP_FOLD", True))
    if "w16" in variant.split("-"):  # bf16 weights kept between steps
        patches.append(mock.patch.object(sys.modules[__name__], "_BF16_WEIGHTS", True))
    forms = [GROUP_NORM_FORMS[w] for w in variant.split("-") if w in GROUP_NORM_FORMS]
    form = forms[-1] if forms else None
    if form:  # the layout-keeping GroupNorm while compiling (gncl: its hand-written backward;
        # gnops: in plain operators, autograd's backward; gnsum: the same with per-channel sums
        # for the statistics)
        patches.append(mock.patch.object(
            fused, "COMPILED_CHANNELS_LAST_GROUP_NORM", frozenset({device.type})))
        patches.append(mock.patch.object(fused, "CHANNELS_LAST_GROUP_NORM_FORM", form))
    if gpu_path:  # the time projections as CUDA does them (in one product), unless tpsplit
        patches.append(mock.patch.object(
            blocks, "GROUPED_TIME_PROJECTIONS",
            frozenset() if "tpsplit" in variant.split("-") else frozenset({device.type})))
    # conv1's bias and time projection handed to the sums-form GroupNorm, or added to its output
    patches.append(mock.patch.object(fused, "GROUP_NORM_TAKES_OFFSET",
                                     "gnoff" in variant.split("-")))
    if "gn16" in variant.split("-"):  # GroupNorm in bf16 under CUDA autocast
        patches.append(mock.patch.object(fused, "LOW_PRECISION_GPU_GROUP_NORM", True))
    return patches


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
                    "gncl: with the layout-keeping GroupNorm of compiled models (gnops: the same "
                    "in plain operators, autograd's backward); gn16: GroupNorm "
                    "in bf16 under CUDA autocast; gncl-gn16: both; fold (also as a suffix, "
                    "e.g. gncl-fold): the folded upsampling kept on the GPU path; w16 (also as a "
                    "suffix): conv/linear weights held in bf16; tpsplit (suffix): one small "
                    "product per block's time projection; diffusers: its UNet2DModel, "
                    "same configuration")
    ap.add_argument("--inductor", action="store_true",
                    help="also compile each variant with inductor (minutes on a CPU) and count "
                    "the activation buffers of its generated code by layout and its bytes moved")
    ap.add_argument("--extrapolate", type=int, default=None, metavar="BATCH",
                    help="with --inductor: compile again at twice --batch and extrapolate the "
                    "bytes moved per step to this batch")
    ap.add_argument("--inductor-config", action="append", default=[], metavar="KEY=VALUE",
                    help="an inductor setting for the compiles of --inductor, e.g. "
                    "realize_reads_threshold=6 (repeatable)")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help="with --inductor: list the N fused kernels that move the most bytes, "
                    "forward and backward, with the operators they were made of")
    ap.add_argument("--bandwidth", type=float, default=3.35e12,
                    help="bytes/s for the time the extrapolated bytes take (default: H100 SXM)")
    ap.add_argument("--kernel-us", type=float, default=2.5,
                    help="with --extrapolate: the least time a kernel takes, for the time of "
                    "the fused kernels one by one (default 2.5 µs, an assumption for a kernel "
                    "inside a CUDA graph on an H100)")
    args = ap.parse_args()
    try:
        for variant in args.variants.split(","):
            check_variant(variant)
    except ValueError as e:
        ap.error(str(e))
    if args.extrapolate and not args.inductor:
        ap.error("--extrapolate needs --inductor")
    options = {}
    for item in args.inductor_config:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--inductor-config {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)  # numbers, true/false
        except ValueError:
            options[key] = value
    device = torch.device(args.device)
    cfg = UNetConfig(**PRESETS[args.preset])
    if args.size:
        cfg = UNetConfig(**{**PRESETS[args.preset], "sample_size": args.size})

    rows = []
    for variant in args.variants.split(","):
        with ExitStack() as stack:
            for patch in variant_patches(variant, device, args.gpu_path):
                stack.enter_context(patch)
            res = classify(cfg, args.batch, device, args.precision, args.layout == "channels_last",
                           args.gpu_path)
            if args.inductor:
                res["inductor buffers"] = inductor_buffers(cfg, args.batch, device,
                                                           args.precision, args.gpu_path, options,
                                                           args.top)
                if args.extrapolate:
                    twice = inductor_buffers(cfg, 2 * args.batch, device, args.precision,
                                             args.gpu_path, options)
                    res["traffic at twice the batch"] = twice["traffic"]
                    res["extrapolated"] = extrapolate(res["inductor buffers"], twice,
                                                      args.batch, args.extrapolate)
        rows.append({"variant": variant, **res})
        print(f"{variant}: {res['convolution_backward']} convolution backwards, incoming "
              f"gradient {res['gradient layout']}, the others made by {res['made by'] or '-'}")
        if args.inductor:
            buffers = res["inductor buffers"]
            print("  inductor's activation buffers: " + str(
                {g: buffers[g] for g in ("forward", "backward")}))
            for g, t in buffers["traffic"].items():
                print(f"  {g}: {t['bytes'] / 1e6:.0f} MB, {t['extern bytes'] / 1e6:.0f} MB of "
                      f"them in {t['extern kernels']} extern kernels")
                for k in t["largest fused"]:
                    print(f"    {k['bytes'] / 1e6:8.1f} MB  {k['ops']}")
    table = []
    for r in rows:
        row = {"variant": r["variant"], "conv backwards": r["convolution_backward"],
               "gradient not in the input's layout": r["convolution_backward"]
               - r["gradient layout"].get("as its input", 0)}
        if args.inductor:
            buffers = r["inductor buffers"]
            for g in ("forward", "backward"):
                row[f"NCHW buffers, {g}"] = sum(v for k, v in buffers[g].items()
                                                if k.startswith("nchw"))
            for kind in ("fused kernels", "extern kernels"):
                row[kind] = sum(buffers["traffic"][g][kind] for g in ("forward", "backward"))
            row[f"MB moved at batch {args.batch}"] = round(sum(
                buffers["traffic"][g]["bytes"] for g in ("forward", "backward")) / 1e6)
        if args.extrapolate:
            e = r["extrapolated"]
            row[f"GB at batch {args.extrapolate}: all"] = round(e["bytes"] / 1e9, 2)
            row["extern"] = round(e["extern bytes"] / 1e9, 2)
            row["fused"] = round(e["fused bytes"] / 1e9, 2)
            row["fused, ms at bandwidth"] = round(1e3 * e["fused bytes"] / args.bandwidth, 2)
            if "fused kernels" in e:
                f = kernel_floor([k["bytes"] for k in e["fused kernels"]], args.bandwidth,
                                 args.kernel_us * 1e-6)
                e["kernel floor"] = f
                row[f"with ≥ {args.kernel_us:g} µs per kernel: ms"] = round(f["ms"], 2)
                row["kernels under it"] = f["below the floor"]
                row["their ms"] = round(f["ms of the small ones"], 2)
        table.append(row)
    print_table(table)
    for r in rows:  # what the kernels below the per-kernel floor are
        kernels = r.get("extrapolated", {}).get("fused kernels")
        if kernels:
            floor = args.kernel_us * 1e-6 * args.bandwidth
            small = Counter(f"{k['graph']}: {k['ops']}" for k in kernels if k["bytes"] < floor)
            r["extrapolated"]["kernels under the floor, by kind"] = dict(small.most_common())
            print(f"{r['variant']}: the {sum(small.values())} fused kernels under "
                  f"{floor / 1e6:.1f} MB at batch {args.extrapolate}, by kind:")
            for ops, n in small.most_common(args.top or 12):
                print(f"  {n:5d}  {ops}")
        elif r.get("extrapolated", {}).get("fused kernels unmatched"):
            print(f"{r['variant']}: kernels not matched across the two batches "
                  f"({r['extrapolated']['fused kernels unmatched']}): no per-kernel floor")
    print(f"preset {args.preset}, {cfg.sample_size}×{cfg.sample_size}, batch {args.batch}, "
          f"{args.precision}, {args.layout}, device {args.device}"
          + (" (GPU code path)" if args.gpu_path else "")
          + (f"; bandwidth {args.bandwidth / 1e12:g} TB/s" if args.extrapolate else "")
          + (f"; inductor {options}" if options else ""))
    for r in rows:  # the per-kernel lists of the two compiles: only their extrapolation is kept
        for traffic in (r.get("inductor buffers", {}).get("traffic", {}),
                        r.get("traffic at twice the batch", {})):
            for g in traffic.values():
                g.pop("fused kernel bytes", None)
        r.get("extrapolated", {}).pop("fused kernels", None)  # summed up by kind above
    path = write_json("layout_check", {"machine": machine(), "args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
