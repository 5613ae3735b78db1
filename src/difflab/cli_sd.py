"""``difflab sd``: text-to-image with real Stable Diffusion weights in difflab's own modules.

    difflab sd --model stable-diffusion-v1-5 --prompt "a watercolor fox" --out fox.png
    difflab sd --model v1-5-pruned-emaonly.safetensors --tokenizer sd15/tokenizer \\
               --prompt "a watercolor fox" --steps 25 --scheduler euler_a --seed 1 --out fox.png

float16 on a GPU, float32 on the CPU. Registered in ``cli.EXTRA_COMMANDS``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difflab.cli_args import (
    finite_float,
    out_image,
    positive_int,
    seed_int,
)


def cmd_sd(args: argparse.Namespace) -> int:
    import time

    import torch

    from difflab.errors import DifflabError
    from difflab.interop import load_pipeline
    from difflab.viz import save_image, to_uint8

    for side in (args.height, args.width):
        if side is not None and side % 8:
            raise DifflabError(f"--height/--width must be multiples of 8; got {side}")
    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype, device=device, scheduler=args.scheduler,
                         tokenizer=args.tokenizer)
    print(f"loaded {args.model} on {device} ({str(dtype).removeprefix('torch.')}) in "
          f"{time.perf_counter() - t0:.1f} s; scheduler {type(pipe.scheduler).__name__}")
    generator = torch.Generator("cpu").manual_seed(args.seed)  # same image on CPU and GPU
    t0 = time.perf_counter()
    images = pipe([args.prompt] * args.n, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                  height=args.height, width=args.width, generator=generator, progress=True)
    print(f"sampled {args.n} image(s) in {time.perf_counter() - t0:.1f} s")
    out = args.out
    for i, image in enumerate(images):
        path = out if args.n == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        save_image(to_uint8(image[None], value_range=(0.0, 1.0))[0], path)
        print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``difflab sd`` to the top-level sub-commands."""
    from difflab.schedulers import SCHEDULERS

    p = sub.add_parser("sd", help="text-to-image with Stable Diffusion v1.x weights")
    p.add_argument("--model", type=Path, required=True,
                   help="diffusers-format folder or SD v1.x .safetensors/.ckpt single file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--guidance", type=finite_float, default=7.5,
                   help="classifier-free guidance scale (1 = none)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="default: the model's own (DPM-Solver++ where difflab lacks it)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--height", type=positive_int,
                   help="pixels, multiple of 8 (default: the model's own size, 512 for SD v1)")
    p.add_argument("--width", type=positive_int,
                   help="pixels, multiple of 8 (default: the model's own size, 512 for SD v1)")
    p.add_argument("--n", type=positive_int, default=1, help="images for the prompt")
    p.add_argument("--tokenizer", type=Path,
                   help="folder with CLIP's vocab.json + merges.txt (single files only; "
                        "default: tokenizer/ beside the file)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    p.add_argument("--out", type=out_image, default=Path("sd.png"))
    p.set_defaults(func=cmd_sd)
