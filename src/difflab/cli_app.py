"""``difflab serve``: the web playground for trained models (needs the ``[app]`` extra).

    difflab serve                                   # the `difflab demo` models in runs/demo
    difflab serve --ckpt runs/vae-mnist5k --ckpt runs/ddpm-mnist5k --port 7860

Registered in :data:`difflab.cli.EXTRA_COMMANDS`. Checkpoints are read only from the folders
given with ``--ckpt`` (or the demo's output folder); nothing is trained at start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difflab.errors import DifflabError


def port_number(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {s!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {s!r}")
    return v


def cmd_serve(args: argparse.Namespace) -> int:
    from difflab.app import load_playground
    from difflab.app.ui import import_gradio, serve

    pg = load_playground(args.ckpt, data=args.data)  # reads only these folders; trains nothing
    import_gradio()  # a one-line error if the [app] extra is missing
    if not pg.autoencoders and not pg.diffusion:
        raise DifflabError("no model to serve")
    print(f"serving {pg.describe()} on http://{args.host}:{args.port} (Ctrl-C stops)",
          flush=True)
    serve(pg, host=args.host, port=args.port)
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``difflab serve``."""
    p = sub.add_parser("serve", help="web playground: VAE latents, diffusion sampling, noise "
                       "schedules (pip install 'difflab[app]')")
    p.add_argument("--ckpt", type=Path, action="append",
                   help="model, run or demo folder (repeatable; default: runs/demo from "
                        "`difflab demo`)")
    p.add_argument("--data", help="data set whose test images the VAE and schedule tabs use "
                   "(default: the one recorded with the checkpoints)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                   "this machine only)")
    p.add_argument("--port", type=port_number, default=7860)
    p.set_defaults(func=cmd_serve)
