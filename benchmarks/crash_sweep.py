"""Does a training step of each difflab network survive every layout / precision / freezing?

    python benchmarks/crash_sweep.py                 # all networks, ~80 s on a 2-core CPU
    python benchmarks/crash_sweep.py --nets unet     # one of them
    python benchmarks/crash_sweep.py --compile       # each step through torch.compile

One forward + backward per case, each in its own process (a segmentation fault inside PyTorch
must not end the sweep), on small configurations: every network × channels-last / NCHW ×
float32 / bf16 autocast × first convolution frozen (fine-tuning the rest, so the first
GroupNorm gets an input without gradient) or all trainable. The ninth session found
PyTorch 2.13's CPU GroupNorm backward crashing in 6 of the 48
(benchmarks/RESULTS.md, "Reliability"). Prints a table, writes benchmarks/out/crash_sweep.json.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

NETS = {  # name → code that defines m (the network), x (a batch), f (x → output), first (a conv)
    "unet": """
from difflab.models.unet import UNet2DModel, UNetConfig
m = UNet2DModel(UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                           attention_levels=(False, True), norm_num_groups=8,
                           attention_head_dim=32))
x, f, first = torch.randn(2, 1, 16, 16), lambda x: m(x, torch.tensor([3, 500])).sample, m.conv_in
""",
    "unet_condition": """
from difflab.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
m = UNet2DConditionModel(UNet2DConditionConfig(
    sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
    layers_per_block=1, attention_head_dim=8, cross_attention_dim=16, norm_num_groups=8))
ctx = torch.randn(2, 5, 16)
x, f, first = torch.randn(2, 4, 8, 8), lambda x: m(x, torch.tensor([3, 500]), ctx).sample, m.conv_in
""",
    "autoencoder_kl": """
from difflab.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
m = AutoencoderKL(AutoencoderKLConfig(image_size=16, block_out_channels=(16, 32)))
x, first = torch.randn(2, 1, 16, 16), m.encoder.conv_in
f = lambda x: m.decode(m.encode(x).latent_dist.sample()).sample
""",
    "clip_image_encoder": """
from difflab.models.clip import CLIPConfig, ImageEncoder
m = ImageEncoder(CLIPConfig(image_channels=(16, 32), norm_num_groups=8))
x, f, first = torch.randn(2, 1, 16, 16), m, m.conv_in
""",
    "autoencoder_conv": """
from difflab.models.autoencoder import Autoencoder, AutoencoderConfig
m = Autoencoder(AutoencoderConfig(arch="conv", hidden=(16, 32)))
x, f = torch.randn(2, 1, 28, 28), m
first = next(c for c in m.modules() if isinstance(c, torch.nn.Conv2d))
""",
    "feature_classifier": """
from difflab.models.classifier import FeatureClassifier, FeatureClassifierConfig
m = FeatureClassifier(FeatureClassifierConfig())
x, f = torch.randn(2, 1, 28, 28), m
first = next(c for c in m.modules() if isinstance(c, torch.nn.Conv2d))
""",
}

STEP = """
import torch
torch.manual_seed(0)
{net}
if {channels_last}:
    m = m.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
if {frozen}:
    first.requires_grad_(False)
if {compiled}:
    f = torch.compile(f)
with torch.autocast("cpu", torch.bfloat16, enabled={bf16}):
    y = f(x)
y.float().square().mean().backward()
"""


def run_case(net: str, layout: str, precision: str, first_conv: str, compiled: bool) -> str:
    code = STEP.format(net=NETS[net], channels_last=layout == "channels_last",
                       frozen=first_conv == "frozen", bf16=precision == "bf16", compiled=compiled)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 0:
        return "ok"
    if proc.returncode < 0:
        return f"killed by {signal.Signals(-proc.returncode).name}"
    lines = proc.stderr.strip().splitlines()
    return f"exit {proc.returncode}: {lines[-1][:120] if lines else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS), help="comma list of " + ", ".join(NETS))
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each step (inductor; ~20–60 s a case on a 2-core CPU)")
    args = ap.parse_args()
    unknown = [net for net in args.nets.split(",") if net not in NETS]
    if unknown:  # before the first case runs
        ap.error(f"unknown network(s) {unknown}; choose from {', '.join(NETS)}")
    rows = []
    for net, layout, precision, first_conv in itertools.product(
            args.nets.split(","), ["channels_last", "nchw"], ["fp32", "bf16"],
            ["frozen", "trainable"]):
        outcome = run_case(net, layout, precision, first_conv, args.compile)
        rows.append({"network": net, "layout": layout, "precision": precision,
                     "first conv": first_conv, "outcome": outcome})
        print(f"{net} {layout} {precision} first conv {first_conv}: {outcome}", flush=True)
    print_table(rows)
    failed = sum(r["outcome"] != "ok" for r in rows)
    print(f"{len(rows)} cases{' (compiled)' if args.compile else ''}, {failed} failed")
    path = write_json("crash_sweep", {"machine": machine(), "compiled": args.compile,
                                      "rows": rows})
    print(f"wrote {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
