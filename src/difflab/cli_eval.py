"""``difflab eval``: sample quality (FID / KID / precision–recall) or likelihood of a checkpoint.

    difflab eval --ckpt runs/ddpm-mnist5k --metric fid kid pr --n 10000
    difflab eval --ckpt runs/ddpm-mnist5k --metric nll --nll-timesteps 50 --n 1000
    difflab eval --ckpt runs/vae-mnist5k --metric nll                       (a VAE: ELBO / IWAE)

For a diffusion checkpoint (run or model folder, recognised by ``diffusion_config.json``) the
sample metrics draw ``--n`` images with ``--scheduler``/``--steps`` and compare them with the
``--split`` images of the model's data set (``--data`` overrides), in the feature space of that
data set's classifier (:mod:`difflab.metrics.features`, trained once and cached) and, with
``--inception-weights``, of the FID Inception-v3. ``nll`` is the DDPM variational bound on the
test images (:mod:`difflab.metrics.diffusion_nll`). Numbers are printed and written as JSON.

This module imports only argparse-level code at import time; ``difflab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from difflab.cli_args import (
    add_sample_precision_argument,
    finite_float,
    out_file,
    positive_int,
    seed_int,
)
from difflab.errors import ConfigError, DifflabError

METRICS = ("fid", "kid", "pr", "nll")
SAMPLE_METRICS = ("fid", "kid", "pr")


# ------------------------------------------------------------------------ library entry point

def is_diffusion_checkpoint(folder: str | Path) -> bool:
    """A diffusion model folder, or a run folder holding one in ``model/``."""
    folder = Path(folder)
    return (folder / "diffusion_config.json").is_file() or \
        (folder / "model" / "diffusion_config.json").is_file()


def sample_many(bundle: Any, n: int, *, scheduler: str = "dpm++", steps: int = 25,
                seed: int = 0, guidance_scale: float = 1.0, batch_size: int = 500,
                progress: bool = True, mixed_precision: str = "no") -> Any:
    """``n`` samples (N, C, H, W) in [0, 1], drawn ``batch_size`` at a time.

    Chunk i uses seed ``seed · 1_000_003 + i``, so a given (seed, batch_size) always gives the
    same images. Class-conditional models get balanced labels 0, 1, …, K−1, 0, 1, …
    """
    import torch

    from difflab._tqdm import tqdm
    from difflab.runs.diffusion import sample_images

    num_classes = len(bundle.data.get("class_names", [])) \
        if getattr(bundle.unet.config, "num_class_embeds", None) else 0
    out = []
    bar = tqdm(total=n, desc=f"sampling ({scheduler}, {steps} steps)", unit="img",
               disable=not progress, dynamic_ncols=True, leave=False)
    for i, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        labels = (torch.arange(start, start + b) % num_classes) if num_classes else None
        res = sample_images(bundle, b, scheduler=scheduler, steps=steps,
                            seed=seed * 1_000_003 + i, class_labels=labels,
                            guidance_scale=guidance_scale, mixed_precision=mixed_precision)
        out.append(res.images.float().cpu())
        bar.update(b)
    bar.close()
    return torch.cat(out)


def evaluate_diffusion_checkpoint(folder: str | Path, metrics: list[str], *, n: int | None = None,
                                  scheduler: str = "dpm++", steps: int = 25,
                                  data: str | None = None, split: str = "test", seed: int = 0,
                                  guidance_scale: float = 1.0, batch_size: int = 500,
                                  nll_timesteps: int | None = 50,
                                  nll_variance: str = "fixed_large",
                                  feature_steps: int | None = None,
                                  inception_weights: str | Path | None = None, k: int = 3,
                                  progress: bool = True,
                                  mixed_precision: str = "no") -> dict[str, Any]:
    """The metrics of a trained diffusion model as one JSON-ready dict (see module doc).

    n: samples for fid/kid/pr (default 10000); for nll the first n images of ``split``
    (default all, at most 10000).
    """
    from difflab.data import folder_without_test_split, load_dataset, recorded_spec
    from difflab.errors import DataError
    from difflab.runs.diffusion import check_guidance, load_bundle

    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise DifflabError(f"unknown metric(s) {bad}; choose from {list(METRICS)}")
    bundle = load_bundle(folder)
    spec = data or recorded_spec(bundle.data)
    c, h, w = bundle.data["image_shape"]
    check_guidance(guidance_scale, bundle, True, str(folder))
    if any(m in SAMPLE_METRICS for m in metrics):  # the sampler's own check, before the
        # feature classifier trains for minutes
        sampler = bundle.scheduler(scheduler)
        try:
            sampler.set_timesteps(steps)
        except ConfigError as e:
            raise DifflabError(f"--steps {steps}: {e}") from None
    if split == "test" and folder_without_test_split(spec):
        split = "train"  # a folder without test/: the model saw all of it; compare with that
    try:
        ref = load_dataset(spec, split, image_size=h, channels=c)
    except DataError as e:
        hint = "" if data else " (the data set recorded in the checkpoint; pass --data)"
        raise DifflabError(f"{e}{hint}") from None
    if tuple(ref.image_shape) != (c, h, w):
        raise DifflabError(f"{spec} images are {ref.image_shape}, the model makes {(c, h, w)}")
    n_samples = n or 10_000
    for name, need in (("fid", 2), ("kid", 2), ("pr", k + 1)):
        if name in metrics and min(n_samples, len(ref)) < need:
            raise DifflabError(f"--metric {name} needs at least {need} samples and reference "
                               f"images (here --n {n_samples}, {len(ref)} in {spec} {split}"
                               f"{'; lower --pr-k' if name == 'pr' else ''})")
    result: dict[str, Any] = {"checkpoint": str(folder), "data": spec, "split": split,
                              "seed": seed}
    t0 = time.perf_counter()
    if any(m in SAMPLE_METRICS for m in metrics):
        result.update(_sample_metrics(bundle, ref, spec, metrics, n=n or 10_000,
                                      scheduler=scheduler, steps=steps, seed=seed,
                                      guidance_scale=guidance_scale, batch_size=batch_size,
                                      feature_steps=feature_steps,
                                      inception_weights=inception_weights, k=k,
                                      progress=progress, mixed_precision=mixed_precision))
    if "nll" in metrics:
        from difflab.metrics.diffusion_nll import bundle_nll

        m = min(n or 10_000, len(ref))
        result["nll"] = bundle_nll(bundle, ref.images[:m], ref.labels[:m],
                                   num_timesteps=_clip_timesteps(nll_timesteps, bundle),
                                   batch_size=min(batch_size, 100), seed=seed,
                                   variance=nll_variance, progress=progress)
    result["seconds"] = time.perf_counter() - t0
    return result


def _clip_timesteps(nll_timesteps: int | None, bundle: Any) -> int | None:
    T = bundle.diffusion.num_train_timesteps
    return None if nll_timesteps is None or nll_timesteps >= T - 1 else nll_timesteps


def _sample_metrics(bundle: Any, ref: Any, spec: str, metrics: list[str], *, n: int,
                    scheduler: str, steps: int, seed: int, guidance_scale: float,
                    batch_size: int, feature_steps: int | None,
                    inception_weights: str | Path | None, k: int,
                    progress: bool, mixed_precision: str) -> dict[str, Any]:
    import torch

    from difflab.metrics.features import get_feature_extractor
    from difflab.metrics.fid import fid_from_features, kid, quantize_8bit
    from difflab.metrics.precision_recall import precision_recall
    from difflab.perf import resolve_mixed_precision

    c, h, _ = ref.image_shape
    precision = resolve_mixed_precision(mixed_precision,
                                        next(bundle.unet.parameters()).device.type)
    extractor = get_feature_extractor(spec, image_size=h, channels=c, steps=feature_steps,
                                      progress=progress)
    t0 = time.perf_counter()
    samples = quantize_8bit(sample_many(bundle, n, scheduler=scheduler, steps=steps, seed=seed,
                                        guidance_scale=guidance_scale, batch_size=batch_size,
                                        progress=progress, mixed_precision=precision))
    # the whole sampler config (the registry name's defaults change as they are measured)
    sampler_config = {k: v for k, v in bundle.scheduler(scheduler).config.items()
                      if not k.startswith("_")}
    out: dict[str, Any] = {"n": n, "n_ref": len(ref), "scheduler": scheduler, "steps": steps,
                           "scheduler_config": sampler_config, "guidance_scale": guidance_scale,
                           "mixed_precision": precision,
                           "sampling_seconds": time.perf_counter() - t0,
                           "feature_extractor": extractor.info()}
    spaces = [("", extractor, samples * 2 - 1, ref.images)]
    if inception_weights is not None:
        from difflab.metrics.inception import load_fid_inception

        net = load_fid_inception(inception_weights)
        spaces.append(("inception_", net, samples, (ref.images + 1) / 2))
    for prefix, phi, gen_x, ref_x in spaces:
        f_gen, f_ref = phi(gen_x, batch_size=min(batch_size, 500)), phi(ref_x)
        if "fid" in metrics:
            out[f"{prefix}fid"] = fid_from_features(f_gen, f_ref)
        if "kid" in metrics:
            out[f"{prefix}kid"], out[f"{prefix}kid_std"] = kid(
                f_gen, f_ref, generator=torch.Generator().manual_seed(seed))
        if "pr" in metrics:
            pr = precision_recall(f_ref, f_gen, k=k)
            out[f"{prefix}precision"], out[f"{prefix}recall"] = pr["precision"], pr["recall"]
    return out


# ---------------------------------------------------------------------------- the command

def cmd_eval(args: argparse.Namespace) -> int:
    from difflab.io import atomic_write_json

    metrics = list(dict.fromkeys(args.metric))
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        raise DifflabError(f"{ckpt}: checkpoint folder not found")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        raise DifflabError(f"{args.inception_weights}: Inception weights file not found")
    if is_diffusion_checkpoint(ckpt):
        res = evaluate_diffusion_checkpoint(
            ckpt, metrics, n=args.n, scheduler=args.scheduler, steps=args.steps, data=args.data,
            split=args.split, seed=args.seed, guidance_scale=args.guidance,
            batch_size=args.batch_size, nll_timesteps=args.nll_timesteps,
            nll_variance=args.nll_variance,
            feature_steps=args.feature_steps, inception_weights=args.inception_weights,
            k=args.pr_k, progress=not args.no_progress, mixed_precision=args.mixed_precision)
    else:
        from difflab.runs.ldm import is_ldm_folder

        if is_ldm_folder(ckpt):
            raise DifflabError(f"{ckpt}: a latent diffusion (text-to-image) folder; difflab eval "
                               "scores pixel diffusion models and VAEs (text-to-image: "
                               "benchmarks/ldm_sampling.py)")
        if metrics != ["nll"]:
            raise DifflabError(f"{ckpt}: not a diffusion checkpoint (no diffusion_config.json); "
                               "fid/kid/pr need one — for a VAE use --metric nll")
        try:
            from difflab.runs.autoencoders import evaluate_vae_checkpoint
        except ImportError:
            raise DifflabError("VAE likelihood evaluation is not available in this version "
                               "of difflab") from None
        t0 = time.perf_counter()
        res = {"checkpoint": str(ckpt), "split": args.split,
               "nll": evaluate_vae_checkpoint(ckpt, args.split, args.iwae_k, args.n,
                                              data=args.data, seed=args.seed,
                                              progress=not args.no_progress),
               "seconds": time.perf_counter() - t0}
    _print_result(res)
    atomic_write_json(args.out, _finite_or_none(res))
    print(f"wrote {args.out}")
    return 0


def _print_result(res: dict[str, Any]) -> None:
    fe = res.get("feature_extractor")
    if fe is not None:
        acc = fe.get("test_accuracy")
        acc_s = "n/a" if acc is None else f"{100 * acc:.2f}%"
        print(f"features: {fe['name']} (test accuracy {acc_s}); {res['n']} samples "
              f"({res['scheduler']}, {res['steps']} steps) vs {res['n_ref']} {res['split']} "
              "images")
    for prefix, label in (("", ""), ("inception_", "inception ")):
        if f"{prefix}fid" in res:
            print(f"{label}fid: {res[f'{prefix}fid']:.4f}")
        if f"{prefix}kid" in res:
            std = res[f"{prefix}kid_std"]
            spread = f" ± {std:.5f} (std over subsets)" if math.isfinite(std) else ""
            print(f"{label}kid: {res[f'{prefix}kid']:.5f}{spread}")
        if f"{prefix}precision" in res:
            print(f"{label}precision: {res[f'{prefix}precision']:.4f}  "
                  f"{label}recall: {res[f'{prefix}recall']:.4f}")
    nll = res.get("nll")
    if isinstance(nll, dict):
        if "nll_bits_per_dim" in nll:
            print(f"nll (variational bound): {nll['nll_bits_per_dim']:.4f} ± "
                  f"{nll['nll_bits_per_dim_sem']:.4f} bits/dim on {nll['num_images']} images "
                  f"({nll['estimator']}, {nll['num_timesteps']} of "
                  f"{nll['num_train_timesteps'] - 1} KL terms; prior {nll['prior_bpd']:.4f}, "
                  f"diffusion {nll['diffusion_bpd']:.4f}, decoder {nll['decoder_bpd']:.4f})")
        else:
            for key, v in nll.items():
                if isinstance(v, float):
                    print(f"{key}: {v:.4f}")


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def register(sub: argparse._SubParsersAction, _train: argparse._SubParsersAction) -> None:
    """Add ``difflab eval`` to the top-level sub-commands (``cli.EXTRA_COMMANDS``)."""
    from difflab.schedulers import SCHEDULERS  # already imported by build_parser

    e = sub.add_parser("eval", help="FID / KID / precision-recall or NLL of a checkpoint")
    e.add_argument("--ckpt", type=Path, required=True, help="run or model folder")
    e.add_argument("--metric", nargs="+", choices=METRICS, default=["fid"],
                   help="one or more of fid kid pr nll (default fid)")
    e.add_argument("--n", type=positive_int,
                   help="samples for fid/kid/pr (default 10000); test images for nll "
                        "(default all, at most 10000)")
    e.add_argument("--scheduler", default="dpm++", choices=sorted(SCHEDULERS))
    e.add_argument("--steps", type=positive_int, default=25, help="sampling steps")
    e.add_argument("--guidance", type=finite_float, default=1.0,
                   help="classifier-free guidance scale (class-conditional models)")
    add_sample_precision_argument(e)
    e.add_argument("--data", help="reference data set (default: the one the model trained on)")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--inception-weights", type=Path, metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth: also compute "
                        "FID/KID/PR in Inception features (slow on a CPU)")
    e.add_argument("--nll-timesteps", type=positive_int, default=50,
                   help="KL terms sampled per image (stratified, unbiased; ≥ T−1 = exact)")
    e.add_argument("--nll-variance", default="fixed_large", choices=["fixed_large", "fixed_small"],
                   help="fixed reverse variance σ_t² of the bound: β_t (default, tighter) or β̃_t")
    e.add_argument("--pr-k", type=positive_int, default=3,
                   help="neighbours k of the precision/recall manifolds (default 3)")
    e.add_argument("--iwae-k", type=positive_int, default=1000,
                   help="importance samples of the IWAE bound (VAE checkpoints)")
    e.add_argument("--feature-steps", type=positive_int,
                   help="training steps of the feature classifier (default: its recipe)")
    e.add_argument("--batch-size", type=positive_int, default=500)
    e.add_argument("--seed", type=seed_int, default=0)
    e.add_argument("--out", type=out_file, default=Path("metrics.json"),
                   help="JSON file to write")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
