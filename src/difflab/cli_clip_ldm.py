"""``difflab train clip``, ``difflab train ldm`` and text-to-image sampling of a trained LDM.

    difflab train clip --data fashion-mnist --minutes 5
    difflab train ldm --data mnist5k --minutes 10 [--clip runs/clip-mnist5k] [--vae DIR]
    difflab sample --ckpt runs/ldm-mnist5k --prompt "a thick seven" --negative-prompt "a thin
        seven" --guidance 5 --scheduler dpm++ --steps 25 --n 8 --out x.png
    difflab sample --ckpt runs/ldm-mnist5k --prompt "a large seven" --init-image in.png
        --strength 0.6

Registered in :data:`difflab.cli.EXTRA_COMMANDS`; ``difflab sample`` calls :func:`sample_ldm`
when ``--ckpt`` is a latent diffusion folder. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from difflab.cli_args import unit_float
from difflab.errors import DifflabError

# The LDM's default guidance where --guidance is not given (pixel models default to 1).
LDM_GUIDANCE = 4.0


def _train_test(spec: str, image_size: int | None, channels: int | None
                ):  # -> (train, test) ImageDatasets
    from difflab.data import load_dataset
    from difflab.runs.autoencoders import train_test_split

    train = load_dataset(spec, "train", image_size=image_size, channels=channels)
    return train_test_split(spec, image_size, train, channels=channels)


def cmd_train_clip(args: argparse.Namespace) -> int:
    from difflab.cli import _train_config, prepare_run_folder
    from difflab.data.captions import CaptionConfig
    from difflab.runs.clip import DEFAULT_MODEL, DEFAULT_TRAIN, train_clip

    tcfg = _train_config(args, **DEFAULT_TRAIN)
    ccfg = CaptionConfig(p_attribute=args.p_attribute)
    out = args.out or Path("runs") / f"clip-{Path(args.data).name}"
    if args.dry_run:
        print(json.dumps({"data": args.data, "out": str(out), "model": DEFAULT_MODEL,
                          "captions": ccfg.to_dict(), "train": tcfg.to_dict()}, indent=2,
                         default=list))
        return 0
    prepare_run_folder(out, args)
    data, test = _train_test(args.data, args.image_size, args.channels)
    run = train_clip(data, test, out_dir=out, train_cfg=tcfg, caption_cfg=ccfg,
                     resume=args.resume)
    if not run.is_main_process:  # many processes: the main one reports
        return 0
    print(f"trained {run.steps} steps in {run.seconds:.0f} s; zero-shot {test.split} accuracy "
          f"{100 * run.metrics['zero_shot_accuracy']:.1f} % → {out}/model, "
          f"report {out}/report.html")
    return 0


def cmd_train_ldm(args: argparse.Namespace) -> int:
    from difflab.cli import _train_config, prepare_run_folder
    from difflab.runs.ldm import UNET_TRAIN, LDMConfig, stage_train_configs, train_ldm

    tcfg = _train_config(args, **UNET_TRAIN)
    cfg = LDMConfig(p_uncond=args.p_uncond, guidance_scale=args.guidance,
                    sample_steps=args.sample_steps)
    out = args.out or Path("runs") / f"ldm-{Path(args.data).name}"
    if args.dry_run:
        trained = [s for s, given in (("vae", args.vae), ("clip", args.clip), ("unet", None))
                   if given is None]
        stages = {k: v.to_dict() for k, v in stage_train_configs(tcfg, cfg, trained).items()}
        print(json.dumps({"data": args.data, "out": str(out), "ldm": cfg.to_dict(),
                          "clip": str(args.clip) if args.clip else "train",
                          "vae": str(args.vae) if args.vae else "train",
                          "train": stages}, indent=2))
        return 0
    prepare_run_folder(out, args)
    data, test = _train_test(args.data, args.image_size, args.channels)
    run = train_ldm(data, test, out_dir=out, cfg=cfg, train_cfg=tcfg, clip=args.clip,
                    vae=args.vae, resume=args.resume)
    if not run.is_main_process:
        return 0
    print(f"trained in {run.metrics['total_train_seconds']:.0f} s → {run.pipeline}, "
          f"report {out}/report.html")
    return 0


def sample_ldm(args: argparse.Namespace) -> int:
    """``difflab sample`` for a latent diffusion folder: text → image (or image → image)."""
    import torch

    from difflab.perf import resolve_mixed_precision
    from difflab.runs.ldm import check_prompt, load_ldm
    from difflab.viz import save_grid

    for flag, value in (("--trajectory", args.trajectory or None), ("--eta", args.eta)):
        if value is not None:
            raise DifflabError(f"{flag} is for pixel diffusion models; {args.ckpt} is a latent "
                               "diffusion folder")
    pipe, captioner = load_ldm(args.ckpt, scheduler=args.scheduler)
    prompt = args.prompt
    if prompt is None and args.class_ is not None:
        if captioner is None:
            raise DifflabError(f"{args.ckpt}: no captions.json, so --class has no prompt; "
                               "use --prompt")
        from difflab.cli import _class_index

        prompt = captioner.class_prompts()[_class_index(args.class_,
                                                        captioner.class_words)]
    elif args.class_ is not None:
        raise DifflabError("give either --prompt or --class, not both")
    if prompt is None:
        raise DifflabError(f"{args.ckpt} is a text-to-image model: give --prompt \"…\" "
                           "(or --class)")
    check_prompt(prompt, captioner, pipe)
    if args.negative_prompt is not None:
        check_prompt(args.negative_prompt, captioner, pipe)
    guidance = LDM_GUIDANCE if args.guidance is None else args.guidance
    precision = resolve_mixed_precision(args.mixed_precision, pipe.device.type)
    g = torch.Generator().manual_seed(args.seed)
    prompts = [prompt] * args.n
    if args.strength is not None and args.init_image is None:
        raise DifflabError("--strength is for img2img: give --init-image too")
    strength = 0.6 if args.strength is None else args.strength
    if args.init_image is not None:
        if int(args.steps * strength) < 1:
            raise DifflabError(f"--strength {strength} × --steps {args.steps} leaves no "
                               "denoising step; raise either")
        image = _read_image(args.init_image, pipe)
        images = pipe.img2img(prompts, image.expand(args.n, -1, -1, -1), strength=strength,
                              num_inference_steps=args.steps, guidance_scale=guidance,
                              negative_prompt=args.negative_prompt, generator=g,
                              progress=not args.no_progress, mixed_precision=precision)
    else:
        images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=guidance,
                      negative_prompt=args.negative_prompt, generator=g,
                      progress=not args.no_progress, mixed_precision=precision)
    save_grid(images * 2 - 1, args.out, nrow=args.nrow or min(args.n, 8))
    print(f"wrote {args.out} ({args.n} × {prompt!r}, guidance {guidance})")
    return 0


def _read_image(path: Path, pipe):  # -> Tensor (1, C, H, W) in [0, 1]
    """A PNG/JPEG as the pipeline's channels (gray or RGB) and training size, in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    mode = "L" if pipe.vae.config.in_channels == 1 else "RGB"
    try:
        with Image.open(path) as im:
            im = im.convert(mode).resize((side, side), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as e:
        raise DifflabError(f"{path}: cannot read the image ({e})") from None
    arr = np.asarray(im, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr)
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    return x


def add_sample_arguments(s: argparse.ArgumentParser) -> None:
    """The ``difflab sample`` flags of latent diffusion folders."""
    s.add_argument("--prompt", help="text prompt (latent diffusion folders)")
    s.add_argument("--negative-prompt", help="text to guide away from (default: the empty "
                   "prompt)")
    s.add_argument("--init-image", type=Path, help="PNG/JPEG to redraw (img2img, SDEdit)")
    s.add_argument("--strength", type=unit_float,
                   help="img2img (--init-image): fraction of the schedule run from the noised "
                        "image, (0, 1] (default 0.6)")


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``difflab train clip`` and ``difflab train ldm``."""
    from difflab.cli import _add_train_common
    from difflab.cli_args import positive_float, positive_int

    c = train.add_parser("clip", help="CLIP from scratch on captions made from labels + "
                         "attributes; zero-shot report")
    _add_train_common(c)
    c.add_argument("--p-attribute", type=unit_float, default=0.5,
                   help="chance that each extreme attribute is named in a caption")
    c.set_defaults(func=cmd_train_clip)

    ld = train.add_parser("ldm", help="latent diffusion: autoencoder + CLIP + text-conditioned "
                          "U-Net (budget flags: --steps/--epochs per stage, --minutes in all; "
                          "optimiser flags: the U-Net's)")
    _add_train_common(ld)
    ld.add_argument("--clip", type=Path, help="reuse a CLIP (difflab train clip run or model "
                    "folder) instead of training one")
    ld.add_argument("--vae", type=Path, help="reuse an AutoencoderKL checkpoint folder (or a "
                    "previous ldm run) instead of training one")
    ld.add_argument("--p-uncond", type=unit_float, default=0.1,
                    help="caption dropout for classifier-free guidance")
    ld.add_argument("--guidance", type=positive_float, default=LDM_GUIDANCE,
                    help="guidance scale of the report's samples")
    ld.add_argument("--sample-steps", type=positive_int, default=25,
                    help="DPM-Solver++ steps of the report's samples")
    ld.set_defaults(func=cmd_train_ldm)
