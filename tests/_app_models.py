"""Tiny checkpoints for the playground tests, saved with the library's own save functions:
a VAE and an AE on sklearn's 8×8 digits (a few training steps), a class-conditional pixel
U-Net (untrained: its samples are structured noise, which is all a UI test needs), and
optionally a tiny latent diffusion run."""

from pathlib import Path

import torch

from difflab.data import load_dataset
from difflab.runs.autoencoders import build_model as build_ae
from difflab.runs.autoencoders import data_info, model_config
from difflab.runs.diffusion import build_unet, save_bundle
from difflab.training import TrainConfig, train
from difflab.training.objectives import DiffusionConfig

TINY_UNET = dict(block_out_channels=(8, 16), layers_per_block=1,
                 attention_levels=(False, False), mid_attention=False, norm_num_groups=4)


def make_tiny_models(root: Path, *, vae_latent: int = 3, ldm: bool = False) -> Path:
    """root/vae, root/ae (difflab train layout: model/ + data.json) and root/ddpm/model."""
    data = load_dataset("digits")
    for kind, k in (("vae", vae_latent), ("ae", 2)):
        torch.manual_seed(0)
        model = build_ae(model_config(kind, data, latent_dim=k, hidden=(64,)), data)
        res = train(model, data.images, data.labels,
                    TrainConfig(max_steps=40, batch_size=64, lr=3e-3, progress=False),
                    desc=kind)
        res.model.eval().save_pretrained(root / kind / "model",
                                         extra_files={"data.json": data_info(data, None)})
    torch.manual_seed(0)
    unet = build_unet(data, cond_class=True, **TINY_UNET)
    # label dropout as `train ddpm --cond class` uses it: guidance applies
    save_bundle(root / "ddpm" / "model", unet,
                DiffusionConfig(num_train_timesteps=100, p_uncond=0.1), data)
    if ldm:
        from difflab.runs.ldm import LDMConfig, train_ldm

        train_ldm(data, load_dataset("digits", "test"), out_dir=root / "ldm",
                  cfg=LDMConfig(vae_channels=(16, 32, 32), unet_channels=(16, 32),
                                unet_heads=2, sample_steps=2),
                  train_cfg=TrainConfig(max_steps=2, batch_size=16, progress=False))
    return root
