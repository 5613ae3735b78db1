"""Shared helpers of the benchmark scripts: timing, machine ceilings, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: torch.device, *, iters: int,
            warmup: int = 2) -> float:
    """Seconds per call of ``fn`` (after ``warmup`` calls), timed with the device synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured dense matmul rate in FLOP/s: the machine's practical ceiling.

    On CPU the same n×n×n product is also timed as a 1×1 convolution, which PyTorch hands to
    oneDNN rather than to BLAS; the faster of the two counts (on AMD CPUs MKL's sgemm reaches
    only about half of what oneDNN does, so the BLAS rate alone would understate the ceiling).
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    iters = 20 if device.type == "cuda" else 10
    sec = time_fn(lambda: a @ b, device, iters=iters)
    if device.type == "cpu":
        x = a[None, :, :, None].contiguous(memory_format=torch.channels_last)  # (1, n, n, 1)
        w = b[:, :, None, None].contiguous()
        sec = min(sec, time_fn(lambda: torch.nn.functional.conv2d(x, w), device, iters=iters))
    return 2 * n ** 3 / sec


def machine() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_json(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, object]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)


# A benchmark peer is named by a base model and suffixes that switch one thing each, in any
# order, starting from what difflab ships for the device: "difflab-gncl-ck" is difflab with
# the layout-keeping GroupNorm's hand-written backward and inductor's combo kernels.
# unet_train.py (--peers), train_loop.py (--configs) and profile_step.py (--variant) share these
# names. difflab before the thirteenth session's CUDA defaults is
# "difflab-gnpt-nofold-rr4-tpsplit-pc8", before the fourteenth's "difflab-gnops-tpsplit-pc8",
# before the sixteenth's "difflab-gnops".
VARIANT_SUFFIXES = {
    "nchw": "difflab in NCHW (it runs channels_last otherwise)",
    "cl": "diffusers in channels_last (it runs NCHW otherwise)",
    "fold": "nearest ×2 + 3×3 conv run as one folded transposed conv on this device, eager too "
            "(difflab.nn.Upsample.fold_on; the CPU always folds, CUDA when compiled)",
    "nofold": "the plain nearest ×2 + 3×3 conv on this device, compiled too",
    "gncl": "the layout-keeping GroupNorm when compiled, with its hand-written backward "
            "(fused.CHANNELS_LAST_GROUP_NORM_FORM = 'function'; wrong gradients on an H100)",
    "gnops": "the layout-keeping GroupNorm when compiled, in plain operators (autograd's "
             "backward; fused.COMPILED_CHANNELS_LAST_GROUP_NORM; CUDA's default in the "
             "thirteenth to fifteenth sessions)",
    "gnsum": "the layout-keeping GroupNorm when compiled, in plain operators, its statistics "
             "from per-channel sums (fused.CHANNELS_LAST_GROUP_NORM_FORM = 'sums', CUDA's "
             "default since the sixteenth session)",
    "gnoff": "conv1's bias and the time projection handed to the sums-form GroupNorm's "
             "statistics and shift instead of added to the convolution's output "
             "(fused.GROUP_NORM_TAKES_OFFSET)",
    "gnpt": "PyTorch's GroupNorm when compiled (CUDA's default before the thirteenth session)",
    "gn16": "GroupNorm kept in bf16 under CUDA autocast (fused.LOW_PRECISION_GPU_GROUP_NORM)",
    "bench": "torch.backends.cudnn.benchmark (cuDNN picks algorithms by timing them)",
    "rr6": "inductor's realize_reads_threshold=6 when compiled (CUDA's default)",
    "rr4": "inductor's realize_reads_threshold=4 when compiled (inductor's own default)",
    "ck": "inductor's combo_kernels (independent small kernels launched as one)",
    "cdt": "inductor's coordinate_descent_tuning (block sizes tuned per kernel)",
    "pc8": "inductor's max_pointwise_cat_inputs=8 (its own default; CUDA's is 32 since the "
           "fourteenth session: the 22 stacked time-projection weights and biases concatenated "
           "by one kernel each instead of one copy kernel per piece)",
    "nomix": "inductor's mix-order reductions off (triton.mix_order_reduction; Triton only; "
             "pytorch/pytorch#193061: wrong norm gradients in torch 2.10-2.11)",
    "tpsplit": "one SiLU and one small matrix product per residual block for the time "
               "projections on this device (CUDA's before the fourteenth session, the CPU's "
               "default; nn.blocks.GROUPED_TIME_PROJECTIONS)",
    "tpgroup": "all residual blocks' time projections in one matrix product on this device "
               "(CUDA's default since the fourteenth session)",
    "pad8": "convolutions whose channel counts are not multiples of 8 (the first and last, "
            "3 channels) run zero-padded to multiples of 8 on this device "
            "(nn.blocks.PADDED_NARROW_CONVOLUTIONS)",
    "nopad8": "those convolutions unpadded on this device",
    "rng": "functionalised random numbers when compiled (torch._functorch.config."
           "functionalize_rng_ops; CUDA only): dropout's masks drawn from a seed and offset, "
           "which lets the partitioner recompute them in the backward instead of storing "
           "22 masks",
    "w16": "bf16 copies of the conv/linear weights kept between steps, float32 masters in "
           "AdamW (TrainConfig.bf16_weights, difflab.training.precision)",
}
_INDUCTOR_SUFFIXES = {"rr6": {"realize_reads_threshold": 6},
                      "rr4": {"realize_reads_threshold": 4}, "ck": {"combo_kernels": True},
                      "cdt": {"coordinate_descent_tuning": True},
                      "pc8": {"max_pointwise_cat_inputs": 8},
                      "nomix": {"triton.mix_order_reduction": False}}
_DIFFLAB_ONLY = {"nchw", "fold", "nofold", "gncl", "gnops", "gnsum", "gnpt", "gn16", "tpsplit",
                 "tpgroup", "gnoff", "pad8", "nopad8", "rng"}
_EXCLUSIVE = ({"fold", "nofold"}, {"gncl", "gnops", "gnsum", "gnpt"}, {"rr6", "rr4"},
              {"tpsplit", "tpgroup"}, {"pad8", "nopad8"})
GROUP_NORM_FORMS = {"gncl": "function", "gnops": "ops", "gnsum": "sums"}


def _shipped() -> tuple[frozenset[str], str, dict[str, dict[str, object]], frozenset[str],
                        frozenset[str]]:
    """What difflab ships: the compiled GroupNorm's device types and form, the inductor
    settings per device type, the device types of the grouped time projections and of the
    padded narrow convolutions (read once, before a benchmark changes them)."""
    from difflab.nn import blocks, fused
    from difflab.training import loop

    return (fused.COMPILED_CHANNELS_LAST_GROUP_NORM, fused.CHANNELS_LAST_GROUP_NORM_FORM,
            {k: dict(v) for k, v in loop.COMPILE_OPTIONS.items()}, blocks.GROUPED_TIME_PROJECTIONS,
            getattr(blocks, "PADDED_NARROW_CONVOLUTIONS", frozenset()))  # (an older src: none)


_SHIPPED = _shipped()


@dataclass(frozen=True)
class Variant:
    """A peer name parsed (:func:`parse_variant`)."""

    name: str
    base: str  # "difflab" | "diffusers"
    flags: frozenset[str]

    @property
    def channels_last(self) -> bool:
        return "cl" in self.flags if self.base == "diffusers" else "nchw" not in self.flags

    def inductor_options(self, device_type: str) -> dict | None:
        """Inductor settings for torch.compile's ``options``: difflab's for the device type
        (``loop.COMPILE_OPTIONS``; diffusers gets inductor's own) with the suffixes' on top
        (None: the mode's own)."""
        shipped = _SHIPPED[2].get(device_type, {}) if self.base == "difflab" else {}
        options = {**shipped, **{k: v for f in sorted(self.flags & set(_INDUCTOR_SUFFIXES))
                                 for k, v in _INDUCTOR_SUFFIXES[f].items()}}
        if "rng" in self.flags:  # functorch's config is not among dynamo's guards: without a
            # setting of its own (inductor's default, restated) a -rng peer would reuse an
            # earlier peer's compiled step instead of compiling with functionalised rng
            options["fallback_random"] = False
        return options or None

    def build(self, cfg, device_type: str):
        """The model, float32 on the CPU, with the per-instance switches set (folding on
        ``device_type``)."""
        if self.base == "diffusers":
            from unet_train import diffusers_unet

            return diffusers_unet(cfg)
        from difflab.models.unet import UNet2DModel
        from difflab.nn import Upsample

        model = UNet2DModel(cfg)
        for m in model.modules():
            if isinstance(m, Upsample):  # per instance: compiled peers guard on it
                if "fold" in self.flags:
                    m.fold_on = Upsample.fold_on | {device_type}
                if "nofold" in self.flags:
                    m.fold_on = Upsample.fold_on - {device_type}
                    m.fold_compiled_on = Upsample.fold_compiled_on - {device_type}
        return model

    def apply(self, device_type: str) -> None:
        """Set the process-wide switches this variant runs with (call before each step when
        peers are interleaved: torch.compile guards on them and keeps one graph per setting)."""
        from difflab.nn import blocks, fused

        torch.backends.cudnn.benchmark = "bench" in self.flags
        import torch._functorch.config as functorch_config  # (read when a peer compiles)

        functorch_config.functionalize_rng_ops = "rng" in self.flags
        fused.LOW_PRECISION_GPU_GROUP_NORM = "gn16" in self.flags
        fused.GROUP_NORM_TAKES_OFFSET = "gnoff" in self.flags
        devices, form, _, grouped, padded = _SHIPPED
        if "tpsplit" in self.flags:
            grouped = grouped - {device_type}
        if "tpgroup" in self.flags:
            grouped = grouped | {device_type}
        blocks.GROUPED_TIME_PROJECTIONS = grouped
        if "pad8" in self.flags:
            padded = padded | {device_type}
        if "nopad8" in self.flags:
            padded = padded - {device_type}
        blocks.PADDED_NARROW_CONVOLUTIONS = padded
        for flag in self.flags & set(GROUP_NORM_FORMS):
            devices, form = devices | {device_type}, GROUP_NORM_FORMS[flag]
        if "gnpt" in self.flags:
            devices = devices - {device_type}
        fused.COMPILED_CHANNELS_LAST_GROUP_NORM, fused.CHANNELS_LAST_GROUP_NORM_FORM = devices, form


def parse_variant(name: str) -> Variant:
    """``base[-suffix...]`` → :class:`Variant`; an unknown base or suffix is a clear error."""
    base, *suffixes = name.split("-")
    if base not in ("difflab", "diffusers"):
        raise ValueError(f"peer {name!r}: the base must be difflab or diffusers")
    unknown = [s for s in suffixes if s not in VARIANT_SUFFIXES]
    if unknown:
        raise ValueError(f"peer {name!r}: unknown suffix {unknown[0]!r} (known: "
                         f"{', '.join(VARIANT_SUFFIXES)})")
    flags = frozenset(suffixes)
    if base == "diffusers" and flags & _DIFFLAB_ONLY:
        raise ValueError(f"peer {name!r}: {', '.join(sorted(flags & _DIFFLAB_ONLY))} "
                         f"only apply to difflab")
    for group in _EXCLUSIVE:
        if len(flags & group) > 1:
            raise ValueError(f"peer {name!r}: {' and '.join(sorted(flags & group))} exclude "
                             f"each other")
    if base == "difflab" and "cl" in flags:
        raise ValueError(f"peer {name!r}: difflab runs channels_last already (-nchw switches)")
    return Variant(name, base, flags)


def preset_config(preset: str, device_type: str):
    """The U-Net config of a preset; on a CPU the 'small' preset at 28×28 (Fashion-MNIST's size,
    what a CPU trains)."""
    from difflab.models.unet import PRESETS, UNetConfig

    extra = {"sample_size": 28} if device_type == "cpu" and preset == "small" else {}
    return UNetConfig(**{**PRESETS[preset], **extra})


def report_failure(label: str, e: BaseException) -> None:
    """One line for a peer or config that failed (the last line of a long compiler error), so
    the script goes on with the others."""
    lines = str(e).strip().splitlines()
    print(f"{label}: FAILED, {type(e).__name__}: {lines[-1] if lines else ''}", flush=True)


def variant_help() -> str:
    return "; ".join(f"-{k}: {v}" for k, v in VARIANT_SUFFIXES.items())
