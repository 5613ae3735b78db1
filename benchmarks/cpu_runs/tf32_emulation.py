"""Does TF32 convolution (cuDNN's default for float32 on a GPU) move the race model's score?

Emulated on the CPU: every convolution's input and weight rounded to TF32's 10-bit mantissa
(round to nearest), products accumulated in float32 as before. Samples and scores exactly as
``quality_race.py`` does for difflab (5,000 samples, seed 0, batch 250)::

    python benchmarks/cpu_runs/tf32_emulation.py fp32,tf32     # ≈ 13 min on the 2-core CPU
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality_race import DIFFLAB_SAMPLER, Scorer  # noqa: E402

from difflab.cli_eval import sample_many  # noqa: E402
from difflab.runs.diffusion import load_bundle  # noqa: E402

MODEL = "/work/race-bf16/difflab"  # the 20-minute bf16 CPU race model (seed 0)


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (8-bit exponent, 10-bit mantissa), in x's memory layout."""
    bits = x.view(torch.int32)  # same strides as x
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def main() -> None:
    torch.set_num_threads(2)
    scorer = Scorer()
    sched, steps = DIFFLAB_SAMPLER
    for mode in sys.argv[1].split(","):
        bundle = load_bundle(MODEL, device="cpu")
        if mode == "tf32":
            for m in bundle.unet.modules():
                if isinstance(m, torch.nn.Conv2d):
                    with torch.no_grad():
                        m.weight.copy_(tf32(m.weight))
                    m.register_forward_pre_hook(lambda mod, args: (tf32(args[0]), *args[1:]))
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = sample_many(bundle, 5000, scheduler=sched, steps=steps, seed=0, batch_size=250,
                            progress=False)
        u8 = torch.round(x.clamp(0, 1) * 255).to(torch.uint8)
        print(mode, f"{time.perf_counter() - t0:.0f} s", scorer(u8, 0), flush=True)


if __name__ == "__main__":
    main()
