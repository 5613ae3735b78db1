"""Quality per compute: equal wall-clock training budget on Fashion-MNIST, difflab vs two peers.

    bash benchmarks/setup_peers.sh                    # once: the peer venv (/work/peervenv)
    python benchmarks/quality_race.py --minutes 20 --estimate-only     # train all 3, price sampling
    python benchmarks/quality_race.py --skip-train --n 5000 --n-peer 1000   # sample and score

Sampling cost per image differs ~25× between contestants: forward GFLOP per 28/32-px image
(FlopCounterMode) × NFE = difflab 0.58 × 25 = 14, diffusers 7.76 × 50 = 388,
denoising-diffusion-pytorch 3.64 × 50 = 182 — hence ``--n-peer``.

Contestants (``--contestants``), each trained in its own subprocess with ``--threads`` torch
threads (default 2), one after the other, for ``--minutes`` of *training loop* (model build and
data preparation are outside the budget, for all three):

- ``difflab``: ``difflab train ddpm --data fashion-mnist --minutes M`` — the default recipe,
  unchanged (its precision is ``auto``: bf16 autocast on a CPU with bf16 dot products;
  ``--difflab-precision no`` forces float32) — sampled like
  ``difflab sample``'s defaults (DPM-Solver++ 2M SDE, 25 steps, EMA weights).
- ``diffusers``: diffusers' ``train_unconditional.py`` recipe transcribed with diffusers objects
  (``benchmarks/race_diffusers.py``; its docstring lists what follows the script and what
  differs: 32×32×1 padded images, DDIM 50 steps for sampling).
- ``ddpm-pytorch``: denoising-diffusion-pytorch's ``Trainer`` with its README recipe
  (``benchmarks/race_ddpm_pytorch.py``), run with the peer venv's python (``--peer-python``;
  ``--setup-peer-venv`` makes it). Its train split is exported to a folder of 32×32 PNGs under
  ``--out-dir`` first, outside the budget.

Scoring (``difflab.metrics``): ``n`` samples per contestant (``--n``; ``--n-peer`` for the two
peers when their sampling is too slow on a CPU), rounded to 8 bits, against the 10,000 test
images in the Fashion-MNIST feature-classifier space: Fréchet distance (FID-style), KID
(unbiased in n, so it compares runs of different n), precision and recall (k = 3). Reference
rows score *real* images the same way at each n used: the first n train images as they are and
Gaussian-blurred with σ = 0.5 and 1.0 px. FID is biased upwards at small n: compare FIDs only at
equal n (the reference rows give the floor at each n).

**Replaying a budget on a GPU** (``--replay-steps difflab=4841,diffusers=712,ddpm-pytorch=390
--device cuda``): each contestant trains for exactly the steps its CPU budget reached (same
recipe, same batch, same data order and noise draws, which are taken on the CPU) and samples
on the device, so the 5,000 samples per peer that would take the CPU hours take minutes. The
models are the CPU budget's models up to float rounding; the table's time columns are then the
device's, not the budget's.

Before sampling, each contestant draws ``--probe`` images to measure seconds per image, and the
estimated total for its n is printed (``--estimate-only`` stops there). Writes the table and
everything measured to benchmarks/out/quality_race.json; checkpoints, logs and samples stay in
``--out-dir`` (default /tmp/race), so ``--skip-train`` rescores existing checkpoints.
Goal (issue 5): difflab's FID ≥ 25 % lower than the best peer's at equal budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, print_table, write_json  # noqa: E402

from difflab.viz import save_grid  # noqa: E402

CONTESTANTS = ("difflab", "diffusers", "ddpm-pytorch")
DATA = "fashion-mnist"
DIFFLAB_SAMPLER = ("dpm++", 25)  # `difflab sample`'s default --scheduler / --steps
PAD = 2  # the peers train on 28×28 images zero-padded to 32×32


# ------------------------------------------------------------------------------ subprocesses

def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RACE_THREADS"):
        env[k] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_logged(cmd: list[str], log: Path, threads: int) -> dict:
    """Run ``cmd`` with ``threads`` torch threads, output to ``log``; return the JSON object the
    command prints on its last stdout line (or {} if none). Exits with the log's tail on failure.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  $ {' '.join(cmd)}\n    (log: {log})", flush=True)
    with open(log, "w") as f:  # streamed, so `tail -f LOG` follows a long run
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(threads),
                              cwd=HERE.parent)
    lines = log.read_text().splitlines()  # also splits tqdm's \r-separated updates
    if proc.returncode != 0:
        tail = "\n".join(lines[-25:])
        sys.exit(f"{cmd[0]} … failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    found = [ln for ln in lines if ln.startswith("{")]
    return json.loads(found[-1]) if found else {}


def difflab_cli() -> list[str]:
    """``difflab`` as this interpreter runs it (also where difflab is on PYTHONPATH only, not
    installed, as on the GPU machine)."""
    return [sys.executable, "-m", "difflab.cli"]


# ---------------------------------------------------------------------------------- training

def export_pngs(folder: Path) -> Path:
    """The train split as 32×32 grey PNGs (zero-padded), for denoising-diffusion-pytorch's
    Trainer. Written once; a ``done.json`` marks a complete folder."""
    import torch.nn.functional as F
    from PIL import Image

    from difflab.data import load_dataset

    if (folder / "done.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x = load_dataset(DATA, "train").images  # (N, 1, 28, 28) in [-1, 1]
    x = F.pad((x + 1) / 2, (PAD,) * 4, value=0.0)
    u8 = torch.round(x.clamp(0, 1) * 255).to(torch.uint8)[:, 0].numpy()  # (N, 32, 32)
    for i, img in enumerate(u8):
        Image.fromarray(img, mode="L").save(folder / f"{i:05d}.png")
    (folder / "done.json").write_text(json.dumps({"n": len(u8)}) + "\n")
    print(f"  exported {len(u8)} PNGs to {folder} in {time.perf_counter() - t0:.0f} s")
    return folder


def budget_args(name: str, args: argparse.Namespace) -> list[str]:
    """The training budget on a contestant's command line: minutes, or replayed steps."""
    if name in args.replay:
        return ["--steps", str(args.replay[name])]
    return ["--minutes", str(args.minutes)]


def train_contestant(name: str, args: argparse.Namespace) -> dict:
    out = args.out_dir / name
    if name == "difflab":
        from difflab.cli import DEFAULT_DDPM_TRAIN

        if not args.skip_train:
            run_logged([*difflab_cli(), "train", "ddpm", "--data", DATA,
                        *budget_args(name, args), "--out", str(out), "--seed", str(args.seed),
                        "--mixed-precision", args.difflab_precision, "--no-progress"],
                       out.parent / f"{name}-train.log", args.threads)
        m = json.loads((out / "metrics.json").read_text())
        bs = int(DEFAULT_DDPM_TRAIN["batch_size"])
        return {"steps": m["steps"], "train_seconds": m["train_seconds"], "batch_size": bs,
                "mixed_precision": m.get("mixed_precision", args.difflab_precision),
                "img_per_s": m["steps"] * bs / m["train_seconds"], "final_loss": m["final_loss"],
                "parameters": m["unet_parameters"]}
    if not args.skip_train:
        if name == "diffusers":
            cmd = [sys.executable, str(HERE / "race_diffusers.py"), "train",
                   "--device", args.device]
        else:
            png = export_pngs(args.out_dir / "fashion-mnist-train-png32")
            cmd = [str(args.peer_python), str(HERE / "race_ddpm_pytorch.py"), "train",
                   "--png-dir", str(png)]
        run_logged(cmd + [*budget_args(name, args), "--out", str(out), "--seed",
                          str(args.seed)], out.parent / f"{name}-train.log", args.threads)
    res = json.loads((out / "train.json").read_text())
    keep = ("steps", "train_seconds", "batch_size", "img_per_s", "final_loss", "parameters")
    return {k: res[k] for k in keep}


# ---------------------------------------------------------------------------------- sampling

def sample_contestant(name: str, n: int, args: argparse.Namespace, batch: int) -> tuple:
    """(images (n, 1, 28, 28) uint8, seconds, sampler description), threads = --threads."""
    out = args.out_dir / name
    if name == "difflab":
        from difflab.cli_eval import sample_many
        from difflab.runs.diffusion import load_bundle

        torch.set_num_threads(args.threads)
        bundle = load_bundle(out, device=args.device)
        sched, steps = DIFFLAB_SAMPLER
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = sample_many(bundle, n, scheduler=sched, steps=steps, seed=args.seed,
                            batch_size=batch, progress=False)
        sec = time.perf_counter() - t0
        u8 = torch.round(x.clamp(0, 1) * 255).to(torch.uint8)
        return u8, sec, f"DPM-Solver++ 2M SDE {steps} steps (EMA)"
    from safetensors.torch import load_file

    if name == "diffusers":
        cmd = [sys.executable, str(HERE / "race_diffusers.py"), "sample"]
    else:
        cmd = [str(args.peer_python), str(HERE / "race_ddpm_pytorch.py"), "sample"]
    res = run_logged(cmd + ["--out", str(out), "--n", str(n), "--batch", str(batch),
                            "--seed", str(args.seed), "--device", args.device],
                     out.parent / f"{name}-sample-{n}.log", args.threads)
    u8 = load_file(str(out / "samples.safetensors"))["images"]
    return u8, res["sampling_seconds"], res["sampler"]


# ----------------------------------------------------------------------------------- scoring

class Scorer:
    """Feature-classifier FID / KID / precision–recall against the test split."""

    def __init__(self) -> None:
        from difflab.data import load_dataset
        from difflab.metrics.features import get_feature_extractor

        self.extractor = get_feature_extractor(DATA, image_size=28, channels=1)
        self.test = load_dataset(DATA, "test")
        self.f_ref = self.extractor(self.test.images, batch_size=500)

    def __call__(self, images_u8: torch.Tensor, seed: int) -> dict:
        from difflab.metrics import fid_from_features, kid, precision_recall

        x = images_u8.float() / 255 * 2 - 1  # (N, 1, 28, 28) in [-1, 1], 8-bit levels
        f = self.extractor(x, batch_size=500)
        k, k_std = kid(f, self.f_ref, generator=torch.Generator().manual_seed(seed))
        pr = precision_recall(self.f_ref, f, k=3)
        return {"FID": fid_from_features(f, self.f_ref), "KID": k, "KID_std": k_std,
                "precision": pr["precision"], "recall": pr["recall"]}

    def references(self, n: int, seed: int) -> list[dict]:
        from difflab.data import load_dataset
        from difflab.metrics import gaussian_blur

        real = (load_dataset(DATA, "train").images[:n] + 1) / 2  # (n, 1, 28, 28) in [0, 1]
        rows = []
        for label, sigma in (("real train images", 0.0), ("real, blur σ=0.5", 0.5),
                             ("real, blur σ=1.0", 1.0)):
            x = gaussian_blur(real, sigma) if sigma else real
            u8 = torch.round(x.clamp(0, 1) * 255).to(torch.uint8)
            rows.append({"contestant": label, "n": n, **self(u8, seed)})
        return rows


# -------------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget per contestant")
    ap.add_argument("--n", type=int, default=5000, help="samples scored per contestant")
    ap.add_argument("--n-peer", type=int, help="samples for the two peers (default --n)")
    ap.add_argument("--contestants", default=",".join(CONTESTANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difflab-precision", default="auto", choices=["auto", "no", "bf16"],
                    help="difflab's --mixed-precision (default: the recipe's auto)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per contestant")
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/race"),
                    help="work dir: checkpoints, logs, samples")
    ap.add_argument("--skip-train", action="store_true", help="reuse the checkpoints in --out-dir")
    ap.add_argument("--probe", type=int, default=16,
                    help="images drawn per contestant to estimate the sampling cost")
    ap.add_argument("--estimate-only", action="store_true",
                    help="stop after printing the sampling cost estimate")
    ap.add_argument("--batch", type=int, default=250, help="sampling batch size")
    ap.add_argument("--replay-steps", default="",
                    help="train each named contestant for exactly these steps instead of "
                         "--minutes, e.g. difflab=4841,diffusers=712,ddpm-pytorch=390 (the steps "
                         "a CPU budget reached), to replay that budget on a faster device")
    ap.add_argument("--device", default="cpu",
                    help="where contestants sample (and the diffusers contestant trains); "
                         "difflab's and denoising-diffusion-pytorch's trainers take a GPU "
                         "when there is one")
    ap.add_argument("--peer-python", type=Path, default=Path("/work/peervenv/bin/python"),
                    help="python of the denoising-diffusion-pytorch venv")
    ap.add_argument("--setup-peer-venv", action="store_true",
                    help="create/update the peer venv (benchmarks/setup_peers.sh) first")
    args = ap.parse_args()
    names = [c.strip() for c in args.contestants.split(",") if c.strip()]
    bad = [c for c in names if c not in CONTESTANTS]
    if bad or not names:
        ap.error(f"unknown contestant(s) {bad}; choose from {','.join(CONTESTANTS)}")
    for opt in ("minutes", "n", "n_peer", "threads", "probe", "batch"):
        v = getattr(args, opt)
        if v is not None and v <= 0:
            ap.error(f"--{opt.replace('_', '-')} must be > 0, got {v}")
    args.names = names
    args.replay = {}
    for item in filter(None, (x.strip() for x in args.replay_steps.split(","))):
        name, _, steps = item.partition("=")
        if name not in CONTESTANTS or not steps.isdigit() or int(steps) <= 0:
            ap.error(f"--replay-steps: bad item {item!r}; want NAME=STEPS with NAME in "
                     f"{','.join(CONTESTANTS)} and STEPS > 0")
        args.replay[name] = int(steps)
    args.n_peer = args.n_peer or args.n
    if args.setup_peer_venv:
        subprocess.run(["bash", str(HERE / "setup_peers.sh"),
                        str(args.peer_python.parent.parent)], check=True)
    if "ddpm-pytorch" in names and not args.peer_python.exists():
        ap.error(f"{args.peer_python} not found: run `bash benchmarks/setup_peers.sh` "
                 "or pass --setup-peer-venv / --peer-python")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print("feature classifier (cached after the first run) …", flush=True)
    scorer = Scorer()
    print(f"  test accuracy {scorer.extractor.info().get('test_accuracy')}")

    trained = {}
    for name in args.names:
        print(f"[train] {name}: {args.minutes} min budget, {args.threads} threads", flush=True)
        trained[name] = train_contestant(name, args)
        t = trained[name]
        print(f"  {t['steps']} steps in {t['train_seconds']:.0f} s, "
              f"{t['img_per_s']:.1f} img/s, final loss {t['final_loss']:.4f}", flush=True)

    n_of = {name: args.n if name == "difflab" else args.n_peer for name in args.names}
    est = []
    for name in args.names:
        k = min(args.probe, n_of[name])
        _, sec, sampler = sample_contestant(name, k, args, batch=k)
        est.append({"contestant": name, "sampler": sampler, "probe": k, "s/image": sec / k,
                    "n": n_of[name], "est. minutes": sec / k * n_of[name] / 60})
    print("sampling cost (probe batch, start-up and first-call warm-up included, so an upper "
          "bound; larger batches are cheaper per image):")
    print_table(est)
    if args.estimate_only:
        return

    rows = []
    for name in args.names:
        print(f"[sample] {name}: {n_of[name]} images", flush=True)
        u8, sec, sampler = sample_contestant(name, n_of[name], args, batch=args.batch)
        grid = save_grid(u8[:64].float() / 255, args.out_dir / f"{name}-samples.png", nrow=8,
                         value_range=(0.0, 1.0))
        print(f"  {len(u8)} samples in {sec:.0f} s; first 64: {grid}", flush=True)
        scores = scorer(u8, args.seed)
        rows.append({"contestant": name, **trained[name], "n": n_of[name], "sampler": sampler,
                     "sampling_seconds": sec, "s/image": sec / n_of[name], **scores})
        print_table(rows[-1:])
        if name == "difflab" and args.n_peer < args.n:  # the same n as the peers, for FID
            scores = scorer(u8[:args.n_peer], args.seed)
            rows.append({**rows[-1], "contestant": "difflab", "n": args.n_peer, **scores})
            print_table(rows[-1:])
    refs = [r for n in sorted(set(n_of.values())) for r in scorer.references(n, args.seed)]

    cols = ("contestant", "steps", "train_seconds", "batch_size", "img_per_s", "final_loss",
            "n", "sampler",
            "s/image", "FID", "KID", "precision", "recall")
    budget = (f"replayed steps {args.replay} on {args.device}" if args.replay
              else f"{args.minutes} min training per contestant, {args.threads} threads")
    print(f"\nquality race: {budget}")
    print_table([{c: r.get(c) for c in cols} for r in rows + refs])
    peers = [r for r in rows if r["contestant"] != "difflab"]
    goal = None
    if peers and any(r["contestant"] == "difflab" for r in rows):
        best = min(peers, key=lambda r: r["FID"])
        ours = [r for r in rows if r["contestant"] == "difflab"]
        mine = next((r for r in ours if r["n"] == best["n"]), ours[0])  # FID only at equal n
        ratio = mine["FID"] / best["FID"]
        same_n = best["n"] == mine["n"]
        goal = {"best_peer": best["contestant"], "fid_ratio": ratio, "met": ratio <= 0.75,
                "same_n": same_n}
        print(f"difflab FID / best peer ({best['contestant']}) FID = {ratio:.3f} "
              f"(goal ≤ 0.75){'' if same_n else ' — different n: compare KID instead'}")
    path = write_json("quality_race", {
        "machine": machine(), "argv": sys.argv, "minutes": args.minutes, "threads": args.threads,
        "replay_steps": args.replay, "device": args.device,
        "seed": args.seed, "data": DATA, "feature_extractor": scorer.extractor.info(),
        "sampling_estimate": est, "rows": rows, "references": refs, "goal": goal})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
