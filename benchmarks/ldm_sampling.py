"""DPM-Solver++ as ODE vs SDE on a text-to-image model trained with ``difflab train ldm``.

    difflab train ldm --data mnist5k --minutes 10 --out runs/ldm10
    python benchmarks/ldm_sampling.py --ckpt runs/ldm10 --steps 25 --guidance 4

Prompts are the class captions without attributes ("a seven"), ``--n-per-class`` samples each,
the same seeds for every sampler. Scores: FID-style against the data set's test split in its
feature-classifier space (``difflab.metrics``), and the fraction of samples that a classifier
trained on the train split (``difflab.runs.judge``, as in the LDM report) puts in the prompt's
class. Prints a table and writes benchmarks/out/ldm_sampling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

from difflab.data import load_dataset, recorded_spec  # noqa: E402
from difflab.data.captions import ATTRIBUTES  # noqa: E402
from difflab.metrics.fid import fid_of_images  # noqa: E402
from difflab.runs.judge import train_classifier  # noqa: E402
from difflab.runs.ldm import ldm_folder, load_ldm  # noqa: E402
from difflab.runs.ldm_report import text_following  # noqa: E402
from difflab.schedulers import DPMSolverMultistepScheduler  # noqa: E402

SAMPLERS = {
    "ODE, midpoint": {"algorithm_type": "dpmsolver++", "solver_type": "midpoint"},
    "SDE, heun": {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    "SDE, midpoint": {"algorithm_type": "sde-dpmsolver++", "solver_type": "midpoint"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="difflab train ldm run or pipeline folder")
    ap.add_argument("--data", help="the data set to judge with (default: the one the model "
                    "was trained on, from its difflab_ldm.json)")
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    pipe, captioner = load_ldm(args.ckpt, scheduler="dpm++")
    if captioner is None:
        sys.exit(f"{args.ckpt}: no captions.json — a `difflab train ldm` folder is needed")
    if args.data is None:  # the model's own data set (its folder's path for image folders)
        info = ldm_folder(args.ckpt) / "difflab_ldm.json"
        if not info.is_file():
            sys.exit(f"{args.ckpt}: no difflab_ldm.json says which data set; pass --data")
        args.data = recorded_spec(json.loads(info.read_text())["data"])
    base = dict(pipe.scheduler.config)
    k = len(captioner.class_words)
    prompts = [captioner.caption(c) for c in range(k) for _ in range(args.n_per_class)]
    judge = train_classifier(load_dataset(args.data, "train"), seed=args.seed)
    rows = []
    for name, over in SAMPLERS.items():
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(base, **over)
        t0 = time.perf_counter()
        images = torch.cat([
            pipe(prompts[i:i + args.batch], num_inference_steps=args.steps,
                 guidance_scale=args.guidance,
                 generator=torch.Generator().manual_seed(args.seed + i))
            for i in range(0, len(prompts), args.batch)])  # (N, C, H, W) in [0, 1]
        seconds = time.perf_counter() - t0
        fid = fid_of_images(images, args.data)["fid"]
        # the report's scoring: one prompt row without attributes, K classes × n samples
        follow = text_following(captioner, (images * 2 - 1).view(1, k, args.n_per_class,
                                                                 *images.shape[1:]),
                                torch.arange(k), ((0,) * len(ATTRIBUTES),), judge)
        rows.append({"sampler": name, "steps": args.steps, "guidance": args.guidance,
                     "n": len(images), "FID": fid, "class accuracy": follow["class_accuracy"],
                     "s/image": seconds / len(images)})
        print_table(rows[-1:])
    print()
    print_table(rows)
    path = write_json("ldm_sampling", {"machine": machine(), "argv": sys.argv,
                                       "ckpt": str(args.ckpt), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
