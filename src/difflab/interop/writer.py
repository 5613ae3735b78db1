"""Write a :class:`TextToImage` in the two Stable Diffusion formats that ``load_pipeline`` reads.

- :func:`save_pipeline`: a diffusers-layout folder (``model_index.json``, ``unet/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``), configs in diffusers' / transformers' own
  keys, weights as ``.safetensors`` under their file names. diffusers'
  ``StableDiffusionPipeline.from_pretrained`` reads it too (tests/test_interop_writer.py).
- :func:`save_single_file`: one ``.safetensors`` in the original LDM layout
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``).
  Like the real SD release files it carries no config and no tokenizer: read it back with
  ``load_single_file(path, tokenizer=..., configs=...)`` (for SD v1.5-sized models the built-in
  configs apply and ``load_pipeline(path)`` is enough).

Both write atomically: the folder is assembled beside its final place and renamed into it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from difflab.io import atomic_write_json, replace_dir, save_tensors
from difflab.models.autoencoder_kl import AutoencoderKLConfig
from difflab.models.clip_text import CLIPTextModel
from difflab.pipelines.text_to_image import TextToImage

DIFFUSERS_VERSION = "0.42.1"  # the diffusers version whose layout and keys are written


def vae_diffusers_config(c: AutoencoderKLConfig) -> dict[str, Any]:
    """diffusers' ``AutoencoderKL`` config.json for ``c`` (training-only keys left out)."""
    n = len(c.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels,
            "out_channels": c.in_channels, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(c.block_out_channels),
            "layers_per_block": c.layers_per_block, "act_fn": "silu",
            "latent_channels": c.latent_channels, "norm_num_groups": c.norm_num_groups,
            "sample_size": c.image_size, "scaling_factor": c.scaling_factor,
            "mid_block_add_attention": c.mid_block_add_attention,
            "use_quant_conv": c.use_quant_conv, "use_post_quant_conv": c.use_post_quant_conv}


def text_encoder_transformers_config(model: CLIPTextModel, tokenizer) -> dict[str, Any]:
    """transformers' ``CLIPTextModel`` config.json for ``model``."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            **model.config.to_dict(), "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "projection_dim": model.config.hidden_size}


def write_pipeline_files(folder: Path, pipe: TextToImage) -> None:
    """Write the diffusers layout of ``pipe`` into the existing, empty ``folder``."""
    from difflab.models.clip import save_tokenizer

    sched = pipe.scheduler
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", type(sched).__name__],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "image_encoder": [None, None], "requires_safety_checker": False}
    atomic_write_json(folder / "model_index.json", index)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / part).mkdir()
    atomic_write_json(folder / "unet" / "config.json",
                      {"_class_name": "UNet2DConditionModel", **pipe.unet.config.to_dict()})
    save_tensors(folder / "unet" / "diffusion_pytorch_model.safetensors",
                 pipe.unet.state_dict())
    atomic_write_json(folder / "vae" / "config.json", vae_diffusers_config(pipe.vae.config))
    save_tensors(folder / "vae" / "diffusion_pytorch_model.safetensors", pipe.vae.state_dict())
    atomic_write_json(folder / "text_encoder" / "config.json",
                      text_encoder_transformers_config(pipe.text_encoder, pipe.tokenizer))
    save_tensors(folder / "text_encoder" / "model.safetensors", pipe.text_encoder.state_dict())
    save_tokenizer(pipe.tokenizer, folder / "tokenizer")
    sched.save_config(folder / "scheduler")


def save_pipeline(pipe: TextToImage, folder: str | Path) -> Path:
    """Write ``pipe`` as a diffusers-format Stable Diffusion folder; returns the folder.

    An existing ``folder`` is replaced as a whole (atomically)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_pipeline_files(tmp, pipe)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, folder)
    return folder


def save_single_file(pipe: TextToImage, path: str | Path) -> Path:
    """Write the three networks of ``pipe`` as one LDM-layout ``.safetensors`` file."""
    from difflab.interop.sd_single_file import ldm_state_from_models

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single files are written as .safetensors only")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, ldm_state_from_models(pipe.unet, pipe.vae, pipe.text_encoder))
    return path


__all__ = ["save_pipeline", "save_single_file", "text_encoder_transformers_config",
           "vae_diffusers_config", "write_pipeline_files"]
