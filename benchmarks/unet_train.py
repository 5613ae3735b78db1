"""U-Net training throughput: difflab vs diffusers' UNet2DModel, same architecture, one run.

    python benchmarks/unet_train.py                          # CPU, the 'small' 28×28 preset
    python benchmarks/unet_train.py --preset ddpm-cifar10 --batch 128 --device cuda \
        --modes fp32,bf16,bf16-cl,bf16-cl-compile,bf16-cl-ro --compile-peers difflab

Modes: ``fp32`` | ``bf16`` (autocast), then ``-cl`` channels_last, ``-compile`` torch.compile
(default mode), ``-ro`` torch.compile(mode="reduce-overhead"), i.e. CUDA graphs.

Both models are built from the same config (parameter counts printed; they are equal), trained
with AdamW on an ε-MSE loss at random timesteps; runs are interleaved (A, B, A, B, ...) and the
median is reported. Achieved FLOP/s (counted with torch.utils.flop_counter) is compared with the
measured matmul ceiling of the machine. Writes benchmarks/out/unet_train.json.

Every peer's gradients are checked before it is timed: its first forward + backward (the one
that compiles it) on weights moved off the zero-initialised output layers, against eager float32
of the same model (difflab or diffusers) on the same weights and batch, computed without cuDNN
and TF32 (on a GPU the error of cuDNN's own float32 gradients is printed too) ("grad err":
relative L2 error over all parameters), with dropout's masks from one seed. The tolerance is
5 %, or 1.5× the error eager bf16 autocast itself makes on difflab's model where that is larger
("tol": 0.4 % on the DDPM-CIFAR-10 preset at batch 128 on an H100); for a compiled peer of a
model with dropout, whose masks are inductor's, 1.5× the error eager makes with other masks
(5.4 % on that preset; GradientCheck). A peer above it is marked WRONG:
its speed is not a result (on an H100 the compiled layout-keeping GroupNorm, -gncl, gave 75 %;
RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Variant,
    machine,
    matmul_ceiling,
    median,
    parse_variant,
    preset_config,
    print_table,
    report_failure,
    sync,
    time_fn,
    variant_help,
    write_json,
)

from difflab.models.unet import PRESETS, UNet2DModel, UNetConfig  # noqa: E402
from difflab.nn.fused import fused_group_norm_available  # noqa: E402
from difflab.perf import keep_freed_memory  # noqa: E402
from difflab.training.loop import compile_kwargs  # noqa: E402
from difflab.training.precision import BF16Weights  # noqa: E402


def diffusers_unet(cfg: UNetConfig) -> torch.nn.Module:
    from diffusers import UNet2DModel as DUNet

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return DUNet(sample_size=cfg.sample_size, in_channels=cfg.in_channels,
                 out_channels=cfg.out_channels, block_out_channels=cfg.block_out_channels,
                 layers_per_block=cfg.layers_per_block, down_block_types=down,
                 up_block_types=up, attention_head_dim=cfg.attention_head_dim,
                 norm_num_groups=cfg.norm_num_groups, dropout=cfg.dropout,
                 add_attention=cfg.mid_attention)


MODE_PATTERN = re.compile(r"(fp32|bf16)(-cl)?(-compile|-ro)?")  # e.g. bf16-cl-ro


def check_mode(mode: str) -> str:
    """A mode is fp32|bf16 [-cl: channels-last] [-compile | -ro: compiled with CUDA graphs];
    anything else (fp16, a typo) is an error, not a silently float32 or eager row."""
    if not MODE_PATTERN.fullmatch(mode):
        raise ValueError(f"unknown mode {mode!r}: fp32 or bf16, then optionally -cl, then "
                         "optionally -compile or -ro (e.g. bf16-cl-ro)")
    return mode


def is_compiled(mode: str) -> bool:
    """Whether a :func:`check_mode` mode runs torch.compile (-compile, or -ro with CUDA graphs)."""
    return mode.endswith(("-compile", "-ro"))


def make_step(model: torch.nn.Module, batch: int, cfg: UNetConfig, device: torch.device,
              mode: str, variant: Variant):
    """One training step of ``model`` (built by ``variant``) in ``mode``, with the variant's
    layout, inductor settings and bf16 weight copies (-w16)."""
    channels_last = variant.channels_last or "-cl" in mode
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    bf16 = mode.startswith("bf16")
    # -w16: bf16 weight copies kept between steps, float32 masters in AdamW (the training
    # loop's TrainConfig.bf16_weights; difflab.training.precision)
    w16 = BF16Weights(model) if "w16" in variant.flags and bf16 else None
    params = w16.float_params if w16 else model.parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # both peers alike
    fwd = model
    graphs = mode.endswith("-ro")
    if is_compiled(mode):
        if device.type == "cpu":  # difflab's channels-last GroupNorm kernel loaded before
            # tracing, as the training loop does: loaded later (by an eager reference), it
            # fails a guard and the step compiles a second time
            fused_group_norm_available()
        fwd = torch.compile(model, **compile_kwargs("reduce-overhead" if graphs else "default",
                                                    variant.inductor_options(device.type)))
    g = torch.Generator(device=device).manual_seed(0)
    size = cfg.sample_size
    x0 = torch.randn(batch, cfg.in_channels, size, size, device=device, generator=g)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    # (drawn like x0, then laid out: randn_like would fill a channels-last tensor in memory
    # order, other noise at each position than an NCHW peer's)
    noise = torch.randn(x0.shape, device=device, generator=g)
    if channels_last:
        noise = noise.contiguous(memory_format=torch.channels_last)

    def forward_backward() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fwd(x0 + noise, t).sample
            loss = torch.nn.functional.mse_loss(out.float(), noise)
        model.zero_grad(set_to_none=True)  # (with -w16 the masters' gradients are overwritten)
        loss.backward()

    def step() -> None:
        forward_backward()
        if w16:
            w16.grads_up()
        opt.step()
        if w16:
            w16.weights_down()

    def probe(seed: int = PROBE_SEED) -> dict[str, torch.Tensor]:
        """The gradients of one forward + backward in this mode (no update), float32 copies by
        parameter name (with -w16 those of the module's bf16 weights). Eager, the random
        numbers (dropout's masks) come from ``seed`` whatever ran before: every eager peer
        and the reference drop the same activations. (A compiled step draws its own, from
        inductor's generator: :class:`GradientCheck` allows for that.)"""
        with contextlib.ExitStack() as stack:
            if fwd is model:
                stack.enter_context(torch.random.fork_rng(
                    devices=[device] if device.type == "cuda" else []))
                torch.manual_seed(seed)
            forward_backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    step.bf16_weights = w16  # for the test that compares it with autocast's casts
    step.probe = probe
    return step, model


# The seed of a gradient probe's random numbers. Before the sixteenth session the masks came
# from wherever the global generator stood, so only the first peer probed dropped the
# reference's activations: on the DDPM-CIFAR-10 preset (dropout 0.1) every later peer, eager
# too, was 5.4 % "off" (the thirteenth session blamed cuDNN for it, pytorch/pytorch#150700).
PROBE_SEED = 1234
GRAD_TOLERANCE = 0.05  # relative L2 error: the least a peer is allowed
FLOOR_FACTOR = 1.5  # ... or this times eager bf16 autocast's own error, where that is larger


def grad_tolerance(floor: float) -> float:
    """The gradient error above which a peer is wrong: :data:`GRAD_TOLERANCE`, or
    :data:`FLOOR_FACTOR` × ``floor`` (the error a right peer makes on the same weights and batch
    anyway: eager bf16 autocast's rounding, ~1 % on small models, 0.4 % on the DDPM-CIFAR-10
    preset at batch 128 on an H100; other dropout masks, 5.4 % on that preset), whichever is
    larger."""
    return max(GRAD_TOLERANCE, FLOOR_FACTOR * floor)


def off_zero_init(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved by 0.02·N(0, 1) (seeded, the same for every peer of one architecture):
    a zero-initialised output layer would leave every other gradient zero, and a gradient check
    blind. Speed does not depend on the values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.02)
    return model


def grad_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over all parameters together; a missing gradient counts as zero."""
    num = sum(float(d.pow(2).sum()) for d in _differences(got, want).values())
    den = sum(float(w.pow(2).sum()) for w in want.values())
    return (num / den) ** 0.5 if den else float("nan")


def gradient_errors(got: dict[str, torch.Tensor],
                    want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each parameter's gradient error relative to its own size (with a floor of 0.2 % of the
    whole gradient's, for gradients that are ~0 in exact arithmetic), by name."""
    floor = 2e-3 * sum(float(w.pow(2).sum()) for w in want.values()) ** 0.5
    return {n: float(d.norm()) / (float(want[n].norm()) + floor)
            for n, d in _differences(got, want).items()}


def worst_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                    k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` parameters whose gradients are furthest off (:func:`gradient_errors`)."""
    return sorted(gradient_errors(got, want).items(), key=lambda kv: -kv[1])[:k]


def grads_wrong(err: float, tolerance: float = GRAD_TOLERANCE) -> bool:
    """A gradient error above ``tolerance`` (:func:`grad_tolerance`), or NaN."""
    return not err <= tolerance


def _differences(got: dict[str, torch.Tensor],
                 want: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: got.get(n, torch.zeros_like(w)) - w for n, w in want.items()}


def with_settings(step, variant: Variant, device_type: str):
    """The step with its process-wide switches set the variant's way on every call
    (``Variant.apply``): ``torch.backends.cudnn.benchmark`` is read at each convolution (a
    captured CUDA graph keeps what it recorded), difflab's GroupNorm switches while tracing
    (torch.compile guards on them and compiles each setting apart)."""
    def run() -> None:
        variant.apply(device_type)
        step()

    def probe(seed: int = PROBE_SEED) -> dict[str, torch.Tensor]:
        variant.apply(device_type)
        return step.probe(seed)

    run.probe = probe
    return run


def reference_grads(cfg: UNetConfig, batch: int, device: torch.device, base: str = "difflab",
                    mode: str = "fp32", exact: bool = False,
                    seed: int = PROBE_SEED) -> dict[str, torch.Tensor]:
    """The gradients of eager ``base`` (difflab or diffusers, as it runs by default) in ``mode``
    on the weights and batch each peer starts from (same seed, :func:`off_zero_init`,
    make_step's inputs); ``exact``: with :func:`exact_kernels` — in float32 what every peer of
    that base is checked against; ``seed``: of the random numbers (dropout's masks)."""
    torch.manual_seed(0)
    variant = parse_variant(base)
    step, _ = make_step(off_zero_init(variant.build(cfg, device.type)), batch, cfg, device,
                        mode, variant)
    with exact_kernels() if exact else contextlib.nullcontext():
        return with_settings(step, variant, device.type).probe(seed)


@contextlib.contextmanager
def exact_kernels():
    """cuDNN off (PyTorch's own convolutions, im2col + matrix products) and TF32 off: a float32
    reference that does not rest on cuDNN's kernels, reported far off on H100s
    (pytorch/pytorch#150700; the thirteenth session's 5.4 % and NCHW 48 %, blamed on it, were
    other dropout masks and noise: PROBE_SEED, :func:`reference_name`). On the sixteenth
    session's H100 cuDNN's float32 gradients were 0.1 % from this reference. Nothing changes
    on a CPU. The matmul setting is written only if TF32 is on: PyTorch's default, "none", is
    not the "ieee" that ``allow_tf32 = False`` writes, inductor's graph cache key reads it, and
    every compile after a reference missed the cache the warm-ups had filled."""
    matmul = torch.backends.cuda.matmul
    tf32 = matmul.allow_tf32
    if tf32:
        matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=False):
            yield
    finally:
        if tf32:
            matmul.allow_tf32 = True


def reference_name(peer: str, mode: str) -> str:
    """The model a peer's gradients are checked against: its base (difflab or diffusers) in
    the peer's memory layout — dropout draws its masks in memory order, so an NCHW and a
    channels-last run drop other activations."""
    v = parse_variant(peer)
    channels_last = v.channels_last or "-cl" in mode
    if channels_last == parse_variant(v.base).channels_last:
        return v.base
    return v.base + ("-nchw" if v.base == "difflab" else "-cl")


class GradientCheck:
    """Each peer's gradients against eager float32 of its base model (without cuDNN and TF32:
    :func:`exact_kernels`), with the tolerance :func:`grad_tolerance` gives for what the peer
    cannot help: its precision's rounding (eager bf16 autocast's own error) and, for a
    compiled peer of a model with dropout, other dropout masks (inductor draws its own random
    numbers; the floor is then eager's error with masks from another seed, ~5 % on the
    DDPM-CIFAR-10 preset: such a check catches a broken backward, not a 1 % one — the
    dropout-free CUDA tests do that). The references and floors are computed once, when first
    needed."""

    def __init__(self, cfg: UNetConfig, batch: int, device: torch.device):
        self.cfg, self.batch, self.device = cfg, batch, device
        self.references: dict[str, dict[str, torch.Tensor]] = {}
        self.floors: dict[tuple[str, bool], float] = {("fp32", False): 0.0}
        self.notes: dict[str, float] = {}  # the reference kernels' own errors, for the JSON

    def reference(self, base: str) -> dict[str, torch.Tensor]:
        if base not in self.references:
            self.references[base] = reference_grads(self.cfg, self.batch, self.device, base,
                                                    exact=True)
            if self.device.type == "cuda":  # how far cuDNN's own float32 gradients are
                cudnn = grad_error(reference_grads(self.cfg, self.batch, self.device, base),
                                   self.references[base])
                self.notes[f"{base} eager float32 with cuDNN"] = cudnn
                print(f"eager float32 {base} with cuDNN (TF32 convolutions) vs without: gradient "
                      f"error {cudnn:.3f}", flush=True)
        return self.references[base]

    def tolerance(self, mode: str) -> float:
        key = ("bf16" if mode.startswith("bf16") else "fp32",
               self.cfg.dropout > 0 and is_compiled(mode))
        if key not in self.floors:
            precision, other_masks = key
            own = reference_grads(self.cfg, self.batch, self.device, "difflab", precision,
                                  seed=PROBE_SEED + 1 if other_masks else PROBE_SEED)
            self.floors[key] = grad_error(own, self.reference("difflab"))
            label = f"eager {precision}" + (", other dropout masks," if other_masks else "")
            self.notes[f"difflab {label.strip(',')}"] = self.floors[key]
            print(f"{label} gradient error (difflab): {self.floors[key]:.3f}; {precision} "
                  f"{'compiled ' if other_masks else ''}peers above "
                  f"{grad_tolerance(self.floors[key]):.3f} are WRONG", flush=True)
        return grad_tolerance(self.floors[key])

    def __call__(self, peer: str, mode: str, grads: dict[str, torch.Tensor]) -> float:
        """The error of ``grads``; a wrong peer's furthest-off tensors are printed."""
        want = self.reference(reference_name(peer, mode))
        err = grad_error(grads, want)
        if grads_wrong(err, self.tolerance(mode)):  # which tensors, for the diagnosis
            print(f"{mode} {peer}: gradients furthest off: " + ", ".join(
                f"{n} {e:.2f}" for n, e in worst_gradients(grads, want)))
        return err


def grad_note(err: float | None, tolerance: float) -> str:
    if err is None:
        return ""
    return f"; grad err {err:.3f}" + (" WRONG GRADIENTS" if grads_wrong(err, tolerance) else "")


def step_flop_counter(model: torch.nn.Module, cfg: UNetConfig, batch: int) -> FlopCounterMode:
    """One training step (forward + backward) of the model, run on the meta device under a
    FlopCounterMode, which is returned (per-operator counts in ``get_flop_counts()``)."""
    with torch.device("meta"):
        model = copy.deepcopy(model).to("meta")
        x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        t = torch.randint(0, 1000, (batch,))
        with FlopCounterMode(display=False) as fc:
            model(x, t).sample.float().pow(2).mean().backward()
    return fc


def flops_per_step(model: torch.nn.Module, cfg: UNetConfig, batch: int) -> float:
    """FLOPs of one training step of the *plain* architecture (forward + backward), counted on
    the meta device: the textbook count both peers are measured against, so a cheaper
    algorithm for the same function (difflab's folded upsampling) shows as a higher rate, and
    work added for speed (-pad8's zero channels: no device-type switch applies on "meta")
    is not counted."""
    return float(step_flop_counter(model, cfg, batch).get_total_flops())


def warm_command(args: argparse.Namespace, mode: str, peer: str) -> list[str]:
    """The command line of one peer's warm-up (this script with ``--warm-only``)."""
    return [sys.executable, str(Path(__file__).resolve()), "--warm-only", "--preset",
            args.preset, "--batch", str(args.batch), "--device", args.device, "--modes", mode,
            "--peers", peer, "--compile-peers", peer]


def warm_compiles(args: argparse.Namespace, pairs: list[tuple[str, str]], jobs: int,
                  timeout: float = 300.0, command=warm_command) -> None:
    """Compile each (mode, peer) of ``pairs`` in a subprocess of its own, ``jobs`` at a time
    (``--warm-only``: the peer's first forward + backward, nothing timed); those still running
    after ``timeout`` seconds are stopped. Inductor's on-disk caches (FX graph, AOTAutograd,
    Triton kernels; cross-process by design) then make each peer's compile in this process
    short, and the compiles themselves overlap. On a 16-core GPU machine one compile took
    55-125 s, much of it single-threaded (dynamo, AOTAutograd, inductor's lowering and code
    generation: a peer whose kernels were mostly cached already still took 56 s). On this
    2-core CPU (where inductor's C++ compiles use both cores already, so that side by side
    does not pay) a warm-up of the small preset's step took 76 s cold and 15 s again in another
    process, every graph from the cache (RESULTS.md, nineteenth session). A warm-up that fails
    is reported in one line: the peer then compiles here as before (and fails here, if it
    must, in its own row).

    The warm-ups ran their kernels side by side, so the block sizes inductor picked by timing
    candidates on the GPU (its autotuning, kept as ``*.best_config`` files beside the kernels)
    were timed on a shared GPU: the ones they wrote are removed, and this process times those
    kernels again, alone, as a cold compile would."""
    t0, started = time.perf_counter(), time.time()
    pending, running = list(pairs), []
    while pending or running:
        while pending and len(running) < jobs:
            mode, peer = pending.pop(0)
            log = tempfile.TemporaryFile()
            running.append((mode, peer, log, time.perf_counter(), subprocess.Popen(
                command(args, mode, peer), stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(0.2)
        late = time.perf_counter() - t0 > timeout
        for item in [r for r in running if late or r[4].poll() is not None]:
            running.remove(item)
            mode, peer, log, start, proc = item
            stopped = proc.poll() is None  # past the time allowed: it compiles here
            if stopped:
                proc.kill()
                proc.wait()
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            log.close()
            errors = [ln for ln in lines if re.match(r"\w+(Error|Exception|Failed)\b", ln)]
            lines = errors or lines  # (the exception's line, not dynamo's advice after it)
            took = f"{time.perf_counter() - start:.1f} s"
            outcome = f"compiled in a subprocess in {took}" if proc.returncode == 0 else (
                f"warm-up STOPPED after {took} (the warm-ups' {timeout:.0f} s were up)"
                if stopped else
                f"warm-up FAILED after {took} (exit {proc.returncode}: "
                f"{lines[-1] if lines else ''})") + "; it compiles here"
            print(f"{mode} {peer}: {outcome}", flush=True)
        if late:
            pending.clear()
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    tuned = [f for f in Path(cache_dir()).rglob("*.best_config")
             if f.stat().st_mtime >= started - 1]
    for f in tuned:
        f.unlink(missing_ok=True)
    print(f"{len(pairs)} compiles, {jobs} at a time: {time.perf_counter() - t0:.1f} s "
          f"({len(tuned)} autotuning results they timed side by side removed)", flush=True)


def graph_cache_counts() -> tuple[int, int]:
    """Inductor's FX graph cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def warm_only(args: argparse.Namespace, cfg: UNetConfig, device: torch.device) -> None:
    """``--warm-only``: one peer's first forward + backward in one compiled mode, as
    :func:`main` runs it (same model, weights, batch and switches), so that inductor's caches
    hold what that run will compile."""
    torch.manual_seed(0)
    variant = parse_variant(args.peers)
    step, _ = make_step(off_zero_init(variant.build(cfg, device.type)), args.batch, cfg, device,
                        args.modes, variant)
    with_settings(step, variant, device.type).probe()
    sync(device)
    hits, misses = graph_cache_counts()
    print(f"{hits} graphs from inductor's cache, {misses} compiled")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="fp32", help="comma list: fp32, bf16, bf16-cl-compile")
    ap.add_argument("--peers", default="difflab,difflab-nchw,diffusers,diffusers-cl",
                    help="comma list of difflab or diffusers with suffixes in any order (e.g. "
                    "difflab-fold-gncl-rr6): " + variant_help())
    ap.add_argument("--compile-peers", default="difflab,diffusers",
                    help="peers that also run the compiled modes (compiling costs minutes)")
    ap.add_argument("--allocator", default="keep", choices=["keep", "default"],
                    help="keep: glibc keeps freed activation buffers, as `difflab train` sets "
                    "it (difflab.perf.keep_freed_memory; process-wide, so for every peer)")
    ap.add_argument("--warm-compiles", type=int, default=0, metavar="N",
                    help="first compile the compiled peers in subprocesses, N at a time "
                    "(inductor's on-disk caches then make each compile here short); 0: off")
    ap.add_argument("--warm-timeout", type=float, default=300.0, metavar="S",
                    help="warm-ups still running after S seconds are stopped (their peers "
                    "then compile in this process)")
    ap.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.allocator == "keep" and not keep_freed_memory():
        args.allocator = "default (keep needs glibc)"
    try:
        for peer in args.peers.split(","):
            parse_variant(peer)
        for mode in args.modes.split(","):
            check_mode(mode)
    except ValueError as e:
        ap.error(str(e))
    device = torch.device(args.device)
    cfg = preset_config(args.preset, device.type)
    if args.warm_only:
        if "," in args.modes + args.peers or not is_compiled(args.modes):
            ap.error("--warm-only takes one compiled mode and one peer")
        warm_only(args, cfg, device)
        return

    peak = {"fp32": matmul_ceiling(device, torch.float32),
            "bf16": matmul_ceiling(device, torch.bfloat16)}
    torch.manual_seed(0)
    flops = flops_per_step(UNet2DModel(cfg), cfg, args.batch)
    if args.warm_compiles > 0:  # (after the matmul ceiling: the compiles use the GPU too)
        warm_compiles(args, [(m, p) for m in args.modes.split(",") if is_compiled(m)
                             for p in args.peers.split(",") if p in args.compile_peers.split(",")],
                      args.warm_compiles, args.warm_timeout)
    rows, results, check = [], {}, GradientCheck(cfg, args.batch, device)
    for mode in args.modes.split(","):
        ceiling = peak["bf16" if mode.startswith("bf16") else "fp32"]
        steps = {}
        for peer in args.peers.split(","):
            if is_compiled(mode) and \
                    peer not in args.compile_peers.split(","):
                continue
            torch.manual_seed(0)
            variant = parse_variant(peer)
            try:  # e.g. diffusers not installed: the other peers still run
                model = variant.build(cfg, device.type)
            except ImportError as e:
                report_failure(f"{mode} {peer}", e)
                continue
            params = sum(p.numel() for p in model.parameters())
            step, _ = make_step(off_zero_init(model), args.batch, cfg, device, mode, variant)
            steps[peer] = (with_settings(step, variant, device.type), params)
        errors = {}
        for peer, (step, _) in list(steps.items()):  # compile (or warm) each peer first, so
            # one that fails to compile is reported and dropped rather than ending the run
            t0, cached = time.perf_counter(), graph_cache_counts()
            try:
                grads = step.probe()  # its gradients first (this call compiles)
                errors[peer] = check(peer, mode, grads)
                del grads
                step()
                sync(device)
            except Exception as e:  # noqa: BLE001 - a failed candidate is a result too
                report_failure(f"{mode} {peer}", e)
                del steps[peer]
                continue
            first = time.perf_counter() - t0
            hits, misses = (b - a for a, b in zip(cached, graph_cache_counts()))
            cache_note = f" ({hits} graphs from inductor's cache, {misses} compiled)" \
                if is_compiled(mode) else ""
            sec = time_fn(step, device, iters=args.iters, warmup=1)  # a first reading at once:
            # if the run is cut off while later peers compile, this one has its number
            print(f"{mode} {peer}: first step {first:.1f} s{cache_note}, "
                  f"then {args.batch / sec:,.0f} img/s "
                  f"({100 * flops / sec / ceiling:.1f} % of the matmul peak; provisional)"
                  f"{grad_note(errors.get(peer), check.tolerance(mode))}", flush=True)
        times = {p: [] for p in steps}
        for _ in range(args.rounds):  # interleave so machine noise hits every peer alike
            for p, (step, _) in steps.items():
                times[p].append(time_fn(step, device, iters=args.iters, warmup=1))
        base = None
        for p, (_, params) in steps.items():  # "vs first": relative to the mode's first peer
            sec = median(times[p])
            ips = args.batch / sec
            base = base or ips
            achieved = flops / sec
            rows.append({"mode": mode, "model": p, "params": params, "img/s": ips,
                         "vs first": ips / base, "GFLOP/s": achieved / 1e9,
                         "% of matmul peak": 100 * achieved / ceiling,
                         "grad err": errors.get(p), "tol": check.tolerance(mode),
                         "grads": ("" if p not in errors else "WRONG"
                                   if grads_wrong(errors[p], check.tolerance(mode)) else "ok")})
            results[f"{mode}/{p}"] = rows[-1]
        print_table([r for r in rows if r["mode"] == mode])  # as it goes: a timeout keeps these
    ref = results.get("bf16/diffusers")  # diffusers' training recipe: bf16 autocast, eager
    for r in rows:
        r["vs diffusers bf16"] = r["img/s"] / ref["img/s"] if ref else None
    print(f"preset {args.preset}, batch {args.batch}, device {device}, allocator "
          f"{args.allocator}, "
          f"{flops / args.batch / 1e9:.2f} GFLOP per image per training step; matmul ceiling "
          f"fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print_table(rows)
    path = write_json("unet_train", {"machine": machine(), "preset": args.preset,
                                     "batch": args.batch, "flops_per_step": flops,
                                     "allocator": args.allocator,
                                     "peak_flops": peak, "gradient errors": check.notes,
                                     "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
