"""The ``difflab`` command line. It only parses arguments into configs and calls library code.

Every user error is one line on stderr and exit code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from difflab import __version__
from difflab.cli_args import (
    add_channels_argument,
    add_sample_precision_argument,
    finite_float,
    image_size_int,
    nonneg_float,
    nonneg_int,
    out_folder,
    out_image,
    positive_float,
    positive_int,
    seed_int,
    unit_float,
)
from difflab.errors import DifflabError
from difflab.perf import keep_freed_memory


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + error)
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------- demo / data
def cmd_demo(args: argparse.Namespace) -> int:
    from difflab.runs.demo import DemoConfig, run_demo

    cfg = DemoConfig(data=args.data, out=str(args.out), minutes=args.minutes, seed=args.seed)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    report = run_demo(cfg)
    print(f"report: {report}")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from difflab.data import dataset_info, load_dataset
    from difflab.viz import save_grid

    ds = load_dataset(args.spec, args.split, image_size=args.image_size, channels=args.channels)
    info = dataset_info(ds)
    for k, v in info.items():
        print(f"{k:>14}: {v}")
    out = args.out or Path(f"{Path(ds.name).name}-{args.split}-examples.png")
    save_grid(ds.images[:64], out, nrow=8)
    print(f"{'examples':>14}: {out}")
    return 0


# ------------------------------------------------------------------------------------ train
def _train_config(args: argparse.Namespace, **defaults: object):  # -> TrainConfig
    from difflab.training import TrainConfig

    kw = dict(defaults)
    for name in ("batch_size", "lr", "seed", "minutes", "epochs", "checkpoint_every",
                 "checkpoint_minutes",
                 "mixed_precision", "ema_decay", "warmup_steps", "compile", "deterministic",
                 "bf16_weights"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    if args.steps is not None:
        kw["max_steps"] = args.steps
    kw["progress"] = not args.no_progress
    return TrainConfig(**kw)


RUN_ENTRIES = ("checkpoint", "model", "pipeline", "metrics.json", "report.html")


def prepare_run_folder(out: Path, args: argparse.Namespace) -> None:
    """Never train over an earlier run by accident (its model would be lost, or mixed with
    the new one's files): ``--resume`` continues it, ``--overwrite`` removes it first."""
    import os
    import shutil

    if args.resume or not out.is_dir() or not any((out / e).exists() for e in RUN_ENTRIES):
        return
    if not args.overwrite:
        raise DifflabError(f"{out} holds a run already: --resume continues it, --overwrite "
                           "replaces it, or choose another --out")
    if int(os.environ.get("RANK", "0")) == 0:  # one process of a launch removes it
        shutil.rmtree(out)


def _add_train_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="mnist5k", help="data set name or image folder")
    p.add_argument("--image-size", type=image_size_int, help="resize/crop images to this size")
    add_channels_argument(p)
    p.add_argument("--out", type=out_folder, help="run folder (default runs/<kind>-<data>)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, help="optimisation steps")
    budget.add_argument("--minutes", type=positive_float, help="wall-clock training budget")
    budget.add_argument("--epochs", type=positive_float, help="passes over the data")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--warmup-steps", type=nonneg_int)
    p.add_argument("--ema-decay", type=unit_float)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16", "auto"],
                   help="autocast precision; auto = bf16 on GPUs and on CPUs with bf16 dot "
                        "products (AVX-512 BF16 / AMX), float32 elsewhere")
    p.add_argument("--compile", choices=["no", "default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the networks (pays on GPU; reduce-overhead = CUDA graphs)")
    p.add_argument("--checkpoint-every", type=nonneg_int,
                   help="steps between training checkpoints (default: by time only)")
    p.add_argument("--checkpoint-minutes", type=nonneg_float,
                   help="minutes between training checkpoints (default 5; 0: none by time). "
                        "A checkpoint is also written at the end and on Ctrl-C / SIGTERM")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="bitwise-repeatable GPU training (deterministic kernels; slower there; "
                        "CPU training is repeatable anyway)")
    p.add_argument("--bf16-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="keep bf16 copies of the conv and linear weights between steps instead "
                        "of casting them every step (the same numbers; fewer kernels on a GPU). "
                        "Default: on with bf16 mixed precision in one process; --bf16-weights "
                        "insists (an error elsewhere)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="remove the run already in --out first (else training refuses it)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_train_ddpm(args: argparse.Namespace) -> int:
    import json

    import torch

    from difflab.data import load_dataset
    from difflab.runs.diffusion import train_diffusion
    from difflab.training import is_main_process
    from difflab.training.objectives import DiffusionConfig

    dcfg = DiffusionConfig(prediction_type=args.prediction_type, beta_schedule=args.schedule,
                           min_snr_gamma=None if args.min_snr_gamma == 0 else args.min_snr_gamma,
                           p_uncond=args.p_uncond if args.cond == "class" else 0.0)
    tcfg = _train_config(args, **DEFAULT_DDPM_TRAIN)
    out = args.out or Path("runs") / f"ddpm-{Path(args.data).name}"
    if args.dry_run:
        print(json.dumps({"data": args.data, "out": str(out), "preset": args.preset,
                          "cond": args.cond, "diffusion": dcfg.to_dict(),
                          "train": tcfg.to_dict()}, indent=2))
        return 0
    prepare_run_folder(out, args)
    data = load_dataset(args.data, "train", image_size=args.image_size, channels=args.channels)
    hint = compile_hint(tcfg, torch.cuda.is_available())
    if hint and is_main_process():
        print(hint, file=sys.stderr)
    run = train_diffusion(data, out_dir=out, train_cfg=tcfg, diffusion_cfg=dcfg,
                          preset=args.preset, cond_class=args.cond == "class",
                          resume=args.resume)
    if not is_main_process():  # many processes: the main one reports
        return 0
    print(f"trained {run.steps} steps in {run.seconds:.0f} s → {out}/model, "
          f"report {out}/report.html")
    return 0


def compile_hint(cfg, cuda: bool) -> str | None:  # cfg: TrainConfig
    """A one-line note for an eager run on a GPU that is not explicitly short (under 5 minutes
    or 2,000 steps): compiling pays there."""
    short = (cfg.minutes is not None and cfg.minutes < 5) or \
        (cfg.max_steps is not None and cfg.max_steps < 2000)
    if not cuda or cfg.compile != "no" or short:
        return None
    return ("difflab: note: on a GPU, --compile reduce-overhead trains this U-Net about 2.5-3x "
            "faster after a compile of 1-2 minutes (H100: benchmarks/RESULTS.md, \"GPU\")")


# Measured default recipe (see benchmarks/RESULTS.md).
# mixed_precision "auto": bf16 autocast where the hardware multiplies bf16 natively (on this
# project's 2-core AVX-512 BF16 CPU: 1.35× the steps of float32 and FID-style 0.398 vs 0.611
# after 20 minutes), float32 elsewhere.
DEFAULT_DDPM_TRAIN: dict[str, object] = dict(batch_size=64, lr=2e-3, warmup_steps=100,
                                             ema_decay=0.999, mixed_precision="auto")


# ----------------------------------------------------------------------------------- sample
def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from difflab.runs.diffusion import (
        OUTPUT_NAMES,
        check_guidance,
        load_bundle,
        sample_images,
        trajectory_figure,
    )
    from difflab.runs.ldm import is_ldm_folder
    from difflab.viz import save_grid, save_image

    if is_ldm_folder(args.ckpt):  # text-to-image: a `difflab train ldm` run or pipeline folder
        from difflab.cli_clip_ldm import sample_ldm

        return sample_ldm(args)
    text_flags = [f for f, v in (("--prompt", args.prompt), ("--negative-prompt",
                  args.negative_prompt), ("--init-image", args.init_image)) if v is not None]
    if text_flags and Path(args.ckpt).exists():
        raise DifflabError(f"{args.ckpt}: {text_flags[0]} needs a latent diffusion folder "
                           "(difflab train ldm); this is not one")
    bundle = load_bundle(args.ckpt)
    labels = None
    if args.class_ is not None:
        names = bundle.data["class_names"]
        if not bundle.unet.config.num_class_embeds:
            raise DifflabError(f"{args.ckpt}: the model is unconditional; --class needs a model "
                               "trained with --cond class")
        cls = _class_index(args.class_, names)
        labels = torch.full((args.n,), cls, dtype=torch.long)
    guidance = 1.0 if args.guidance is None else args.guidance
    check_guidance(guidance, bundle, labels is not None, str(args.ckpt))
    res = sample_images(bundle, args.n, scheduler=args.scheduler, steps=args.steps,
                        seed=args.seed, class_labels=labels, guidance_scale=guidance,
                        return_trajectory=args.trajectory, progress=not args.no_progress,
                        eta=args.eta,
                        mixed_precision=args.mixed_precision)
    save_grid(res.images * 2 - 1, args.out, nrow=args.nrow or min(args.n, 8))
    print(f"wrote {args.out}")
    if args.trajectory:
        tpath = args.out.with_name(args.out.stem + "-trajectory.png")
        kind = bundle.diffusion.prediction_type
        save_image(trajectory_figure(res.trajectory, prediction_type=kind), tpath)
        print(f"wrote {tpath} (rows: x_t, {OUTPUT_NAMES[kind]}, x̂₀, x_(t-1))")
    return 0


def _class_index(value: str, names: list[str]) -> int:
    if value in names:
        return names.index(value)
    try:
        i = int(value)
    except ValueError:
        raise DifflabError(f"unknown class {value!r}; classes: {names}") from None
    if not 0 <= i < len(names):
        raise DifflabError(f"class {i} out of range 0..{len(names) - 1}")
    return i


# ------------------------------------------------------------------------------------- plot
def cmd_plot_schedules(args: argparse.Namespace) -> int:
    from difflab.viz.schedules import plot_schedules

    print(f"wrote {plot_schedules(args.out)}")
    return 0


def cmd_plot_forward(args: argparse.Namespace) -> int:
    from difflab.data import load_dataset
    from difflab.viz.schedules import plot_forward_process

    ds = load_dataset(args.data, "train")
    if args.index >= len(ds):
        raise DifflabError(f"--index {args.index} is out of range: {args.data} has {len(ds)} "
                           "training images")
    print(f"wrote {plot_forward_process(ds.images[args.index], args.out)}")
    return 0


# ----------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from difflab.schedulers import SCHEDULERS

    p = _Parser(prog="difflab", description="VAEs and diffusion models, from scratch.")
    p.add_argument("--version", action="version", version=f"difflab {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", help="train AE, VAE and DDPM in minutes; write an HTML report")
    d.add_argument("--data", default="mnist5k", help="data set (default: mnist5k)")
    d.add_argument("--out", type=out_folder, default=Path("runs/demo"))
    d.add_argument("--minutes", type=positive_float, default=4.0,
                   help="total training budget (default 4)")
    d.add_argument("--seed", type=seed_int, default=0)
    d.add_argument("--dry-run", action="store_true")
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="inspect data sets").add_subparsers(
        dest="data_cmd", required=True, parser_class=_Parser)
    info = data.add_parser("info", help="counts, shape, class names and an example grid")
    info.add_argument("spec", help="data set name or image folder")
    info.add_argument("--split", default="train", choices=["train", "test"])
    info.add_argument("--image-size", type=image_size_int)
    add_channels_argument(info)
    info.add_argument("--out", type=out_image, help="PNG grid of examples")
    info.set_defaults(func=cmd_data_info)

    tr = sub.add_parser("train", help="train a model").add_subparsers(
        dest="model", required=True, parser_class=_Parser)
    dd = tr.add_parser("ddpm", help="pixel-space diffusion model (U-Net)")
    _add_train_common(dd)
    dd.add_argument("--preset", default="small", help="U-Net preset: small | ddpm-cifar10")
    dd.add_argument("--prediction-type", default="epsilon",
                    choices=["epsilon", "v_prediction", "sample"])
    dd.add_argument("--schedule", default="squaredcos_cap_v2",
                    choices=["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
    dd.add_argument("--min-snr-gamma", type=finite_float, default=5.0, help="0 disables")
    dd.add_argument("--cond", choices=["none", "class"], default="none")
    dd.add_argument("--p-uncond", type=unit_float, default=0.1,
                    help="label dropout for classifier-free guidance")
    dd.set_defaults(func=cmd_train_ddpm)

    s = sub.add_parser("sample", help="sample a trained diffusion model into a PNG grid")
    s.add_argument("--ckpt", type=Path, required=True,
                   help="run or model folder (pixel diffusion or latent diffusion)")
    s.add_argument("--scheduler", default="dpm++", choices=sorted(SCHEDULERS),
                   help="dpm++ = DPM-Solver++; pixel models and LDMs trained by difflab "
                        "use its SDE form (stochastic, seeded), other pipeline folders the "
                        "form their scheduler config names (else the ODE)")
    s.add_argument("--steps", type=positive_int, default=25)
    s.add_argument("--n", type=positive_int, default=64)
    s.add_argument("--nrow", type=positive_int, help="images per grid row (default min(n, 8))")
    s.add_argument("--seed", type=seed_int, default=0)
    s.add_argument("--class", dest="class_", help="class index or name (conditional models)")
    s.add_argument("--guidance", type=finite_float,
                   help="classifier-free guidance scale (default 1 = none; latent diffusion: 4)")
    s.add_argument("--eta", type=unit_float, help="DDIM η (0 = deterministic)")
    s.add_argument("--trajectory", action="store_true",
                   help="also write the x_t / predicted noise / x̂₀ / x_{t−1} figure")
    add_sample_precision_argument(s)
    s.add_argument("--out", type=out_image, default=Path("samples.png"))
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sample_arguments(s)
    s.set_defaults(func=cmd_sample)

    pl = sub.add_parser("plot", help="figures of the theory").add_subparsers(
        dest="plot", required=True, parser_class=_Parser)
    ps = pl.add_parser("schedules", help="β_t, ᾱ_t and log-SNR of every noise schedule")
    ps.add_argument("--out", type=out_image, default=Path("schedules.png"))
    ps.set_defaults(func=cmd_plot_schedules)
    pf = pl.add_parser("forward", help="one image noised at t = 0…T for each schedule")
    pf.add_argument("--data", default="mnist5k")
    pf.add_argument("--index", type=nonneg_int, default=0)
    pf.add_argument("--out", type=out_image, default=Path("forward.png"))
    pf.set_defaults(func=cmd_plot_forward)

    for extra in EXTRA_COMMANDS:
        extra(sub, tr)
    return p


# Later modules add sub-commands here (an explicit list; no discovery magic).
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction, argparse._SubParsersAction], None]]
from difflab.cli_app import register as _register_app  # noqa: E402
from difflab.cli_autoencoders import register as _register_autoencoders  # noqa: E402
from difflab.cli_clip_ldm import add_sample_arguments  # noqa: E402
from difflab.cli_clip_ldm import register as _register_clip_ldm  # noqa: E402
from difflab.cli_eval import register as _register_eval  # noqa: E402
from difflab.cli_sd import register as _register_sd  # noqa: E402

EXTRA_COMMANDS = [_register_autoencoders, _register_sd, _register_clip_ldm, _register_eval,
                  _register_app]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    keep_freed_memory()
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "mixed_precision", None) == "fp16":
            import torch

            if not torch.cuda.is_available():  # it would silently run float32
                raise DifflabError("--mixed-precision fp16 needs a CUDA GPU; on a CPU use bf16 "
                                   "(or no)")
        return int(args.func(args) or 0)
    except DifflabError as e:
        if debug:
            raise
        print(f"difflab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"difflab: interrupted{f' {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # torch was loaded: leave a launch's group cleanly
            from difflab.training import close_process_group
            close_process_group()


if __name__ == "__main__":
    sys.exit(main())
