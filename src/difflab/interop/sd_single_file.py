"""Read an original Stable Diffusion v1.x single-file checkpoint (CompVis / RunwayML layout).

One ``.safetensors`` (or ``.ckpt``, read only with ``weights_only=True``) holds the three
networks under the names of the original LDM code (github.com/CompVis/stable-diffusion):

    model.diffusion_model.*            the U-Net  (input_blocks / middle_block / output_blocks)
    first_stage_model.*                the VAE    (encoder.down.{i}.block.{j} …, mid.attn_1.q …)
    cond_stage_model.transformer.*     the CLIP text encoder (transformers' names + a prefix)

The file carries no configs and no tokenizer: the SD v1 configs are built in (:data:`SD15`),
and the tokenizer files (CLIP's ``vocab.json`` + ``merges.txt``, e.g. the ``tokenizer/`` folder
of any SD v1 diffusers repo, or ``openai/clip-vit-large-patch14``) are passed as ``tokenizer=``
(CLI ``--tokenizer DIR``) or found beside the checkpoint: ``<dir>/tokenizer/`` or ``<dir>``.

Name mapping: for every difflab parameter, :func:`ldm_names` gives the LDM key it is read from
(one rule per module kind, below); the loader asserts each key exists with the expected shape
(the VAE attention's 1×1 convolutions ``(C, C, 1, 1)`` become linear weights ``(C, C)``),
that nothing under the three prefixes is left over, and only then assigns. Other entries of the
file (the DDPM schedule buffers ``betas``, ``alphas_cumprod`` …, and the ``model_ema.*`` copy
of full training checkpoints) are not read: the main weights are loaded — the ``-emaonly``
release files store the EMA weights as their main weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.errors import CheckpointError
from difflab.interop.diffusers_format import (
    assign_weights,
    check_components,
    make_scheduler,
    read_weights,
    vae_config_from_diffusers,
)
from difflab.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflab.models.clip_text import CLIPTextConfig, CLIPTextModel
from difflab.models.tokenizer import CLIPTokenizer
from difflab.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
from difflab.pipelines.text_to_image import TextToImage
from difflab.schedulers import Scheduler

# ------------------------------------------------------------------------ SD v1 configs
# As in the runwayml/stable-diffusion-v1-5 diffusers repo (v1-inference.yaml of the original).
SD15: dict[str, dict[str, Any]] = {
    "unet": dict(sample_size=64, in_channels=4, out_channels=4,
                 block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32),
    "vae": dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4,
                block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, eos_token_id=2),
    "scheduler": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", steps_offset=1, prediction_type="epsilon",
                      clip_sample=False, set_alpha_to_one=False),
}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
SKIPPED_SUFFIXES = ("embeddings.position_ids",)  # buffers (0..76), recomputed by difflab


def sd15_models(device: str | torch.device = "meta", configs: dict[str, dict] | None = None
                ) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The three SD v1 networks (random or meta weights) from ``configs`` (default SD v1.5)."""
    c = configs or SD15
    with torch.device(device):
        return (UNet2DConditionModel(UNet2DConditionConfig.from_diffusers_config(c["unet"])),
                AutoencoderKL(vae_config_from_diffusers(c["vae"])),
                CLIPTextModel(CLIPTextConfig.from_transformers_config(c["text_encoder"])))


def config_counts_sd15() -> dict[str, int]:
    """Parameter counts of the SD v1.5 U-Net (859.5M), VAE (83.7M), text encoder (123.1M),
    built on the meta device (no memory, instant)."""
    unet, vae, text = sd15_models("meta")
    return {"unet": unet.num_parameters, "vae": vae.num_parameters,
            "text_encoder": text.num_parameters}


# --------------------------------------------------------------------------------------------
# difflab name → LDM name, one rule per module kind
# --------------------------------------------------------------------------------------------

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                 "to_out.0": "proj_out"}
VAE_TOP = {"conv_norm_out": "norm_out"}


def _sub(table: dict[str, str], rest: str) -> str:
    """Rename the leading module of ``rest`` ("norm1.weight") through ``table``."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_ldm_name(key: str, config: UNet2DConditionConfig) -> str:
    """``down_blocks.1.resnets.0.conv1.weight`` → ``input_blocks.4.0.in_layers.2.weight``.

    LDM numbers the U-Net's children in one sequence per direction: ``input_blocks.0`` is
    conv_in; then each level adds L entries [resnet, transformer] and (except the last) one
    downsampler ``op``; ``output_blocks`` has L+1 entries per level, the last also holding the
    upsampler (after the transformer when there is one).
    """
    L = config.layers_per_block
    has_attn = [t.startswith("CrossAttn") for t in config.down_block_types]
    n = len(has_attn)
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        k = 1 + i * (L + 1) + j
        return (f"input_blocks.{k}.0.{_sub(UNET_RESNET, rest)}" if kind == "resnets"
                else f"input_blocks.{k}.1.{rest}")
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "resnets":
            return f"middle_block.{2 * int(m[2])}.{_sub(UNET_RESNET, m[3])}"
        return f"middle_block.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        k = i * (L + 1) + j
        return (f"output_blocks.{k}.0.{_sub(UNET_RESNET, rest)}" if kind == "resnets"
                else f"output_blocks.{k}.1.{rest}")
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        slot = 2 if has_attn[n - 1 - i] else 1
        return f"output_blocks.{i * (L + 1) + L}.{slot}.conv.{m[2]}"
    return _sub(UNET_TOP, key)


def vae_ldm_name(key: str, config: AutoencoderKLConfig) -> str:
    """``decoder.up_blocks.0.resnets.1.conv1.weight`` → ``decoder.up.3.block.1.conv1.weight``
    (LDM numbers the decoder's levels from the highest resolution, diffusers from the lowest)."""
    n = len(config.block_out_channels)
    if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = int(m[3]) if m[2] == "down" else n - 1 - int(m[3])
        return f"{m[1]}.{m[2]}.{level}.block.{m[4]}.{_sub(VAE_RESNET, m[5])}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_sub(VAE_RESNET, m[3])}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_sub(VAE_ATTENTION, m[2])}"
    if m := re.match(r"(encoder|decoder)\.(.+)", key):
        return f"{m[1]}.{_sub(VAE_TOP, m[2])}"
    return key  # quant_conv, post_quant_conv


def ldm_names(unet: UNet2DConditionModel, vae: AutoencoderKL, text: CLIPTextModel,
              text_prefix: str = TEXT_PREFIXES[0]) -> dict[str, dict[str, str]]:
    """For each network, {difflab parameter name: full LDM key}."""
    return {
        "unet": {k: UNET_PREFIX + unet_ldm_name(k, unet.config) for k in unet.state_dict()},
        "vae": {k: VAE_PREFIX + vae_ldm_name(k, vae.config) for k in vae.state_dict()},
        "text_encoder": {k: text_prefix + k.removeprefix("text_model.")
                         for k in text.state_dict()},
    }


def _is_conv_as_linear(key: str, stored: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """LDM's VAE attention uses 1×1 convolutions: weight (C, C, 1, 1) ↔ difflab's Linear (C, C)."""
    return ".mid.attn_1." in key and stored == (*expected, 1, 1)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def remap_ldm_state(state: dict[str, Tensor], models: tuple[Any, Any, Any], source: str
                    ) -> dict[str, dict[str, Tensor]]:
    """Split an LDM state dict into difflab state dicts for (unet, vae, text_encoder), checking
    that every parameter is present with the right shape and that nothing is left over."""
    unet, vae, text = models
    text_prefix = next((p for p in TEXT_PREFIXES if f"{p}final_layer_norm.weight" in state),
                       TEXT_PREFIXES[0])
    names = ldm_names(unet, vae, text, text_prefix)
    out: dict[str, dict[str, Tensor]] = {}
    used: set[str] = set()
    for part, model in zip(("unet", "vae", "text_encoder"), models):
        own = model.state_dict()
        missing = [ldm for ldm in names[part].values() if ldm not in state]
        if missing:
            raise CheckpointError(
                f"{source}: not a Stable Diffusion v1 checkpoint of this shape — {len(missing)} "
                f"{part} tensors missing, e.g. {missing[:3]}")
        tensors = {}
        for key, ldm in names[part].items():
            t, expected = state[ldm], tuple(own[key].shape)
            if tuple(t.shape) != expected:
                if not _is_conv_as_linear(ldm, tuple(t.shape), expected):
                    raise CheckpointError(f"{source}: tensor {ldm!r} (→ {part}.{key}) has shape "
                                          f"{tuple(t.shape)}, the model expects {expected}")
                t = t.reshape(expected)
            tensors[key] = t
            used.add(ldm)
        out[part] = tensors
    prefixes = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")
    leftover = sorted(k for k in state if k.startswith(prefixes) and k not in used
                      and not k.endswith(SKIPPED_SUFFIXES))
    if leftover:
        raise CheckpointError(f"{source}: {len(leftover)} network tensors difflab's SD v1 models "
                              f"have no place for, e.g. {leftover[:3]} (SD 2.x / SDXL / "
                              "inpainting files are not read)")
    return out


def find_tokenizer(checkpoint: Path, tokenizer: str | Path | None) -> CLIPTokenizer:
    if tokenizer is not None:
        return CLIPTokenizer.from_pretrained(tokenizer)
    for folder in (checkpoint.parent / "tokenizer", checkpoint.parent):
        if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
            return CLIPTokenizer.from_pretrained(folder)
    raise CheckpointError(
        f"{checkpoint}: an SD single file has no tokenizer; pass tokenizer=DIR (CLI: --tokenizer "
        "DIR), a folder with CLIP's vocab.json and merges.txt — e.g. the tokenizer/ folder of an "
        "SD v1 diffusers repo — or put it beside the checkpoint as tokenizer/")


def load_single_file(path: str | Path, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None,
                     scheduler: str | Scheduler | None = None,
                     tokenizer: str | Path | None = None,
                     configs: dict[str, dict[str, Any]] | None = None) -> TextToImage:
    """Load an SD v1.x single-file checkpoint as a :class:`TextToImage` (see the module doc).

    ``configs`` replaces the built-in SD v1.5 configs (:data:`SD15`; same keys, diffusers /
    transformers config formats) — for fine-tunes of other sizes and for tests.
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: expected a .safetensors (or .ckpt) checkpoint")
    configs = configs or SD15
    tok = find_tokenizer(path, tokenizer)
    models = sd15_models("meta", configs)
    check_components(str(path), *(m.config for m in models), tok)
    state = read_weights(path)
    parts = remap_ldm_state(state, models, str(path))
    del state
    dtype = dtype or torch.float32
    for part, model in zip(("unet", "vae", "text_encoder"), models):
        assign_weights(model, parts[part], f"{path} ({part})", dtype)
    sched = make_scheduler(scheduler, configs["scheduler"], str(path))
    unet, vae, text = models
    return TextToImage(tok, text, unet, vae, sched).to(device=device or "cpu")


def ldm_state_from_models(unet: UNet2DConditionModel, vae: AutoencoderKL, text: CLIPTextModel
                          ) -> dict[str, Tensor]:
    """The inverse: difflab models → one LDM-layout state dict (VAE attention as 1×1 convs)."""
    names = ldm_names(unet, vae, text)
    out: dict[str, Tensor] = {}
    for part, model in zip(("unet", "vae", "text_encoder"), (unet, vae, text)):
        for key, tensor in model.state_dict().items():
            ldm = names[part][key]
            conv = ".mid.attn_1." in ldm and ldm.endswith("weight") and tensor.ndim == 2
            out[ldm] = tensor[:, :, None, None] if conv else tensor
    return out


__all__ = ["SD15", "config_counts_sd15", "ldm_names", "ldm_state_from_models",
           "load_single_file", "remap_ldm_state", "sd15_models", "unet_ldm_name",
           "vae_ldm_name"]
