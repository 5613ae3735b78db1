"""Does TF32 convolution (cuDNN's default for float32 on a GPU) move the race model's score?
Emulated on the CPU: conv inputs and weights rounded to TF32's 10-bit mantissa."""
import sys, time, torch
sys.path.insert(0, "benchmarks")
from quality_race import Scorer, DIFFLAB_SAMPLER
from difflab.cli_eval import sample_many
from difflab.runs.diffusion import load_bundle

def tf32(x):
    b = x.contiguous().view(torch.int32)
    b = (b + 0x1000) & ~0x1FFF
    return b.view(torch.float32).view_as(x).contiguous(memory_format=torch.channels_last) \
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else b.view(torch.float32).view_as(x)

torch.set_num_threads(2)
scorer = Scorer()
sched, steps = DIFFLAB_SAMPLER
for mode in sys.argv[1].split(","):
    bundle = load_bundle("/work/race-bf16/difflab", device="cpu")
    if mode == "tf32":
        for m in bundle.unet.modules():
            if isinstance(m, torch.nn.Conv2d):
                with torch.no_grad():
                    m.weight.copy_(tf32(m.weight))
                m.register_forward_pre_hook(lambda mod, args: (tf32(args[0]),) + tuple(args[1:]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = sample_many(bundle, 5000, scheduler=sched, steps=steps, seed=0, batch_size=250,
                        progress=False)
    u8 = torch.round(x.clamp(0, 1) * 255).to(torch.uint8)
    print(mode, f"{time.perf_counter() - t0:.0f} s", scorer(u8, 0), flush=True)
