"""``difflab train ae|vae|linear-ae`` and ``difflab experiment ae-vs-vae|pca-vs-linear-ae``.

Registered in :data:`difflab.cli.EXTRA_COMMANDS`. Only argument parsing lives here; the work is
in :mod:`difflab.runs.autoencoders`. Heavy imports (torch, models) happen inside the commands,
so ``difflab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from difflab.cli_args import (
    image_size_int,
    nonneg_float,
    nonneg_int,
    out_folder,
    positive_float,
    positive_int,
    seed_int,
)


def int_tuple(s: str) -> tuple[int, ...]:
    """``"512,256"`` → (512, 256); every entry a positive integer."""
    try:
        vals = tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}"
                                         ) from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return vals


# ------------------------------------------------------------------------------------- train
def cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from difflab.cli import _train_config, prepare_run_folder
    from difflab.data import load_dataset
    from difflab.runs.autoencoders import (
        DEFAULT_TRAIN,
        model_config,
        train_autoencoder,
        train_test_split,
    )
    from difflab.training import is_main_process

    defaults = dict(DEFAULT_TRAIN, channels_last=getattr(args, "arch", "mlp") == "conv")
    if any(v is not None for v in (args.steps, args.minutes, args.epochs)):
        defaults.pop("max_steps")  # the user's budget replaces the default one
    tcfg = _train_config(args, **defaults)
    out = args.out or Path("runs") / f"{args.kind}-{Path(args.data).name}"
    data = load_dataset(args.data, "train", image_size=args.image_size, channels=args.channels)
    mcfg = model_config(args.kind, data, arch=getattr(args, "arch", "mlp"),
                        latent_dim=args.latent_dim, hidden=getattr(args, "hidden", (512, 256)),
                        likelihood=getattr(args, "likelihood", None), C=getattr(args, "C", 50.0),
                        beta=getattr(args, "beta", 1.0), tied=getattr(args, "tied", False))
    iwae_k, eval_n = getattr(args, "iwae_k", 100), args.eval_n
    if args.dry_run:
        print(json.dumps({"kind": args.kind, "data": data.name, "num_images": len(data),
                          "image_size": args.image_size, "out": str(out),
                          "model": {"_class_name": type(mcfg).__name__.removesuffix("Config"),
                                    **mcfg.to_dict()},
                          "train": tcfg.to_dict(),
                          "eval": {"iwae_k": iwae_k, "eval_n": eval_n}}, indent=2))
        return 0
    prepare_run_folder(out, args)
    data, test = train_test_split(args.data, args.image_size, data, channels=args.channels)
    run = train_autoencoder(mcfg, data, test, tcfg, out_dir=out, image_size=args.image_size,
                            resume=args.resume, iwae_k=iwae_k, eval_n=eval_n)
    if not is_main_process():  # many processes: the main one evaluated and reports
        return 0
    m = run.metrics
    line = (f"trained {m['train_steps']} steps in {m['train_seconds']:.0f} s; "
            f"test MSE {m['test_mse']:.4g}")
    if "test_likelihood" in m:
        like = m["test_likelihood"]
        line += (f"; test -ELBO {like['nelbo_nats']:.2f} nats, IWAE NLL (k={like['k']}) "
                 f"{like['iwae_nll_nats']:.2f} nats = {like['iwae_nll_bits_per_dim']:.4f} "
                 "bits/dim")
    if "pca" in m:
        line += f"; max principal angle to PCA {m['pca']['max_principal_angle_deg']:.3g} deg"
    print(line)
    print(f"model {out}/model, metrics {out}/metrics.json, report {out}/report.html")
    return 0


def _add_model_args(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--latent-dim", type=positive_int, default=16,
                   help="size of the code z (default: %(default)s)")
    if kind != "linear-ae":
        p.add_argument("--arch", choices=["mlp", "conv"], default="mlp")
        p.add_argument("--hidden", type=int_tuple, default=(512, 256),
                       help="MLP widths or conv channels, e.g. 512,256 (default) or 32,64")
    if kind == "vae":
        p.add_argument("--likelihood", choices=["gaussian", "bernoulli"],
                       help="p(x|z) (default: bernoulli for grey-scale data, else gaussian)")
        p.add_argument("--C", type=positive_float, default=50.0,
                       help="gaussian: weight of ||x - f(z)||^2, sigma^2 = 1/(2C) (default 50)")
        p.add_argument("--beta", type=nonneg_float, default=1.0,
                       help="KL weight (beta-VAE; 0: no KL, an autoencoder with noisy codes)")
        p.add_argument("--iwae-k", type=positive_int, default=100,
                       help="importance samples of the report's IWAE NLL (default 100; "
                            "`difflab eval --metric nll` uses 1000)")
    if kind == "linear-ae":
        p.add_argument("--tied", action="store_true", help="encoder = decoder transposed")
    p.add_argument("--eval-n", type=positive_int, default=2000,
                   help="test images used for the metrics (default: the first 2000)")


# ---------------------------------------------------------------------------------- experiments
def cmd_ae_vs_vae(args: argparse.Namespace) -> int:
    from difflab.experiments.ae_vs_vae import AEvsVAEConfig, format_rows, run_ae_vs_vae
    from difflab.runs.autoencoders import DEFAULT_TRAIN
    from difflab.training import TrainConfig

    budget = {"max_steps": args.steps, "minutes": args.minutes, "epochs": args.epochs}
    budget = {k: v for k, v in budget.items() if v is not None} or {
        "max_steps": DEFAULT_TRAIN["max_steps"]}
    cfg = AEvsVAEConfig(data=args.data, image_size=args.image_size, arch=args.arch,
                        latent_dim=args.latent_dim, hidden=args.hidden, n_samples=args.n_samples,
                        seed=args.seed, out=str(args.out or Path("runs") / "ae-vs-vae"))
    tcfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, warmup_steps=50, seed=args.seed,
                       progress=not args.no_progress, channels_last=args.arch == "conv",
                       **budget)
    if args.dry_run:
        print(json.dumps({"experiment": cfg.to_dict(), "train (each model)": tcfg.to_dict()},
                         indent=2))
        return 0
    res = run_ae_vs_vae(cfg, tcfg)
    print(f"classifier test accuracy {res['classifier_accuracy']:.1%} "
          f"({res['classifier_seconds']:.1f} s)")
    print(format_rows(res["rows"]))
    print(f"report {res['report']}")
    return 0


def cmd_pca_vs_linear_ae(args: argparse.Namespace) -> int:
    import torch

    from difflab.data import load_dataset
    from difflab.experiments import format_table, run_pca_vs_linear_ae, write_pca_report

    data = load_dataset(args.data, "train", image_size=args.image_size)
    if args.n is not None:
        data = data.subset(min(args.n, len(data)))
    out = args.out or Path("runs") / f"pca-vs-linear-ae-{Path(args.data).name}"
    if args.dry_run:
        print(json.dumps({"data": data.name, "n": len(data), "k": args.k, "tied": args.tied,
                          "adam_steps": args.steps, "lbfgs_steps": args.lbfgs_steps,
                          "seed": args.seed, "out": str(out)}, indent=2))
        return 0
    d = data.images[0].numel()
    if args.k > min(d, len(data) - 1):  # N centred points span at most N − 1 directions
        from difflab.errors import ConfigError

        raise ConfigError(f"--k {args.k} must be <= min(D, N - 1) = {min(d, len(data) - 1)}")
    res = run_pca_vs_linear_ae(data.images, args.k, tied=args.tied, steps=args.steps,
                               lbfgs_steps=args.lbfgs_steps,
                               generator=torch.Generator().manual_seed(args.seed))
    print(format_table(res))
    report = write_pca_report(res, data, out)
    print(f"bases {out}/bases.png, report {report}")
    return 0


def _experiment_parsers(sub: argparse._SubParsersAction,
                        parser_class: type) -> argparse._SubParsersAction:
    """The ``difflab experiment`` sub-command group, shared with other modules' experiments."""
    if "experiment" in sub.choices:
        for action in sub.choices["experiment"]._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
    ex = sub.add_parser("experiment", help="small experiments that each measure one idea")
    return ex.add_subparsers(dest="experiment", required=True, parser_class=parser_class)


def register(sub: argparse._SubParsersAction, tr: argparse._SubParsersAction) -> None:
    from difflab.cli import _add_train_common, _Parser

    helps = {"ae": "deterministic autoencoder (MSE)",
             "vae": "variational autoencoder (ELBO; test NLL in the report)",
             "linear-ae": "linear autoencoder (spans the PCA subspace)"}
    for kind, text in helps.items():
        p = tr.add_parser(kind, help=text)
        _add_train_common(p)
        _add_model_args(p, kind)
        p.set_defaults(func=cmd_train_autoencoder, kind=kind)

    ex = _experiment_parsers(sub, _Parser)
    av = ex.add_parser("ae-vs-vae", help="decode random latent points of an AE and a VAE and "
                                         "score how recognisable they are")
    av.add_argument("--data", default="mnist5k")
    av.add_argument("--image-size", type=image_size_int)
    av.add_argument("--out", type=out_folder, help="output folder (default runs/ae-vs-vae)")
    av.add_argument("--arch", choices=["mlp", "conv"], default="mlp")
    av.add_argument("--latent-dim", type=positive_int, default=2)
    av.add_argument("--hidden", type=int_tuple, default=(512, 256))
    budget = av.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int,
                        help="optimisation steps per model (default 3000)")
    budget.add_argument("--minutes", type=positive_float, help="training minutes per model")
    budget.add_argument("--epochs", type=positive_float, help="epochs per model")
    av.add_argument("--batch-size", type=positive_int, default=128)
    av.add_argument("--lr", type=positive_float, default=1e-3)
    av.add_argument("--n-samples", type=positive_int, default=2000,
                    help="random latent points decoded per model")
    av.add_argument("--seed", type=seed_int, default=0)
    av.add_argument("--dry-run", action="store_true")
    av.add_argument("--no-progress", action="store_true")
    av.set_defaults(func=cmd_ae_vs_vae)

    pc = ex.add_parser("pca-vs-linear-ae", help="a linear AE trained to convergence finds the "
                                                "PCA subspace (principal angles, MSE, bases)")
    pc.add_argument("--data", default="mnist5k")
    pc.add_argument("--image-size", type=image_size_int)
    pc.add_argument("--k", type=positive_int, default=16, help="subspace dimension")
    pc.add_argument("--tied", action="store_true", help="encoder = decoder transposed")
    pc.add_argument("--n", type=positive_int, help="use the first N training images")
    pc.add_argument("--steps", type=nonneg_int, default=300, help="Adam steps before L-BFGS")
    pc.add_argument("--lbfgs-steps", type=nonneg_int, default=2000, help="max L-BFGS iterations")
    pc.add_argument("--seed", type=seed_int, default=0)
    pc.add_argument("--out", type=out_folder)
    pc.add_argument("--dry-run", action="store_true")
    pc.set_defaults(func=cmd_pca_vs_linear_ae)
