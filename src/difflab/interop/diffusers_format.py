"""Read a Stable Diffusion folder in diffusers' layout into difflab objects.

    model_index.json
    unet/          config.json  diffusion_pytorch_model.safetensors
    vae/           config.json  diffusion_pytorch_model.safetensors
    text_encoder/  config.json  model.safetensors
    tokenizer/     vocab.json + merges.txt  (or tokenizer.json)
    scheduler/     scheduler_config.json

difflab's modules carry diffusers' / transformers' parameter names, so the weights load by name;
the only renames are for older files: the VAE attention's ``query/key/value/proj_attn`` (diffusers
< 0.14) and the ``text_model.`` prefix that transformers ≥ 5 no longer writes. Every model is
built on the ``meta`` device and then *assigned* the file's tensors after every key and every
shape has been checked (:func:`assign_weights`): a mismatch is an error naming the key and both
shapes, never a partial load. Weights are read from ``.safetensors``; a ``.bin`` file only with
``torch.load(weights_only=True)`` (no code from the file can run).

The helpers of the "shared by both formats" section are also used by ``sd_single_file``.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.errors import CheckpointError, ConfigError
from difflab.io import load_state_dict_into, load_tensors, read_json
from difflab.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflab.models.clip_text import CLIPTextConfig, CLIPTextModel
from difflab.models.tokenizer import CLIPTokenizer
from difflab.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
from difflab.pipelines.text_to_image import TextToImage
from difflab.schedulers import SCHEDULERS, Scheduler

# The scheduler used where the checkpoint names none difflab has (e.g. SD v1.5's PNDM) or names
# none at all (single files): DPM-Solver++(2M), good images in 20–25 steps.
DEFAULT_SCHEDULER = "dpm++"

EXPECTED_CLASSES = {  # model_index.json entries difflab can read
    "unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",), "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
# Weights files, best first: full precision before the fp16 variant (what diffusers loads when
# no variant is asked for); each name may also be sharded (``<name>.index.json`` for
# ``foo.safetensors``, ``foo.safetensors.index.fp16.json`` for the fp16 variant).
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


# --------------------------------------------------------------------------------------------
# Shared by both formats: reading tensors, building on meta, strict assignment
# --------------------------------------------------------------------------------------------

def read_weights(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file, or of a ``.bin/.ckpt/.pt`` file unpickled with
    ``weights_only=True`` (tensors, numbers, strings and dicts only; anything else — e.g. a
    pickle that would run code — is refused). A ``{"state_dict": {...}}`` wrapper is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: this pickle holds more than tensors and is not loaded, since "
            f"unpickling it could run code ({first}). Convert it to .safetensors with a tool "
            "you trust, or use the model's safetensors release.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def build_on_meta(cls: type[nn.Module], config: Any) -> Any:
    """Build ``cls(config)`` without allocating or initialising weights (they come from a file)."""
    with torch.device("meta"):
        return cls(config)


def assign_weights(model: nn.Module, state: dict[str, Tensor], source: str,
                   dtype: torch.dtype | None = None) -> None:
    """Give ``model`` (built on meta) exactly the tensors of ``state``: the key sets must be equal
    and every shape must match; otherwise a CheckpointError names the key(s) and shapes."""
    load_state_dict_into(model, state, source, dtype=dtype, assign=True)
    model.eval()


def make_scheduler(choice: str | Scheduler | None, config: dict[str, Any],
                   source: str) -> Scheduler:
    """The pipeline's scheduler: ``choice`` (a registry name or an instance), else the class
    named in ``config["_class_name"]``; a class difflab lacks is replaced — with a warning — by
    :data:`DEFAULT_SCHEDULER` built from the same noise schedule keys."""
    if isinstance(choice, Scheduler):
        return choice
    if choice is not None:
        if choice not in SCHEDULERS:
            raise ConfigError(f"scheduler={choice!r} is not allowed; choose one of "
                              f"{list(SCHEDULERS)}")
        return SCHEDULERS[choice].from_config(config)
    by_class = {c.__name__: c for c in SCHEDULERS.values()}
    name = config.get("_class_name")
    if name in by_class:
        return by_class[name].from_config(config)
    if name is not None:
        warnings.warn(f"{source}: difflab has no {name}; using {DEFAULT_SCHEDULER} "
                      f"({SCHEDULERS[DEFAULT_SCHEDULER].__name__}) with the same noise "
                      f"schedule. Choose another with scheduler=… (--scheduler).", stacklevel=3)
    return SCHEDULERS[DEFAULT_SCHEDULER].from_config(config)


def text_encoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ≥ 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix; older files
    also hold the ``position_ids`` buffer (0, 1, …, 76), which difflab computes instead."""
    out = {}
    for key, tensor in state.items():
        if key.endswith("embeddings.position_ids"):
            continue
        out[key if key.startswith("text_model.") else f"text_model.{key}"] = tensor
    return out


# --------------------------------------------------------------------------------------------
# Configs: diffusers' AutoencoderKL config.json → AutoencoderKLConfig
# --------------------------------------------------------------------------------------------

VAE_FIXED: dict[str, Any] = {  # diffusers keys accepted only at these values
    "act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
}
VAE_IGNORED = ("force_upcast",)  # a dtype hint for fp16 users, not part of the model
# diffusers' defaults for keys a config may lack (folders saved before diffusers 0.11 have no
# scaling_factor): difflab's own training defaults differ and must not stand in for them.
VAE_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "block_out_channels": [64], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
}


def vae_config_from_diffusers(cfg: dict[str, Any]) -> AutoencoderKLConfig:
    """Build an :class:`AutoencoderKLConfig` from a diffusers ``vae/config.json`` dict."""
    kw: dict[str, Any] = {}
    cfg = {**VAE_DIFFUSERS_DEFAULTS, **cfg}
    for key, value in cfg.items():
        if key.startswith("_") or key in VAE_IGNORED:
            continue
        if key in VAE_FIXED:
            if value != VAE_FIXED[key]:
                raise ConfigError(f"vae config: {key}={value!r} is not supported by difflab's "
                                  f"AutoencoderKL (allowed: {VAE_FIXED[key]!r})")
        elif key == "down_block_types":
            if any(t != "DownEncoderBlock2D" for t in value):
                raise ConfigError(f"vae config: down_block_types={value!r}: only "
                                  "DownEncoderBlock2D is supported")
        elif key == "up_block_types":
            if any(t != "UpDecoderBlock2D" for t in value):
                raise ConfigError(f"vae config: up_block_types={value!r}: only "
                                  "UpDecoderBlock2D is supported")
        elif key == "out_channels":
            if value != cfg.get("in_channels", 3):
                raise ConfigError(f"vae config: out_channels={value} differs from in_channels")
        elif key == "sample_size":
            kw["image_size"] = value[0] if isinstance(value, (list, tuple)) else value
        elif key in ("in_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                     "scaling_factor", "use_quant_conv", "use_post_quant_conv",
                     "mid_block_add_attention"):
            kw[key] = value
        elif key == "block_out_channels":
            kw[key] = tuple(value)
        else:
            raise ConfigError(f"vae config: unknown key {key!r}")
    return AutoencoderKLConfig(**kw)


# diffusers < 0.14 named the VAE's attention projections like this.
_OLD_VAE_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                      ".proj_attn.": ".to_out.0."}


def vae_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, tensor in state.items():
        for old, new in _OLD_VAE_ATTENTION.items():
            key = key.replace(old, new)
        out[key] = tensor
    return out


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------

def _shard_index(folder: Path, name: str) -> Path:
    """``model.safetensors`` → ``model.safetensors.index.json``; the fp16 variant's index is
    ``model.safetensors.index.fp16.json`` (diffusers' and transformers' names)."""
    stem, fp16, ext = name.rpartition(".fp16")[0], ".fp16" in name, name.rsplit(".", 1)[1]
    return folder / (f"{stem}.{ext}.index.fp16.json" if fp16 else f"{name}.index.json")


def _component_weights(folder: Path) -> dict[str, Tensor]:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return read_weights(folder / name)
        index = _shard_index(folder, name)
        if index.is_file():  # sharded: {"weight_map": {key: shard file}}
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(read_weights(folder / shard))
            return state
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_NAMES)}, "
                          "each also sharded)")


def load_diffusers_folder(path: str | Path, *, dtype: torch.dtype | None = None,
                          device: torch.device | str | None = None,
                          scheduler: str | Scheduler | None = None) -> TextToImage:
    """Load a Stable Diffusion diffusers-format folder as a difflab :class:`TextToImage`
    (weights cast to ``dtype``, default float32, on ``device``, default CPU)."""
    root = Path(path)
    dtype = dtype or torch.float32
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    for part, expected in EXPECTED_CLASSES.items():
        entry = index.get(part)
        if entry is not None and (not isinstance(entry, list) or entry[-1] not in expected):
            raise CheckpointError(f"{root}/model_index.json: {part} is {entry!r}; difflab reads "
                                  f"a {expected[0]} here (Stable Diffusion v1/v2 layout)")
        if not (root / part).is_dir():
            raise CheckpointError(f"{root}: missing the {part}/ folder of a diffusers pipeline")
    for extra in ("text_encoder_2", "transformer", "prior"):
        if index.get(extra) and index[extra][0] is not None:
            raise CheckpointError(f"{root}: has a {extra} component ({index[extra]!r}); only "
                                  "Stable Diffusion v1/v2 pipelines are supported")

    unet_config = UNet2DConditionConfig.from_diffusers_config(
        read_json(root / "unet" / "config.json"))
    vae_config = vae_config_from_diffusers(read_json(root / "vae" / "config.json"))
    text_config = CLIPTextConfig.from_transformers_config(
        read_json(root / "text_encoder" / "config.json"))
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    check_components(str(root), unet_config, vae_config, text_config, tokenizer)

    unet = build_on_meta(UNet2DConditionModel, unet_config)
    assign_weights(unet, _component_weights(root / "unet"), f"{root}/unet", dtype)
    vae = build_on_meta(AutoencoderKL, vae_config)
    assign_weights(vae, vae_state(_component_weights(root / "vae")), f"{root}/vae", dtype)
    text_encoder = build_on_meta(CLIPTextModel, text_config)
    assign_weights(text_encoder, text_encoder_state(_component_weights(root / "text_encoder")),
                   f"{root}/text_encoder", dtype)
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched_cfg = read_json(sched_file) if sched_file.is_file() else {}
    sched = make_scheduler(scheduler, sched_cfg, str(sched_file))
    pipe = TextToImage(tokenizer, text_encoder, unet, vae, sched)
    return pipe.to(device=device or "cpu")


def check_components(source: str, unet: UNet2DConditionConfig, vae: AutoencoderKLConfig,
                     text: CLIPTextConfig, tokenizer: CLIPTokenizer) -> None:
    """The parts must fit together as text-to-image: the U-Net takes and predicts the VAE's
    latents (an inpainting U-Net takes 9 channels: latents + mask + masked image) and attends
    to the text encoder's width, and every token id has an embedding."""
    if unet.in_channels != vae.latent_channels or unet.out_channels != vae.latent_channels:
        raise CheckpointError(
            f"{source}: the U-Net maps {unet.in_channels} → {unet.out_channels} channels but "
            f"the VAE's latents have {vae.latent_channels}; difflab runs text-to-image "
            "pipelines only (not inpainting, depth or other image-conditioned U-Nets)")
    if unet.cross_attention_dim != text.hidden_size:
        raise CheckpointError(f"{source}: the U-Net attends to width "
                              f"{unet.cross_attention_dim} but the text encoder's is "
                              f"{text.hidden_size}")
    if tokenizer.max_token_id >= text.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has ids up to {tokenizer.max_token_id} "
                              f"but the text encoder embeds only {text.vocab_size} tokens")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


__all__ = ["assign_weights", "build_on_meta", "check_components", "is_diffusers_folder",
           "load_diffusers_folder", "make_scheduler", "read_weights", "text_encoder_state",
           "vae_config_from_diffusers"]
