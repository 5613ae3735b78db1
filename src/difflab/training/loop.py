"""The one training loop of difflab, on Accelerate (CPU, one GPU, or many GPUs).

Any module with ``training_loss(batch, generator) -> {"loss": scalar, ...}`` trains here: AEs,
VAEs, the diffusion objective, CLIP. The loop owns: data order (seeded), AdamW with warm-up +
cosine LR, gradient clipping, EMA, the non-finite guard, the wall-clock budget, periodic atomic
checkpoints and exact resume. It knows nothing about what the model is.

Many processes (``accelerate launch``, ``torchrun``): ``batch_size`` is the *global* batch.
Every process draws the same global batch indices and holds a generator seeded the same way
(:class:`~difflab.rng.ShardedGenerator`); process r computes rows [r·B/P, (r+1)·B/P) and draws
its noise as its rows of the global draw (:mod:`difflab.rng`). DDP averages the gradients, so
the update is the one-process update on the same B rows, up to float summation order. Logged
losses are averaged over processes; only the main process writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab._tqdm import tqdm
from difflab.config import Config, check_choice, check_positive
from difflab.errors import CheckpointError, ConfigError, DifflabError
from difflab.nn.fused import fused_group_norm_available
from difflab.perf import deterministic_kernels, is_oom, memory_bytes, resolve_mixed_precision
from difflab.rng import BatchShard, ShardedGenerator
from difflab.training.budget import StepBudget
from difflab.training.checkpoint import (
    check_resume,
    data_fingerprint,
    load_training_state,
    recover_checkpoint,
    save_training_state,
)
from difflab.training.ema import EMA
from difflab.training.precision import BF16Weights
from difflab.training.processes import GracefulStop, launched_processes, multi_cpu


@dataclass(kw_only=True)
class TrainConfig(Config):
    batch_size: int = 128  # global batch size (split across processes)
    lr: float = 1e-3  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW decoupled weight decay, of ≥ 2-D parameters only
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas (β2 = 0.99 adapts faster in short runs)
    warmup_steps: int = 100  # linear LR warm-up from 0
    lr_schedule: str = "cosine"  # cosine (to min_lr_ratio·lr) | constant after warm-up
    min_lr_ratio: float = 0.05  # final LR of the cosine schedule, as a fraction of lr
    max_steps: int | None = None  # optimisation steps; None = decided by minutes or epochs
    minutes: float | None = None  # wall-clock budget: steps are calibrated after a few steps
    epochs: float | None = None  # passes over the data (used when max_steps, minutes unset)
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    ema_decay: float | None = 0.999  # EMA of weights for sampling/eval (None: no EMA)
    # no | bf16 | fp16 (GPU) | auto: bf16 on GPUs with bf16 and CPUs with bf16 dot products
    # (AVX-512 BF16 / AMX), float32 elsewhere (difflab.perf.resolve_mixed_precision)
    mixed_precision: str = "no"
    seed: int = 0  # seeds data order, noise and initialisation
    checkpoint_every: int = 0  # steps between training checkpoints (0: none by step count)
    # minutes between training checkpoints (0: none by time); with the checkpoint written at
    # the end and on Ctrl-C / SIGTERM, a killed run loses at most this much
    checkpoint_minutes: float = 5.0
    max_nonfinite: int = 20  # consecutive non-finite losses/gradients before the run stops
    # NHWC memory format: faster convolutions on CPU and GPU. On CPU under bf16 only with
    # difflab's channels-last GroupNorm kernel (difflab.nn.fused; else NCHW, benchmarks/RESULTS.md)
    channels_last: bool = True
    compile: str = "no"  # no | default | reduce-overhead | max-autotune: torch.compile the nets
    lazy_guard: bool | None = None  # non-finite guard without a host sync per step (None: on GPU)
    # bitwise-repeatable GPU training (deterministic cuDNN / no atomics; slower there; CPU
    # training is repeatable anyway): difflab.perf.deterministic_kernels
    deterministic: bool = False
    # bf16 copies of the conv/linear weights kept between steps instead of autocast casting
    # them every step (difflab.training.precision; the same numbers, bit for bit; one process,
    # bf16 only). None: wherever that holds (+4-6 % in the eager loop on an H100, the same
    # speed on this CPU); True insists (an error elsewhere), False never.
    bf16_weights: bool | None = None
    progress: bool = True  # tqdm progress bar

    def validate(self) -> None:
        check_positive("TrainConfig", "batch_size", self.batch_size)
        check_positive("TrainConfig", "lr", self.lr)
        check_positive("TrainConfig", "warmup_steps", self.warmup_steps, allow_zero=True)
        check_choice("TrainConfig", "lr_schedule", self.lr_schedule, ("cosine", "constant"))
        check_choice("TrainConfig", "mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("TrainConfig", "compile", self.compile, COMPILE_MODES)
        for name in ("max_steps", "minutes", "epochs"):
            v = getattr(self, name)
            if v is not None:
                check_positive("TrainConfig", name, v)
        check_positive("TrainConfig", "checkpoint_minutes", self.checkpoint_minutes,
                       allow_zero=True)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"TrainConfig.ema_decay={self.ema_decay} must be in (0, 1)")

    def resolve_steps(self, n_data: int) -> int | None:
        if self.max_steps is not None:
            return int(self.max_steps)
        if self.minutes is not None:
            return None  # calibrated while running
        epochs = self.epochs if self.epochs is not None else 10.0
        return max(1, math.ceil(epochs * n_data / self.batch_size))


@dataclass
class TrainResult:
    model: nn.Module  # the trained module (EMA weights when EMA is on)
    raw_model: nn.Module  # the last iterate
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", ...}
    skipped_nonfinite: int = 0
    is_main_process: bool = True  # False on the other processes of a multi-process run
    precision: str = "no"  # the mixed precision it trained in: no | bf16 | fp16 ("auto" resolved)
    processes: int = 1  # data-parallel processes that shared each global batch
    bf16_weights: bool = False  # whether it held bf16 weight copies (TrainConfig.bf16_weights)

    def final(self, key: str = "loss", n: int = 100) -> float | None:
        """The mean of ``key`` over the last ``n`` logged steps (None if it was never logged):
        the number a report gives as the final loss, not one noisy batch's."""
        vals = [h[key] for h in self.history[-n:] if key in h]
        return sum(vals) / len(vals) if vals else None


COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune")
MIXED_PRECISIONS = ("no", "bf16", "fp16", "auto")
# The sync-free guard reads its losses back (the host waits for the GPU) every this many steps.
READ_BACK_STEPS = 16


# Inductor settings added to every ``--compile`` mode, by device type (others: inductor's own).
# CUDA: realize_reads_threshold=6 (inductor's default is 4) lets a fused kernel recompute an
# elementwise result read up to 6 times instead of storing it — with the layout-keeping
# GroupNorm (difflab.nn.fused.COMPILED_CHANNELS_LAST_GROUP_NORM) 18 % fewer bytes in the fused
# kernels (counted on a CPU by inductor's GPU rules), and together with it and the folded
# upsampling the compiled step ran at 31 % of an H100's bf16 matmul rate instead of 21 %, its
# gradients as right as eager bf16's (benchmarks/RESULTS.md, "Tenth" to "Thirteenth session").
# max_pointwise_cat_inputs=32 (inductor's default 8): the U-Nets' stacked time-projection
# weights and biases (22 pieces each, difflab.nn.time_projections) concatenated by one kernel
# each instead of one copy kernel per piece, 42 fewer kernels per DDPM-CIFAR-10 step (counted
# by inductor's GPU rules, "Fourteenth session"); no other concatenation of difflab's models
# has more than 8 inputs.
COMPILE_OPTIONS: dict[str, dict[str, object]] = {
    "cuda": {"realize_reads_threshold": 6, "max_pointwise_cat_inputs": 32}}


def compile_kwargs(mode: str, extra: dict[str, object] | None = None) -> dict[str, object]:
    """``torch.compile``'s keyword arguments for a :data:`COMPILE_MODES` mode (not "no") with
    ``extra`` inductor settings on top of the mode's own (torch.compile takes a mode or
    options, not both)."""
    if not extra:
        return {"mode": None if mode == "default" else mode}
    from torch._inductor import list_mode_options

    return {"options": {**list_mode_options(mode), **extra}}


def _compile_networks(task: nn.Module, mode: str, device_type: str = "cpu") -> None:
    """``torch.compile`` each network inside the task in place (``Module.compile``): parameter
    names, checkpoints and the EMA copy are unchanged; the loss code around them stays eager.
    The mode's inductor settings get :data:`COMPILE_OPTIONS` for the device type on top."""
    kwargs = compile_kwargs(mode, COMPILE_OPTIONS.get(device_type))
    for child in task.children():
        if any(True for _ in child.parameters()):
            child.compile(**kwargs)


def lr_factor(step: int | torch.Tensor, cfg: TrainConfig, total: int) -> float | torch.Tensor:
    """Warm-up then cosine (or constant) multiplier of the peak LR at optimiser step ``step``:
    an int, or a float64 tensor on any device (the lazy guard's count of the updates made, no
    host sync), with the same arithmetic in the same order, so that both round alike."""
    tensor = torch.is_tensor(step)
    if cfg.lr_schedule == "constant" or total <= cfg.warmup_steps:
        after = torch.ones_like(step) if tensor else 1.0  # (a tensor stays on its device)
    else:
        p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        p = p.clamp(max=1.0) if tensor else min(1.0, p)
        cos = (torch.cos if tensor else math.cos)(math.pi * p)
        after = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + cos)
    if not cfg.warmup_steps:
        return after
    warm = (step + 1) / cfg.warmup_steps
    if tensor:
        return torch.where(step < cfg.warmup_steps, warm, after)
    return warm if step < cfg.warmup_steps else after


def train(task: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, *,
          out_dir: str | Path | None = None, resume: bool = False, desc: str = "train",
          on_checkpoint: Callable[[nn.Module, int], None] | None = None) -> TrainResult:
    """Optimise ``task.training_loss`` over (images, labels) under ``cfg``.

    images: (N, C, H, W) in [-1, 1]; labels: (N,). With ``out_dir`` a training checkpoint is
    written there (atomically) every ``cfg.checkpoint_every`` steps and every
    ``cfg.checkpoint_minutes`` minutes, at the end, and when Ctrl-C or SIGTERM stops the run
    (after the step in progress); with ``resume`` the run continues bit-exactly from the last
    one (on a GPU with ``cfg.deterministic``) — if the data and the settings are the run's own
    (:func:`check_resume`)."""
    with deterministic_kernels(cfg.deterministic), GracefulStop() as stop:
        try:
            return _train(task, images, labels, cfg, out_dir=out_dir, resume=resume, desc=desc,
                          on_checkpoint=on_checkpoint, stop=stop)
        except RuntimeError as e:  # PyTorch's alert names the operation: one line of it
            if not (cfg.deterministic and _NO_DETERMINISTIC in str(e)):
                raise
            op = str(e).split(_NO_DETERMINISTIC)[0].strip()
            raise DifflabError(f"deterministic training: {op} has no deterministic variant on "
                               "this device; train without --deterministic") from None


_NO_DETERMINISTIC = "does not have a deterministic implementation"


def _train(task: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, *,
           out_dir: str | Path | None, resume: bool, desc: str,
           on_checkpoint: Callable[[nn.Module, int], None] | None,
           stop: GracefulStop) -> TrainResult:
    from accelerate import Accelerator  # heavy import, only when training

    if len(images) == 0:
        raise DifflabError("cannot train on an empty data set")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # each run may ask for its own precision (process group kept)
    precision = resolve_mixed_precision(cfg.mixed_precision,
                                        "cuda" if torch.cuda.is_available() else "cpu")
    if cfg.mixed_precision == "fp16" and precision == "no":
        warnings.warn("fp16 autocast needs a CUDA GPU: training in float32 (bf16 autocast "
                      "works on CPUs)", stacklevel=2)
    acc = Accelerator(mixed_precision=precision, cpu=multi_cpu())
    dev = acc.device
    world, rank = acc.num_processes, acc.process_index
    if world != launched_processes():  # each process would train alone on the global batch
        raise DifflabError(f"launched as {launched_processes()} processes but Accelerate sees "
                           f"{world} ({acc.distributed_type}); check the launcher's settings")
    if cfg.batch_size % world:
        raise ConfigError(f"TrainConfig.batch_size={cfg.batch_size} must be divisible by the "
                          f"number of processes ({world})")
    bf16_weights_apply = precision == "bf16" and world == 1
    if cfg.bf16_weights and not bf16_weights_apply:
        raise ConfigError("TrainConfig.bf16_weights needs bf16 mixed precision and one process "
                          f"(here: {precision}, {world} process{'es' if world > 1 else ''})")
    local_bs = cfg.batch_size // world
    _check_batch_fits(images, local_bs, dev)
    torch.manual_seed(cfg.seed)  # initialisation of lazily-built parts, dropout
    # The same seed on every process: noise is drawn for the global batch, each keeps its rows.
    shard = BatchShard(rank * local_bs, (rank + 1) * local_bs, cfg.batch_size) if world > 1 \
        else None
    gen = ShardedGenerator(dev, shard)
    gen.manual_seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed)

    task = task.to(dev)
    # CPU bf16 stays NCHW unless difflab's channels-last GroupNorm kernel is there: PyTorch's
    # own is ~20× slower on channels-last bf16 tensors than on NCHW ones (difflab.nn.fused)
    channels_last = cfg.channels_last and not (
        dev.type == "cpu" and precision == "bf16" and not fused_group_norm_available())
    if channels_last:
        task = task.to(memory_format=torch.channels_last)
    # The sync-free guard: the finite check stays on the device, fused AdamW skips a bad update
    # itself (its found_inf input), and losses are read back every few steps. fp16's
    # GradScaler owns found_inf, so fp16 keeps the synchronous guard.
    lazy = (dev.type == "cuda" if cfg.lazy_guard is None else cfg.lazy_guard) and \
        precision != "fp16"
    ema = EMA(task, cfg.ema_decay) if cfg.ema_decay is not None else None  # float32 copy
    w16 = BF16Weights(task) if bf16_weights_apply and cfg.bf16_weights is not False else None
    # what the optimizer, the clipping, the guard and the EMA see: the module's parameters,
    # with bf16 weights the float32 masters in their place
    all_params = w16.float_params if w16 is not None else list(task.parameters())  # in order
    params = [p for p in all_params if p.requires_grad]
    # Fused AdamW (one kernel over all tensors; on CPU too, ~2.5× faster than the per-tensor
    # loop for the small U-Net); the lazy guard also needs it for its found_inf input.
    # Weight decay (if any) on matrices and kernels only: not on biases, norm gains or scalars
    # such as CLIP's logit scale (decaying those pulls a LayerNorm's gain and the temperature
    # towards 0 for no regularising gain; the usual practice since BERT and CLIP).
    groups: list[dict[str, Any]] | list[torch.Tensor] = params
    if cfg.weight_decay:
        groups = [{"params": [p for p in params if p.ndim >= 2]},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay, fused=True)
    # the module as the optimizer sees it: float32 (with bf16 weights: the masters in place)
    floats = w16.masters_in if w16 is not None else contextlib.nullcontext
    if cfg.compile != "no":
        _compile_networks(task, cfg.compile, dev.type)
    model, opt = acc.prepare(_LossModule(task), opt)
    images = images.to(dev)
    labels = labels.to(dev)

    n = len(images)
    data_print = data_fingerprint(images, labels)
    total = cfg.resolve_steps(n)
    step, history, skipped, consecutive = 0, [], 0, 0
    perm, pos = torch.randperm(n, generator=data_gen), 0
    elapsed_before = 0.0

    out_dir = Path(out_dir) if out_dir is not None else None
    if resume:
        if out_dir is None:
            raise DifflabError("--resume needs the run folder (--out)")
        if acc.is_main_process:  # a writer killed mid-checkpoint left temp folders behind
            recover_checkpoint(out_dir / "checkpoint")
        acc.wait_for_everyone()
        with floats():
            state = load_training_state(out_dir / "checkpoint", acc.unwrap_model(model).task,
                                        opt, ema)
        if w16 is not None:
            w16.weights_down()
        if state is None:
            raise DifflabError(f"{out_dir}: no training checkpoint to resume from")
        try:
            check_resume(state, cfg, data_print, out_dir)
            step, history, skipped = state["step"], state["history"], state["skipped"]
            total = state["total"]
            perm, pos = state["perm"], state["pos"]
            gen.set_state(state["gen"])
            data_gen.set_state(state["data_gen"])
            torch.set_rng_state(state["torch_rng"])
            elapsed_before = state["elapsed"]
        except KeyError as e:
            raise CheckpointError(f"{out_dir}/checkpoint/state.json: no {e} entry") from None

    pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []
    # The lazy guard's count of updates made (float64, on the device; ``step`` is the host's
    # count of steps taken until a read-back gives the skipped ones back; the LR schedule and
    # the EMA's warm-up follow it), and the dtype of the
    # LR tensor fused AdamW takes: float32 on a GPU (its kernel reads a float), float64
    # elsewhere (the same rounding as a Python float LR).
    made: torch.Tensor | None = None
    lr_dtype = torch.float32 if dev.type == "cuda" else torch.float64
    perm_on_dev: tuple[torch.Tensor, torch.Tensor] | None = None  # (perm, its copy on dev)

    def flush() -> None:
        """Read the lazily kept losses back (one host sync) into ``history``; count skips. A
        skipped step gives its step back, as with the synced guard: ``step`` counts the updates
        made (as ``made`` did on the device, which gave those steps their LR)."""
        nonlocal skipped, consecutive, step
        if not pending:
            return
        keys = list(pending[0][2])
        rows = [[x.float().reshape(()) for x in (ok, *(v[k] for k in keys))]
                for _, ok, v in pending]
        flat = torch.stack([torch.stack(r) for r in rows]).cpu().tolist()
        done = pending[0][0] - 1  # updates made before these steps
        for ok, *vals in flat:
            if ok:
                consecutive, done = 0, done + 1
                history.append({"step": done, **dict(zip(keys, vals))})
            else:
                skipped, consecutive = skipped + 1, consecutive + 1
                if consecutive >= cfg.max_nonfinite:
                    raise _nonfinite_error(consecutive, done, out_dir)
        back = step - done
        pending.clear()
        if back:
            step = done
            bar.update(-back)
            if ema is not None:  # its steps as made (its warm-up counted them on the device)
                ema.num_updates -= back
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}" if history else "nan")

    def save(final: bool = False) -> None:
        flush()
        if out_dir is None or not acc.is_main_process:
            return
        with floats():
            save_training_state(out_dir / "checkpoint", acc.unwrap_model(model).task, opt, ema,
                                dict(step=step, history=history, skipped=skipped, total=total,
                                     perm=perm, pos=pos, gen=gen.get_state(),
                                     data_gen=data_gen.get_state(),
                                     torch_rng=torch.get_rng_state(),
                                     elapsed=elapsed_before + time.perf_counter() - t0,
                                     config=cfg.to_dict(), data=data_print))
            if on_checkpoint is not None:
                on_checkpoint(ema.model if ema else acc.unwrap_model(model).task, step)

    def update(weight: torch.Tensor | None = None) -> None:
        """The optimizer step, the bf16 weight copies refreshed, the EMA step (``weight``: the
        lazy guard's 0/1 device tensor; its warm-up then counts ``made``, the updates made)."""
        opt.step()
        if w16 is not None:
            w16.weights_down()
        if ema is not None:
            ema.update(task, weight=weight, params=all_params, made=made)

    t0 = time.perf_counter()
    # A wall-clock budget becomes a step count (StepBudget); with several processes rank 0
    # decides, every few steps, and the others follow (no divergent stops).
    budget = StepBudget(cfg.minutes * 60) if cfg.max_steps is None and \
        cfg.minutes is not None else None
    sync_every = 5 if world > 1 else 1
    bar = tqdm(total=total, initial=step, desc=desc, disable=not (cfg.progress and
               acc.is_main_process), dynamic_ncols=True, leave=False)
    model.train()
    last_save = time.perf_counter()
    out_of_time = False
    while True:
        if total is not None and step >= total:
            flush()  # lazily kept skips give their steps back: the updates still to make
            if step >= total or out_of_time:
                break
        if pos + cfg.batch_size > n:  # new epoch: reshuffle (drop the ragged tail)
            perm, pos = torch.randperm(n, generator=data_gen), 0
            if cfg.batch_size > n:
                perm = perm.repeat(math.ceil(cfg.batch_size / n))
        if perm_on_dev is None or perm_on_dev[0] is not perm:  # once per epoch and resume
            perm_on_dev = (perm, perm.to(dev))
        # (sliced on the device: a host-to-GPU copy per step would wait for the GPU each step)
        idx = perm_on_dev[1][pos + rank * local_bs: pos + (rank + 1) * local_bs]
        pos += cfg.batch_size
        batch = {"images": images[idx], "labels": labels[idx]}
        if channels_last:
            batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
        if lazy:  # the LR of the updates made so far, counted on the device
            if made is None:
                made = torch.tensor(float(step), dtype=torch.float64, device=dev)
            lr = (cfg.lr * lr_factor(made, cfg, total or 10**9)).to(lr_dtype)
        else:
            lr = cfg.lr * lr_factor(step, cfg, total or 10**9)
        for g in opt.param_groups:
            g["lr"] = lr
        if cfg.compile == "reduce-overhead":  # a new CUDA-graph step: earlier outputs are done
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with acc.autocast():
                logs = model(batch, gen)
            loss = logs["loss"]
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            if w16 is not None:
                w16.grads_up()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            raise DifflabError(f"out of memory at batch size {cfg.batch_size} "
                               f"({local_bs} per process on {dev}); use a smaller "
                               "--batch-size") from None
        gnorm = acc.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
        if world > 1:  # the mean over processes is the global batch's value
            logs = dict(zip(logs, acc.reduce(torch.stack([v.detach().float()
                                                          for v in logs.values()]), "mean")))
            loss = logs["loss"]
        if lazy:
            ok = (torch.isfinite(loss) & torch.isfinite(gnorm)).reshape(())
            getattr(opt, "optimizer", opt).found_inf = (~ok).float()
            update(weight=ok)
            made += ok
            step += 1
            pending.append((step, ok, {k: v.detach().float() for k, v in logs.items()}))
            if len(pending) >= READ_BACK_STEPS:
                flush()
            bar.update(1)
        else:
            finite = bool(torch.isfinite(loss).item() and torch.isfinite(gnorm).item())
            if not finite:
                skipped += 1
                consecutive += 1
                opt.zero_grad(set_to_none=True)
                if consecutive >= cfg.max_nonfinite:
                    raise _nonfinite_error(consecutive, step, out_dir)
                continue
            consecutive = 0
            update()
            step += 1
            rec = {"step": step, **{k: float(v.detach()) for k, v in logs.items()}}
            history.append(rec)
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if budget is not None and step % sync_every == 0:
            now = time.perf_counter()
            new_total, spent = budget.total(step, total, elapsed_before + now - t0, now)
            out_of_time = out_of_time or spent
            if world > 1:  # one decision for all processes: rank 0's
                from accelerate.utils import broadcast

                t = torch.tensor([-1 if new_total is None else new_total], device=dev)
                new_total = int(broadcast(t, from_process=0).item())
                new_total = None if new_total < 0 else new_total
            total = new_total
            bar.total = total
        if stop.signal is not None:  # Ctrl-C / SIGTERM: this step is done; keep it
            save()
            where = f"; checkpoint in {out_dir}/checkpoint: run the same command with " \
                "--resume to continue" if out_dir is not None else ""
            raise KeyboardInterrupt(f"at step {step}{where}")
        by_steps = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        by_time = cfg.checkpoint_minutes and \
            time.perf_counter() - last_save >= 60 * cfg.checkpoint_minutes
        if (by_steps or by_time) and (total is None or step < total):
            save()
            last_save = time.perf_counter()
    flush()
    bar.close()
    seconds = elapsed_before + time.perf_counter() - t0
    save(final=True)
    if w16 is not None:
        w16.restore()  # the trained module is float32 again
    final = ema.model if ema is not None else acc.unwrap_model(model).task
    final.eval()
    return TrainResult(model=final, raw_model=acc.unwrap_model(model).task, steps=step,
                       seconds=seconds, history=history, skipped_nonfinite=skipped,
                       is_main_process=acc.is_main_process, precision=precision,
                       processes=world, bf16_weights=w16 is not None)


def _nonfinite_error(consecutive: int, step: int, out_dir: Path | None) -> DifflabError:
    return DifflabError(f"training stopped: {consecutive} non-finite losses or gradients in a "
                        f"row at step {step}; the last good checkpoint is kept"
                        + (f" in {out_dir}/checkpoint" if out_dir else ""))


def _check_batch_fits(images: torch.Tensor, local_bs: int, dev: torch.device) -> None:
    """Refuse a batch whose *input* alone exceeds the device's memory (the activations need
    many times more), before anything is allocated for it."""
    need = local_bs * images[0].numel() * 4  # float32 rows
    have = memory_bytes(dev)
    if have is not None and need > have:
        raise DifflabError(f"batch size {local_bs} needs {need / 2**30:.0f} GiB for the input "
                           f"images alone, more than the {have / 2**30:.0f} GiB of {dev}; use a "
                           "smaller --batch-size")


class _LossModule(nn.Module):
    """Makes ``training_loss`` the forward, so DDP's gradient all-reduce hooks see the call."""

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor],
                generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        return self.task.training_loss(batch, generator)
