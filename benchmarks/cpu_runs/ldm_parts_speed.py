"""Training speed of the networks of ``difflab train ldm`` on their own (eighth session).

The autoencoder (AutoencoderKL 16/32/32, 28×28 → 4×7×7, batch 64: one AdamW step of its
training loss, bf16 autocast, channels-last, as the loop runs it; and float32 decoding of 250
latents) and the latent U-Net (UNet2DConditionModel 32/64 with cross-attention, batch 64,
16 context tokens of width 64: one AdamW step of an ε-MSE, float32 NCHW or bf16 channels-last).
Compare code versions by putting another checkout's ``src`` first::

    python benchmarks/cpu_runs/ldm_parts_speed.py vae
    python benchmarks/cpu_runs/ldm_parts_speed.py unet fp32,bf16
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/cpu_runs/ldm_parts_speed.py unet bf16

Prints the median of three rounds of ten steps.
"""

import sys
import time

import torch

from difflab.models import AutoencoderKL, AutoencoderKLConfig
from difflab.nn import fused
from difflab.perf import keep_freed_memory
from difflab.runs.ldm import LDMConfig, build_unet

CL = torch.channels_last


def rate(step, per_step: int) -> float:
    for _ in range(3):
        step()
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        rounds.append(10 * per_step / (time.perf_counter() - t0))
    return sorted(rounds)[1]


def autoencoder(cfg: LDMConfig) -> AutoencoderKL:
    """The autoencoder ``train ldm`` builds for 28×28 mnist5k (``runs.ldm.build_vae``)."""
    return AutoencoderKL(AutoencoderKLConfig(
        in_channels=1, image_size=28, block_out_channels=cfg.vae_channels,
        latent_channels=cfg.latent_channels, norm_num_groups=8, kl_weight=cfg.vae_kl_weight))


def vae() -> None:
    torch.manual_seed(0)
    cfg = LDMConfig()
    model = autoencoder(cfg).to(memory_format=CL).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(64, 1, 28, 28).mul(2).sub(1).contiguous(memory_format=CL)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            loss = model.training_loss({"images": x}, g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train = rate(step, 64)
    model.eval()
    z = torch.randn(250, cfg.latent_channels, 7, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        decode = rate(lambda: model.decode(z), 250)
    print(f"autoencoder: train {train:.0f} img/s (bf16), decode {decode:.0f} img/s (fp32)")


def unet(precision: str) -> None:
    torch.manual_seed(0)
    cfg = LDMConfig()
    model = build_unet(autoencoder(cfg), 64, cfg)
    fmt = CL if precision == "bf16" else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, cfg.latent_channels, 7, 7).contiguous(memory_format=fmt)
    ctx, t = torch.randn(64, 16, 64), torch.randint(0, 1000, (64,))

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, t, encoder_hidden_states=ctx).sample
        loss = (out.float() - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    print(f"latent U-Net {precision}: {rate(step, 1):.2f} steps/s")


if __name__ == "__main__":
    keep_freed_memory()
    fused.fused_group_norm_available()
    if sys.argv[1] == "vae":
        vae()
    else:
        for p in (sys.argv[2] if len(sys.argv) > 2 else "fp32,bf16").split(","):
            unet(p)
